"""Helpers of tests/test_ats.py: an independent, slow reference of the official ATS, and synthetic goldens.

Nothing here imports vitadapt's model code. The reference is written from /work/shared/specs/ats.md §1.1-1.9:
one image at a time, explicit loops, official state_dict key names, plain softmax attention.
"""

import os
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden"))
ATS_GOLDENS = sorted((GOLDEN_ROOT / "ats").glob("*.pt"))
GOLDEN_DEV = GOLDEN_ROOT / "ats" / "golden_dev.pt"
NO_GOLDEN_REASON = (f"no ATS golden files under {GOLDEN_ROOT / 'ats'} (the default is <repo>/../shared/golden; "
                    "set VITADAPT_GOLDEN_DIR to the folder that holds ats/golden_dev.pt)")


# --------------------------------------------------------------------------------------------------------------
# The official per-image algorithm (§1.3-1.7)
# --------------------------------------------------------------------------------------------------------------

def ref_scores(cls_attn: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """§1.3. cls_attn [H, n] (the CLS query's attention row over the n live tokens), v [H, n, d].
    Returns the normalised scores of the n-1 patch tokens (CLS excluded), float32."""
    h, n, d = v.shape
    v_norm = v.permute(1, 0, 2).reshape(n, h * d).float().norm(dim=-1)  # heads concatenated
    s = (cls_attn.float().sum(dim=0) * v_norm)[1:]
    return s / s.sum()


def ref_sample(scores: torch.Tensor, m: int, n_zero: int = 0) -> List[int]:
    """§1.4-1.6 for one image. scores: [n-1] normalised scores of its live patch tokens (position p in the list);
    m: number of y samples (N0-1 officially); n_zero: zero-score slots that precede the image's tokens in the
    official layout (batch padding / dropped slots). Returns the kept positions in ascending significance."""
    scores = scores.float()
    # Ascending, by the official call (torch.sort, unstable): equal scores are rare but not only zeros (a very peaky
    # head leaves several at the smallest subnormal), and a rounding tie can pick one of them (see nearest_first).
    order = torch.sort(scores).indices.tolist()
    sorted_scores = torch.cat([torch.zeros(n_zero), scores[order]])  # zero-score slots sort first
    cdf = torch.cumsum(sorted_scores, dim=0)
    if len(scores) < 2 or not bool(cdf.max() - cdf.min() > 0):
        # Degenerate stage, where the official code crashes or returns negative indices (spec §5, edge_cases.txt):
        # vitadapt's documented rule keeps every live token.
        return order
    ncdf = (cdf - cdf.min()) / (cdf.max() - cdf.min())  # min-max normalised
    ys_start = float(ncdf[ncdf != 0].min())
    ys_start_t = torch.tensor(ys_start, dtype=torch.float32)
    pad = max(m - len(ncdf), 0)
    ncdf_p = np.concatenate([np.zeros(pad, dtype=np.float32), ncdf.numpy().astype(np.float32)])
    picks = []
    for k in range(m):
        kk = torch.tensor(float(k), dtype=torch.float32)
        mm = torch.tensor(float(m - 1), dtype=torch.float32)
        if m == 1:
            y = torch.tensor(1.0)
        else:  # the official formula, as written (create_ys)
            y = ys_start_t + ((kk / mm) * mm - ys_start_t * kk) / mm
        dist = np.abs(np.float32(y.item()) - ncdf_p)
        best = 0
        for j in range(1, len(dist)):  # nearest CDF entry, first index on ties
            if dist[j] < dist[best]:
                best = j
        picks.append(best - pad)
    sorted_pos = sorted(set(picks))  # dedup: a token picked several times is kept once
    assert all(p >= n_zero for p in sorted_pos), "a zero-score slot was picked"
    return [order[p - n_zero] for p in sorted_pos]


def official_budget_ok(num_tokens: float, width: int) -> bool:
    """§1.2: the official clamp; the official code runs only when the clamped budget equals the input width."""
    n = num_tokens
    if n > width:
        n = width
    if n <= 1.0:
        n *= width
    if n < 8:
        n = 8
    n = round(n)
    if width < n:
        n = width
    return n == width


class OfficialCrash(RuntimeError):
    pass


# --------------------------------------------------------------------------------------------------------------
# The official model (§1.1, 1.7-1.9), one image at a time
# --------------------------------------------------------------------------------------------------------------

def _ln(x, sd, prefix):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + ".weight"], sd[prefix + ".bias"], eps=1e-6)


def _linear(x, sd, prefix):
    return F.linear(x, sd[prefix + ".weight"], sd.get(prefix + ".bias"))


