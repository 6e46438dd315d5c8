"""Helpers of tests/test_dvt.py: tiny DVT models (both backbones) with weights re-drawn so that every path
(feature and relation reuse included) moves the logits, independent references of the official resampling
(specs/evit_dvt.md 2.3-2.4, written from the spec, not from vitadapt), and official-layout checkpoint files."""

import math
import os
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden"))
GOLDEN_DEV = GOLDEN_ROOT / "dvt" / "golden_dev.pt"
GOLDEN_T2T = GOLDEN_ROOT / "dvt" / "golden_t2t_dev.pt"

# DeiT backbone at 32 px: token grids 4 / 6 / 8 (patch 8; 5 with 1 px padding: (32 + 2 - 5) // 5 + 1 = 6; 4).
VIT_OPTS = {"MODEL.NAME": "DVT", "VIT.EMBED_DIM": 24, "VIT.DEPTH": 1, "VIT.NUM_HEADS": 2,
            "DATA.TRAIN_CROP_SIZE": 32, "DATA.TEST_CROP_SIZE": 32, "DVT.PATCH_SIZES": [8, 5, 4],
            "DVT.PATCH_PADDINGS": [0, 1, 0]}
VIT_GRIDS = (4, 6, 8)
# T2T backbone: its token grids are fixed by the soft-split schedules, 7 / 10 / 14 at 224 px.
T2T_OPTS = {"MODEL.NAME": "DVT", "DVT.BACKBONE": "T2TViT", "VIT.EMBED_DIM": 24, "VIT.DEPTH": 1, "VIT.NUM_HEADS": 2,
            "VIT.MLP_RATIO": 2.0, "VIT.QKV_BIAS": False, "T2T.TOKEN_DIM": 8, "DATA.TRAIN_CROP_SIZE": 224,
            "DATA.TEST_CROP_SIZE": 224}
T2T_GRIDS = (7, 10, 14)


def as_opts(pairs: Dict[str, object]) -> List[str]:
    out: List[str] = []
    for key, value in pairs.items():
        out += [key, value if isinstance(value, str) else repr(value)]
    return out


def tiny_cfg(backbone: str = "vit", num_classes: int = 5, **overrides):
    from vitadapt.config import load_config

    pairs = dict(VIT_OPTS if backbone == "vit" else T2T_OPTS)
    pairs.update({"MODEL.NUM_CLASSES": num_classes, "NUM_GPUS": 0})
    pairs.update({k.replace("__", "."): v for k, v in overrides.items()})
    return load_config("", as_opts(pairs))


@torch.no_grad()
def redraw_(model: torch.nn.Module, seed: int, head_gain: float = 3.0) -> torch.nn.Module:
    """Every trainable tensor re-drawn as the golden harness does (LayerNorm weight 1 + 0.1N, bias 0.1N; matrices
    and convolutions N(0, 1/fan_in); other biases 0.02N; cls / pos N(0, 0.5^2)), heads scaled by head_gain, so
    that the exits' confidences spread over (1/classes, 1) and the reuse paths contribute O(1)."""
    g = torch.Generator().manual_seed(seed)
    norms = {f"{n}.{p}" for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)
             for p in ("weight", "bias")}
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name in norms:
            p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * noise)
        elif name.endswith(("cls_token", "pos_embed")):
            p.copy_(0.5 * noise)
        elif p.dim() >= 2:
            p.copy_(noise / math.sqrt(p[0].numel()))
        else:
            p.copy_(0.02 * noise)
        if name.endswith("head.weight"):
            p.mul_(head_gain)
    return model


def tiny_model(backbone: str = "vit", seed: int = 0, num_classes: int = 5, **overrides):
    from vitadapt.models import build_model

    torch.manual_seed(seed)
    return redraw_(build_model(tiny_cfg(backbone, num_classes, **overrides)), seed).eval()


# ------------------------------------------------------------------------------------ independent references
def upsample_pool(grid: torch.Tensor, dst: int) -> torch.Tensor:
    """The official resampling of [N, C, s, s] maps: nearest upsampling to 2s x 2s (14 for 7, 20 for 10, the
    sizes the official code hard-codes), then adaptive average pooling to dst x dst."""
    s = grid.shape[-1]
    return F.adaptive_avg_pool2d(F.interpolate(grid, size=(2 * s, 2 * s), mode="nearest"), (dst, dst))


