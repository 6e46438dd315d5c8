"""EViT, token reorganisation (Liang et al., ICLR 2022), as a TokenAdapter on the shared backbone.

Between the attention and the MLP of the blocks in EVIT.LOCATIONS, every image keeps the k = ceil(rate * n)
patch tokens (n = current non-CLS tokens, a fused token included) that the CLS query attends to most
(attention averaged over heads), in descending attention order; with fusion, the others are summed into one
token weighted by their raw attention (not renormalised), appended last. Every image keeps the same count,
so the batch stays dense and really shrinks.

The keep rate actually used can change at run time (`set_keep_rate`, the official training call
`model(x, keep_rate)`): it applies at the reduction blocks only, and 1 disables reduction. Training follows
the official warm-up (`keep_rate_at`): full tokens until SHRINK_START_EPOCH, then a per-iteration cosine
down to KEEP_RATE over SHRINK_EPOCHS; evaluation during training uses the last training rate, as the
official loop does, and the test job the configured one.
"""

import math
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from vitadapt.config import register_config

from .build import MODEL_REGISTRY
from .tokens import TokenAdapter, TokenBatch
from .video import FrameViT, TimeSformer, XViT, check_undivided
from .vit import VisionTransformer, vit_kwargs

# Original id given to a fused token (0 is CLS, 1 + k patch k, -1 "no token" in padded id maps).
FUSED_ID = -2


class EViTReorganize(TokenAdapter):
    def __init__(self, keep_rate: float, fuse_token: bool):
        super().__init__()
        self.keep_rate = keep_rate
        self.fuse_token = fuse_token
        self.runtime_keep_rate: Optional[float] = None
        self.last_index: Optional[Tensor] = None  # [B, k] top-k positions in the incoming non-CLS sequence
        self.last_fused: Optional[Tensor] = None  # [B, 1, C]

    @property
    def rate(self) -> float:
        return self.keep_rate if self.runtime_keep_rate is None else self.runtime_keep_rate

    @property
    def needs_cls_attention(self) -> bool:
        """Only a block that may drop tokens reads the CLS attention row: at keep rate 1 (the official warm-up's
        first epochs too) the block is the dense one, in what it computes and in what it costs."""
        return self.keep_rate < 1 and self.rate < 1

    def after_attention(self, tokens: TokenBatch, cls_attention: Tensor, values: Tensor) -> TokenBatch:
        self.last_index = self.last_fused = None
        rate = self.rate
        if not self.needs_cls_attention:
            return tokens
        if tokens.is_packed or tokens.keep is not None:
            raise ValueError("EViT keeps the same number of tokens per image and needs dense tokens")
        n = tokens.x.shape[1] - 1
        k = math.ceil(rate * n)
        if k >= n:
            return tokens
        attention = cls_attention[:, :, 1:].mean(dim=1)  # [B, n], CLS query over the patch keys
        top = attention.topk(k, dim=1, largest=True, sorted=True).indices
        self.last_index = top
        kept = tokens.gather(torch.cat([torch.zeros_like(top[:, :1]), top + 1], dim=1))
        if not self.fuse_token:
            return kept
        inattentive = torch.ones_like(attention, dtype=torch.bool).scatter(1, top, torch.zeros_like(top, dtype=torch.bool))
        weights = (attention * inattentive).unsqueeze(-1).to(tokens.x.dtype)
        fused = (weights * tokens.x[:, 1:]).sum(dim=1, keepdim=True)
        self.last_fused = fused
        fused_id = torch.full_like(kept.ids[:, :1], FUSED_ID)
        return kept.replace(x=torch.cat([kept.x, fused], dim=1), ids=torch.cat([kept.ids, fused_id], dim=1))


def keep_rate_at(epoch: int, iteration: int, iters_per_epoch: int, base: float, shrink_start_epoch: float,
                 shrink_epochs: float) -> float:
    """The official keep-rate warm-up at global iteration `iteration` (= epoch * iters_per_epoch + i)."""
    if epoch < shrink_start_epoch:
        return 1.0
    if epoch >= shrink_start_epoch + shrink_epochs:
        return base
    progress = (iteration - iters_per_epoch * shrink_start_epoch) / (iters_per_epoch * shrink_epochs)
    return base + (1 - base) * (math.cos(math.pi * progress) + 1) / 2