@torch.no_grad()
def ref_forward(config: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor, mode: str,
                samples: Optional[Callable[[int], int]] = None):
    """The official ATS ViT on `images`. mode "alone": every image run alone, DROP_TOKENS True; "batch_max": the
    batched DROP_TOKENS True run (zero-score padding up to the batch's longest image); "full": DROP_TOKENS False
    (zero-score slots up to N0). samples(n_live) -> M overrides the official M = N0-1 (vitadapt's budgets; the
    official budget check is then skipped). Returns (logits [B, classes], num_kept [S, B], kept ids per stage: list of
    [B, n_out] long, CLS then ascending significance, -1 padding)."""
    p, heads = config["patch_size"], config["num_heads"]
    n0 = (config["img_size"] // p) ** 2 + 1
    xs, ids = [], []
    for img in images:
        x = F.conv2d(img[None], sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=p)
        x = torch.cat([sd["cls_token"][0], x.flatten(2).transpose(1, 2)[0]]) + sd["pos_embed"][0]
        xs.append(x)
        ids.append(torch.arange(n0))
    num_kept, kept_ids = [], []
    for i in range(config["depth"]):
        pre = f"blocks.{i}."
        ats = i in config["ats_blocks"]
        if ats:
            widths = {"alone": [len(x) for x in xs], "batch_max": [max(len(x) for x in xs)] * len(xs),
                      "full": [n0] * len(xs)}[mode]
            for w in set(widths) if samples is None else ():
                if not official_budget_ok(config["num_tokens"][i], w):
                    raise OfficialCrash(f"block {i}: budget {config['num_tokens'][i]} at width {w}")
        stage_kept = []
        for b, x in enumerate(xs):
            n, c = x.shape
            qkv = _linear(_ln(x, sd, pre + "norm1"), sd, pre + "attn.qkv").reshape(n, 3, heads, c // heads)
            q, k, v = qkv.permute(1, 2, 0, 3)  # [H, n, d] each
            attn = ((q @ k.transpose(-2, -1)) * (c // heads) ** -0.5).softmax(dim=-1)
            out = (attn @ v).transpose(0, 1).reshape(n, c)
            x = x + _linear(out, sd, pre + "attn.proj")
            if ats:
                m = n0 - 1 if samples is None else samples(n)
                kept = ref_sample(ref_scores(attn[:, 0, :], v), m, widths[b] - n)
                sel = torch.tensor([0] + [1 + j for j in kept])
                x, ids[b] = x[sel], ids[b][sel]
                stage_kept.append(ids[b])
            h = F.gelu(_linear(_ln(x, sd, pre + "norm2"), sd, pre + "mlp.fc1"))
            xs[b] = x + _linear(h, sd, pre + "mlp.fc2")
        if ats:
            width = max(len(t) for t in stage_kept)
            kept_ids.append(torch.stack([F.pad(t, (0, width - len(t)), value=-1) for t in stage_kept]))
            num_kept.append(torch.tensor([len(t) for t in stage_kept]))
    logits = torch.stack([_linear(_ln(x, sd, "norm")[0], sd, "head") for x in xs])
    return logits, torch.stack(num_kept), kept_ids


def official_config(img_size=112, patch_size=16, num_classes=10, embed_dim=96, depth=12, num_heads=3,
                    mlp_ratio=4.0, qkv_bias=True, ats_blocks=(3, 4, 5, 6, 7, 8, 9, 10, 11), num_tokens=None,
                    drop_tokens=True) -> dict:
    """All 19 arguments of the official ViT.__init__ (golden['config'])."""
    return dict(img_size=img_size, patch_size=patch_size, in_channels=3, num_classes=num_classes,
                embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                qk_scale=None, representation_size=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                hybrid_backbone=None, norm_layer=None, ats_blocks=list(ats_blocks),
                num_tokens=list(num_tokens) if num_tokens is not None else [197] * depth, drop_tokens=drop_tokens)


def official_state_dict(config: dict, seed: int) -> Dict[str, torch.Tensor]:
    """Weights in the official layout, drawn with the golden harness's recipe (vitadapt.models.synthetic.sharpen_
    reproduces it); `attn.out_zero_mask` zeros for every ATS block, as the official model has."""
    from vitadapt.models import VisionTransformer
    from vitadapt.models.synthetic import sharpen_

    torch.manual_seed(seed)
    model = VisionTransformer(img_size=config["img_size"], patch_size=config["patch_size"],
                              num_classes=config["num_classes"], embed_dim=config["embed_dim"], depth=config["depth"],
                              num_heads=config["num_heads"], mlp_ratio=config["mlp_ratio"], qkv_bias=config["qkv_bias"])
    sharpen_(model, seed=seed)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for b in config["ats_blocks"]:
        sd[f"blocks.{b}.attn.out_zero_mask"] = torch.zeros(1, config["embed_dim"])
    return sd


def synthetic_golden(config: dict, sd: Dict[str, torch.Tensor], images: torch.Tensor) -> dict:
    """A golden file as the ATS harness writes it (the keys check_ats reads), from the reference above."""
    batched = "batch_max" if config["drop_tokens"] else "full"
    logits, num_kept, kept = ref_forward(config, sd, images, batched)
    alone = [ref_forward(config, sd, images[i:i + 1], "alone" if config["drop_tokens"] else "full")
             for i in range(images.shape[0])]
    return {"config": config, "state_dict": sd, "input": images, "logits": logits, "num_kept": num_kept,
            "ats_blocks": list(config["ats_blocks"]),
            "stages": [{"block": b, "kept_orig_ids": ids} for b, ids in zip(config["ats_blocks"], kept)],
            "logits_bs1": torch.cat([a[0] for a in alone]), "num_kept_bs1": torch.cat([a[1] for a in alone], dim=1)}


def kept_sets(ids: torch.Tensor) -> List[List[int]]:
    return [sorted(i for i in row.tolist() if i >= 0) for row in ids]


def build_official(config: dict, sd: Dict[str, torch.Tensor], execution: str, score_padding: str,
                   extra: Sequence[str] = ()):
    """The vitadapt model for an official config, in eval mode, with the official weights loaded."""
    from vitadapt.config import load_config
    from vitadapt.models import build_model
    from vitadapt.models.ats import convert_official_state_dict, official_to_config_opts
    from vitadapt.models.convert import LoadReport, load_into_model

    opts = official_to_config_opts(config) + ["NUM_GPUS", "0", "VIT.TOKEN_EXECUTION", execution,
                                              "ATS.SCORE_PADDING", score_padding] + list(extra)
    model = build_model(load_config("", opts)).eval()
    load_into_model(model, convert_official_state_dict(sd), LoadReport("test", "official layout"))
    return model