def reference_reused_features(transformed: torch.Tensor, dst: int) -> torch.Tensor:
    """specs 2.3: f = feature_resuse_mlp(x_L)[:, 1:] -> [B, 48, s, s] -> resampled -> [B, T, 48], with a zero CLS row
    in front. `transformed` is feature_resuse_mlp(x_L), [B, n + 1, 48]."""
    b, n1, c = transformed.shape
    s = math.isqrt(n1 - 1)
    f = transformed[:, 1:].transpose(1, 2).reshape(b, c, s, s)
    f = upsample_pool(f, dst).reshape(b, c, dst * dst).transpose(1, 2)
    return torch.cat([torch.zeros(b, 1, c, dtype=f.dtype), f], dim=1)


def reference_relation_bias(mixed: torch.Tensor, dst: int, depth: int) -> List[torch.Tensor]:
    """specs 2.4, line by line: mixed = relation_reuse_conv(cat(upstream logits)) [B, HD, n + 1, n + 1] (queries,
    keys) -> the bias [B, H, T + 1, T + 1] of each of the `depth` blocks; CLS row and column pass through."""
    b, hd, n1, _ = mixed.shape
    s, t = math.isqrt(n1 - 1), dst * dst
    keys = upsample_pool(mixed[..., 1:].reshape(b * hd, n1, s, s), dst).reshape(b * hd, n1, t)
    a = torch.cat([mixed[..., 0].reshape(b * hd, n1, 1), keys], dim=2).transpose(1, 2)  # [BHD, T + 1, n + 1]
    queries = upsample_pool(a[..., 1:].reshape(b * hd, t + 1, s, s), dst).reshape(b * hd, t + 1, t)
    a = torch.cat([a[..., :1], queries], dim=2).transpose(1, 2).reshape(b, hd, t + 1, t + 1)
    return list(a.chunk(depth, dim=1))


def spread_thresholds(confidences: Sequence[torch.Tensor], take: Sequence[int]) -> List[float]:
    """Thresholds under which take[0] images leave at exit 1 and take[1] of the rest at exit 2: midpoints between
    consecutive sorted confidences, so that no image sits near a threshold."""
    thresholds, waiting = [], torch.ones_like(confidences[0], dtype=torch.bool)
    for conf, k in zip(confidences, take):
        values = conf[waiting].sort(descending=True).values
        thresholds.append(float(values[k - 1] + values[k]) / 2)
        waiting &= conf < thresholds[-1]
    return thresholds


def simulated_exits(confidences: Sequence[torch.Tensor], thresholds: Sequence[float]) -> torch.Tensor:
    """The exit (0-based) of every image: the first whose confidence reaches its threshold, else the last."""
    exits = torch.full_like(confidences[0], len(confidences) - 1, dtype=torch.long)
    for k in reversed(range(len(confidences) - 1)):
        exits[confidences[k] >= thresholds[k]] = k
    return exits


# ------------------------------------------------------------------------------------------- checkpoint files
def official_release(path, state_dict: Dict[str, torch.Tensor], dynamic_threshold: torch.Tensor,
                     flops: Sequence[float] = (0.0002, 0.001, 0.0025)) -> str:
    """An official released DVT file (.pth.tar): model_state_dict, flops, anytime_classification,
    dynamic_threshold [59, 3], budgeted_batch_classification."""
    torch.save({"model_state_dict": state_dict, "flops": list(flops), "anytime_classification": [50.0, 60.0, 70.0],
                "dynamic_threshold": dynamic_threshold,
                "budgeted_batch_classification": [[0.001] * 59, [55.0] * 59]}, path)
    return str(path)


def random_dynamic_threshold(seed: int = 0) -> torch.Tensor:
    """[59, 3] like an official file's: two confidences per point (3 classes: in (1/3, 1)), growing with the point
    (the cheap points send more images out early, so their thresholds are lower), the last column -1e8."""
    g = torch.Generator().manual_seed(seed)
    t = (1 / 3 + (2 / 3) * torch.rand(59, 2, generator=g)).sort(dim=0).values
    return torch.cat([t, torch.full((59, 1), -1e8)], dim=1)