@MODEL_REGISTRY.register()
class EViTVisionTransformer(VisionTransformer):
    """DeiT whose blocks in `locations` keep the most attended tokens (and fuse the rest); no extra parameters."""

    token_statistics = ("kept_tokens",)

    def __init__(self, keep_rate: float = 0.7, locations: Sequence[int] = (3, 6, 9), fuse_token: bool = True,
                 shrink_start_epoch: float = 0, shrink_epochs: float = 0, **vit_args):
        super().__init__(**vit_args)
        self.keep_rate, self.locations = keep_rate, list(locations)
        self.shrink_start_epoch, self.shrink_epochs = shrink_start_epoch, shrink_epochs
        for block in self.locations:
            self.blocks[block].adapter = EViTReorganize(keep_rate, fuse_token)

    @classmethod
    def from_config(cls, cfg) -> "EViTVisionTransformer":
        e = cfg.EVIT
        return cls(keep_rate=e.KEEP_RATE, locations=e.LOCATIONS, fuse_token=e.FUSE_TOKEN,
                   shrink_start_epoch=e.SHRINK_START_EPOCH, shrink_epochs=e.SHRINK_EPOCHS, **vit_kwargs(cfg))

    def reorganizers(self) -> List[EViTReorganize]:
        return [self.blocks[i].adapter for i in self.locations]

    def set_keep_rate(self, rate: Optional[float]) -> None:
        """The rate the reduction blocks use from now on; None restores the configured one."""
        for r in self.reorganizers():
            r.runtime_keep_rate = rate

    @property
    def current_keep_rate(self) -> float:
        runtime = self.reorganizers()[0].runtime_keep_rate if self.locations else None
        return self.keep_rate if runtime is None else runtime

    def set_progress(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        """Training hook, every iteration: the keep-rate warm-up."""
        self.set_keep_rate(keep_rate_at(epoch, iteration, iters_per_epoch, self.keep_rate,
                                        self.shrink_start_epoch, self.shrink_epochs))


# ------------------------------------------------------------------ EViT on video
def evit_kwargs(cfg) -> dict:
    e = cfg.EVIT
    return dict(keep_rate=e.KEEP_RATE, locations=e.LOCATIONS, fuse_token=e.FUSE_TOKEN,
                shrink_start_epoch=e.SHRINK_START_EPOCH, shrink_epochs=e.SHRINK_EPOCHS)


@MODEL_REGISTRY.register()
class EViTTimeSformer(EViTVisionTransformer, TimeSformer):
    """EViT on TimeSformer. Its decision is the CLS attention, so it follows the CLS: with joint space-time
    attention one CLS attends over the whole clip and EViT keeps the top keep-rate of all N * T patch tokens
    (fusing the rest into one token), so a clip may keep more of its busy frames; with space-only attention each
    frame's CLS keeps the top keep-rate of that frame's N patches. Divided attention needs the full [B, N, T]
    grid in every block and is refused."""

    def __init__(self, **kwargs):
        check_undivided("EViT", kwargs.get("attention_type"))
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg) -> "EViTTimeSformer":
        return cls(**evit_kwargs(cfg), **TimeSformer.config_kwargs(cfg))


class EViTFrameViT(EViTVisionTransformer, FrameViT):
    """XViT's per-frame backbone with EViT: each frame's CLS keeps the frame's most attended patches. The
    key/value shift aligns tokens by position; the fused token has none and takes zeros from its neighbours."""


@MODEL_REGISTRY.register()
class EViTXViT(XViT):
    """EViT on XViT (EViTFrameViT as the backbone, the temporal head unchanged); loads XViT checkpoints."""

    frame_model = EViTFrameViT
    frame_model_kwargs = staticmethod(evit_kwargs)

    def set_progress(self, epoch: int, iteration: int, iters_per_epoch: int) -> None:
        self.base_model.set_progress(epoch, iteration, iters_per_epoch)


EVIT_MODELS = ("EViTVisionTransformer", "EViTTimeSformer", "EViTXViT")


def add_evit_config(cfg) -> None:
    from fvcore.common.config import CfgNode

    cfg.EVIT = CfgNode()
    # Fraction of the non-CLS tokens kept at each reduction block (the paper's keep rate).
    cfg.EVIT.KEEP_RATE = 0.7
    # Blocks (0-based) that reduce tokens, between their attention and MLP.
    cfg.EVIT.LOCATIONS = [3, 6, 9]
    # Fuse the inattentive tokens into one token (weighted by their attention) instead of dropping them.
    cfg.EVIT.FUSE_TOKEN = True
    # Keep-rate warm-up in training: full tokens until this epoch, then a cosine to KEEP_RATE over SHRINK_EPOCHS
    # (the official training recipe: 10 and 100; its fine-tuning recipe: 0 and 0).
    cfg.EVIT.SHRINK_START_EPOCH = 10.0
    cfg.EVIT.SHRINK_EPOCHS = 100.0


def validate_evit_config(cfg) -> None:
    import logging

    from vitadapt.config import ConfigError

    if cfg.MODEL.NAME not in EVIT_MODELS:
        return
    e = cfg.EVIT
    if cfg.MODEL.NAME == "EViTTimeSformer":
        try:
            check_undivided("EViT", cfg.TIMESFORMER.ATTENTION_TYPE)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if not 0 < e.KEEP_RATE <= 1:
        raise ConfigError(f"EVIT.KEEP_RATE must be in (0, 1], got {e.KEEP_RATE}")
    if any(not 0 <= b < cfg.VIT.DEPTH for b in e.LOCATIONS) or len(set(e.LOCATIONS)) != len(e.LOCATIONS):
        raise ConfigError(f"EVIT.LOCATIONS {list(e.LOCATIONS)} must be distinct block indices in "
                          f"[0, VIT.DEPTH={cfg.VIT.DEPTH})")
    if e.SHRINK_START_EPOCH < 0 or e.SHRINK_EPOCHS < 0:
        raise ConfigError(f"EVIT.SHRINK_START_EPOCH ({e.SHRINK_START_EPOCH}) and EVIT.SHRINK_EPOCHS "
                          f"({e.SHRINK_EPOCHS}) must be >= 0")
    if cfg.VIT.TOKEN_EXECUTION != "packed":
        raise ConfigError(f"EViT keeps the same number of tokens in every image and runs dense; "
                          f"leave VIT.TOKEN_EXECUTION at packed, got '{cfg.VIT.TOKEN_EXECUTION}'")
    # Valid configs under which EViT drops nothing, or keeps a single attentive token: logged, not refused.
    log = logging.getLogger(__name__)
    if e.KEEP_RATE == 1 or not e.LOCATIONS:
        log.warning("EVIT.KEEP_RATE %g with EVIT.LOCATIONS %s: no block drops tokens, the model is a plain ViT",
                    e.KEEP_RATE, list(e.LOCATIONS))
        return
    n = (cfg.DATA.TEST_CROP_SIZE // cfg.VIT.PATCH_SIZE) ** 2  # non-CLS tokens, as EViTReorganize counts them
    for block in sorted(e.LOCATIONS):
        k = math.ceil(e.KEEP_RATE * n)
        if k <= 1:
            log.warning("EVIT.KEEP_RATE %g with EVIT.LOCATIONS %s: from block %d on, EViT keeps 1 attentive patch "
                        "token (of %d at DATA.TEST_CROP_SIZE %d)%s; the image is classified from almost nothing",
                        e.KEEP_RATE, list(e.LOCATIONS), block, n, cfg.DATA.TEST_CROP_SIZE,
                        " and the fused token" if e.FUSE_TOKEN else "")
            return
        if k < n:
            n = k + (1 if e.FUSE_TOKEN else 0)


register_config("EVIT", add_evit_config, validate_evit_config)


def official_to_config_opts(config: dict) -> List[str]:
    """KEY VALUE overrides for the official `EViT(...)` constructor (a golden file's `config['ctor']`)."""
    ctor = config["ctor"]
    rates = list(ctor["keep_rate"])
    rates = rates * ctor["depth"] if len(rates) == 1 else rates
    locations = [i for i, r in enumerate(rates) if r < 1]
    if len({rates[i] for i in locations}) > 1:
        raise ValueError(f"per-block keep rates differ ({rates}); vitadapt's EVIT.KEEP_RATE is one value")
    if ctor.get("representation_size") is not None or ctor.get("distilled"):
        raise ValueError("official EViT arguments not supported by vitadapt: representation_size / distilled")
    size = ctor["img_size"][0] if isinstance(ctor["img_size"], (list, tuple)) else ctor["img_size"]
    pairs = {"MODEL.NAME": "EViTVisionTransformer", "MODEL.NUM_CLASSES": ctor["num_classes"],
             "DATA.TRAIN_CROP_SIZE": size, "DATA.TEST_CROP_SIZE": size, "VIT.PATCH_SIZE": ctor["patch_size"],
             "VIT.IN_CHANS": ctor["in_chans"], "VIT.EMBED_DIM": ctor["embed_dim"], "VIT.DEPTH": ctor["depth"],
             "VIT.NUM_HEADS": ctor["num_heads"], "VIT.MLP_RATIO": float(ctor["mlp_ratio"]),
             "VIT.QKV_BIAS": bool(ctor["qkv_bias"]), "EVIT.KEEP_RATE": float(rates[locations[0]]) if locations else 1.0,
             "EVIT.LOCATIONS": locations, "EVIT.FUSE_TOKEN": bool(ctor["fuse_token"])}
    return [str(x) for kv in pairs.items() for x in kv]
