"""ATS, Adaptive Token Sampling (Fayyaz et al., ECCV 2022), as a TokenAdapter on the shared backbone.

After a block's attention, every patch token j gets the significance score
    s_j = (sum over heads of the CLS attention to j) * ||v_j||   (v concatenated over heads), normalised;
the scores are sorted ascending, their cumulative sum min-max normalised to a CDF on [0, 1], and M evenly
spaced values y_0..y_{M-1} on [min non-zero CDF, 1] each pick the token whose CDF is nearest (first on
ties). A token picked several times is kept once; CLS is always kept. Kept tokens leave the block in the
official order: CLS, then ascending significance. M is N0 - 1 (the initial patch count) at every stage,
as in the official code, unless a budget K smaller than the stage's input asks for fewer (M = K - 1).

Per-image semantics (SCORE_PADDING "none", the default): an image's tokens and logits are what the
official code gives for that image alone with DROP_TOKENS True, whatever its batch-mates. The official
batched run differs only in the zero-score slots that padding adds in front of the CDF; "batch_max"
(DROP_TOKENS True, batched) and "full" (DROP_TOKENS False) reproduce those runs exactly.

Degenerate stages, where the official code crashes or returns negative indices (its issues #3, #7): a
score that is NaN or infinite counts as 0; an image whose CDF has no spread (fewer than 2 patch tokens,
all scores equal to zero) keeps all its tokens at that stage; a budget below 2 is raised to 2 (CLS plus
the most significant token).
"""

import logging
import re
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vitadapt.config import register_config

from .build import MODEL_REGISTRY
from .tokens import TokenAdapter, TokenBatch
from .video import FrameViT, TimeSformer, XViT
from .vit import VisionTransformer, vit_kwargs

logger = logging.getLogger(__name__)

SCORE_PADDINGS = ("none", "batch_max", "full")


class AdaptiveTokenSampler(TokenAdapter):
    needs_cls_attention = True

    def __init__(self, budget: float = 0.0, score_padding: str = "none"):
        super().__init__()
        if score_padding not in SCORE_PADDINGS:
            raise ValueError(f"score_padding must be one of {SCORE_PADDINGS}, got '{score_padding}'")
        self.budget = budget
        self.score_padding = score_padding
        self.last_num_kept: Optional[Tensor] = None  # [B], CLS included
        self._last_selection = None  # (ids, index, valid) of the last forward, read by last_kept_ids
        self._steps = None  # see _sample_steps

    def num_samples(self, n_live: Tensor, num_initial: int) -> Tensor:
        """[B] number M of inverse-transform samples for images with n_live tokens (CLS included)."""
        m = torch.full_like(n_live, num_initial - 1)
        if self.budget > 0:
            k = torch.round(self.budget * n_live.double()).long() if self.budget <= 1 else \
                torch.full_like(n_live, int(round(self.budget)))
            k = k.clamp(min=2)
            m = torch.where(k < n_live, k - 1, m)  # a budget at or above the input keeps the official M
        return m

    def after_attention(self, tokens: TokenBatch, cls_attention: Tensor, values: Tensor) -> TokenBatch:
        index, valid = self.sample(tokens, cls_attention, values)
        kept = tokens.select(index, valid)
        self.last_num_kept = kept.num_live()
        self._last_selection = (tokens.padded(tokens.ids), index, valid)
        return kept

    @property
    def last_kept_ids(self) -> Optional[Tensor]:
        """[B, K] original ids of the tokens the last forward kept, official order, -1 = none (computed when asked
        for: the forward itself does not need it)."""
        if self._last_selection is None:
            return None
        ids, index, valid = self._last_selection
        rank = torch.argsort((~valid).to(torch.uint8), dim=1, stable=True)[:, :int(valid.sum(dim=1).max())]
        return ids.gather(1, index.gather(1, rank)).masked_fill(~valid.gather(1, rank), -1)

    @torch.no_grad()
    def sample(self, tokens: TokenBatch, cls_attention: Tensor, values: Tensor):
        """(index [B, N], valid [B, N]): every padded position in the official order, CLS first, then the patch
        slots by ascending significance, and which of them are kept.

        Written for few operators (at batch 1 their fixed cost is what a selection costs): where every slot holds
        a live token (dense tokens, packed images of equal lengths) the masking of dead slots is skipped, and
        without a budget the number of samples is the same for every image."""
        b, n = cls_attention.shape[0], cls_attention.shape[-1]
        if n < 3:  # at most one patch token per image: no CDF has a spread, every image keeps all its tokens
            return torch.arange(n, device=cls_attention.device).expand(b, n), tokens.live_mask()
        live = None if tokens.all_live else tokens.live_mask()[:, 1:]  # [B, N-1] patch slots holding a live token
        # ||v_j|| over the heads' values concatenated: one reduction over (heads, head_dim), no copy of v.
        v_norm = torch.linalg.vector_norm(_float(values).transpose(1, 2), dim=(2, 3))
        scores = (_float(cls_attention).sum(dim=1) * v_norm)[:, 1:]
        # Attention weights and norms are >= 0: only NaN and inf (no finite negative) need replacing.
        scores = torch.nan_to_num(scores, nan=0.0, posinf=0.0, neginf=0.0)
        if live is not None:
            scores = scores * live
        scores = scores / scores.sum(dim=1, keepdim=True).clamp(min=torch.finfo(scores.dtype).tiny)

        if live is None:
            sorted_scores, order = torch.sort(scores, dim=1)
            cdf = torch.cumsum(sorted_scores, dim=1)
            first_live = cdf[:, :1]
        else:  # dead slots sort first (key -1) and are never picked (their CDF is -inf below)
            sorted_scores, order = torch.sort(torch.where(live, scores, -1.0), dim=1)
            sorted_live = sorted_scores >= 0
            cdf = torch.cumsum(sorted_scores.clamp(min=0), dim=1)
            n_live = live.sum(dim=1)
            first_live = cdf.gather(1, (n - 1 - n_live).clamp(max=n - 2)[:, None])
        # The official CDF minimum is 0 when zero-score (padding / dropped) slots precede this image's tokens.
        cdf_min = first_live if self.score_padding == "none" else \
            torch.where(self.zero_score_slots(tokens)[:, None] > 0, 0.0, first_live)
        spread = cdf[:, -1:] - cdf_min
        ncdf = (cdf - cdf_min) / spread.clamp(min=torch.finfo(cdf.dtype).tiny)
        # No spread (all scores zero, or one patch token) leaves every ncdf at 0: such an image keeps all its tokens
        # at this stage. Otherwise the last ncdf is 1 (> 0) and ncdf <= 1, so the 1 filled in for zeros below leaves
        # the official start, the smallest non-zero ncdf, unchanged; without a non-zero ncdf it is 1.
        degenerate = spread == 0
        nonzero = ncdf != 0
        if live is not None:
            degenerate = degenerate | (n_live[:, None] < 2)
            nonzero = nonzero & sorted_live
        ys_start = torch.where(nonzero, ncdf, 1.0).min(dim=1, keepdim=True).values

        picks = nearest_first(ncdf if live is None else torch.where(sorted_live, ncdf, -torch.inf),
                              self.sample_points(tokens, ys_start))
        picked = torch.zeros_like(order, dtype=torch.bool).scatter_(1, picks, 1) | degenerate
        if live is not None:
            picked = picked & sorted_live
        index = F.pad(order + 1, (1, 0), value=0)  # CLS first, kept
        valid = F.pad(picked, (1, 0), value=True)
        return index, valid

    def sample_points(self, tokens: TokenBatch, ys_start: Tensor) -> Tensor:
        """[B, M] the M evenly spaced values on [ys_start, 1] (M per image from num_samples; an image with fewer
        samples than the batch's most repeats its last value)."""
        if self.budget > 0:
            m = self.num_samples(tokens.num_live(), tokens.num_initial)[:, None]  # [B, 1]
            k = torch.arange(int(m.max()), device=ys_start.device, dtype=ys_start.dtype)[None, :]
            k = torch.minimum(k, (m - 1).to(ys_start.dtype))
            last = (m - 1).clamp(min=1).to(ys_start.dtype)
        else:  # the official M = N0 - 1, the same for every image (a Python number divides exactly as a tensor)
            m = tokens.num_initial - 1
            last = max(m - 1, 1)
            k, k_scaled = self._sample_steps(m, last, ys_start)
            ys = (k_scaled - ys_start * k) / last + ys_start
            return ys if m > 1 else torch.ones_like(ys)
        # The official arithmetic, kept as written so that nearest-CDF ties resolve identically.
        ys = (k / last * last - ys_start * k) / last + ys_start
        return torch.where(m == 1, 1.0, ys)

    def _sample_steps(self, m: int, last: int, like: Tensor):
        """(k, k / last * last) for k = 0..m-1, the part of the official sample points that does not depend on the
        image, computed once per (m, device, dtype)."""
        key = (m, last, like.device, like.dtype)
        if self._steps is None or self._steps[0] != key:
            k = torch.arange(m, device=like.device, dtype=like.dtype)
            self._steps = (key, k, k / last * last)
        return self._steps[1], self._steps[2]

    def zero_score_slots(self, tokens: TokenBatch) -> Tensor:
        """[B] zero-score slots the official layout puts before this image's tokens (see the module doc)."""
        n_live = tokens.num_live()
        if self.score_padding == "none":
            return torch.zeros_like(n_live)
        width = tokens.num_initial if self.score_padding == "full" else n_live.max()
        return width - n_live


def _float(x: Tensor) -> Tensor:
    return x if x.dtype == torch.float32 else x.float()


def nearest_first(cdf: Tensor, ys: Tensor) -> Tensor:
    """For every y, the index of the nearest entry of the non-decreasing rows of `cdf`, the first one on ties: the
    official argmin over the float32 distances |y - cdf|, rounding included, by binary search instead of a [B, M, N]
    table. Rounding makes distances tie where entries lie closer together than y's rounding unit (patch scores
    below about 1e-8 of the total); argmin then takes the first of them. Such a tie is detected on the entry before
    each pick, and only then is the table computed."""
    # Entry i - 1 of a row is entry i of the row with -inf in front: no index arithmetic, and "no entry before" is
    # an infinite distance.
    shifted = F.pad(cdf, (1, 0), value=-torch.inf)
    upper = torch.searchsorted(cdf, ys).clamp_(max=cdf.shape[1] - 1)  # the first entry >= y, or the last
    below, above = shifted.gather(1, upper), cdf.gather(1, upper)
    # below < y <= above, so both distances are >= 0 as written (no abs). Past either end the comparison is false
    # (nothing below, or nothing >= y), which picks the last or first entry: argmin's value either way.
    nearest = torch.where(ys - below <= above - ys, below, above)
    picks = torch.searchsorted(cdf, nearest)  # the first index holding that value
    # The rounded distance falls, then rises along a row, so entries tied with a pick sit right before it, on y's
    # lower side (a pick above y was strictly nearer than the entry before it).
    if bool((ys - shifted.gather(1, picks) == ys - nearest).any()):
        picks = (ys[:, :, None] - cdf[:, None, :]).abs_().argmin(dim=2)
    return picks


@MODEL_REGISTRY.register()
class ATSVisionTransformer(VisionTransformer):
    """DeiT with ATS after the attention of the blocks in `ats_blocks`; parameter-free, loads DeiT weights."""

    token_statistics = ("kept_tokens",)

    def __init__(self, ats_blocks: Sequence[int] = (), budgets: Sequence[float] = (), score_padding: str = "none",
                 **vit_args):
        super().__init__(**vit_args)
        budgets = list(budgets) or [0.0]
        if len(budgets) == 1:
            budgets = budgets * len(ats_blocks)
        if len(budgets) != len(ats_blocks):
            raise ValueError(f"{len(budgets)} budgets for {len(ats_blocks)} ATS blocks")
        self.ats_blocks = list(ats_blocks)
        for block, budget in zip(self.ats_blocks, budgets):
            self.blocks[block].adapter = AdaptiveTokenSampler(budget, score_padding)

    @classmethod
    def from_config(cls, cfg) -> "ATSVisionTransformer":
        return cls(ats_blocks=cfg.ATS.BLOCKS, budgets=cfg.ATS.BUDGETS, score_padding=cfg.ATS.SCORE_PADDING,
                   **vit_kwargs(cfg))

    def adapt_official_state_dict(self, sd: dict, report) -> dict:
        """Called by every checkpoint load (vitadapt.models.convert.load_into_model): official ATS files carry
        an all-zero `attn.out_zero_mask` per ATS block, which this model does not have."""
        return convert_official_state_dict(sd, report, self.ats_blocks)

    def samplers(self) -> List[AdaptiveTokenSampler]:
        return [self.blocks[i].adapter for i in self.ats_blocks]

    def forward(self, images: Tensor) -> Tensor:
        logits = super().forward(images)
        # [stages, B] kept tokens per image (CLS included) at every ATS stage.
        self.last_num_kept = torch.stack([s.last_num_kept for s in self.samplers()]) if self.ats_blocks else None
        return logits


# ------------------------------------------------------------------ ATS on video (spec video.md 3.4)
def ats_kwargs(cfg) -> dict:
    return dict(ats_blocks=cfg.ATS.BLOCKS, budgets=cfg.ATS.BUDGETS, score_padding=cfg.ATS.SCORE_PADDING)


VIDEO_SAMPLINGS = {"per_frame": "frame", "space_time": "clip"}  # ATS.VIDEO_SAMPLING -> TokenAdapter.video_scope


@MODEL_REGISTRY.register()
class ATSTimeSformer(ATSVisionTransformer, TimeSformer):
    """ATS on TimeSformer, the same sampler in the same blocks:
    - joint space-time attention: one sequence per clip, so ATS is the image algorithm on the flattened 1 + N * T
      tokens, the single CLS scoring all of them and M = N * T inverse-transform samples;
    - space only: one sequence per frame, so each frame's CLS scores its own N tokens (M = N per frame) and every
      frame keeps its own count; the frames' CLS tokens are averaged at the end, as the official head does;
    - divided space-time attention (spec video.md 3.4), after the spatial attention of the block, tokens kept in
      place and dropped by mask (DividedSpaceTimeBlock): `video_sampling` "per_frame" samples each frame with its
      CLS copy's attention row (M = N per frame; a dropped token then also leaves the temporal attention of its
      location), "space_time" samples all N * T tokens at once with the frame-averaged CLS attention (M = N * T).
    A clip's tokens never depend on its batch-mates (ATS.SCORE_PADDING none)."""

    def __init__(self, video_sampling: str = "per_frame", **kwargs):
        super().__init__(**kwargs)
        if video_sampling not in VIDEO_SAMPLINGS:
            raise ValueError(f"video_sampling must be one of {tuple(VIDEO_SAMPLINGS)}, got '{video_sampling}'")
        self.video_sampling = video_sampling
        for sampler in self.samplers():
            sampler.video_scope = VIDEO_SAMPLINGS[video_sampling]

    @classmethod
    def from_config(cls, cfg) -> "ATSTimeSformer":
        return cls(video_sampling=cfg.ATS.VIDEO_SAMPLING, **ats_kwargs(cfg), **TimeSformer.config_kwargs(cfg))

    def adapt_official_state_dict(self, sd: dict, report) -> dict:
        """TimeSformer's conversions (prefix, inflation), then ATS's (official files' out_zero_mask)."""
        return ATSVisionTransformer.adapt_official_state_dict(self, TimeSformer.adapt_official_state_dict(
            self, sd, report), report)


class ATSFrameViT(ATSVisionTransformer, FrameViT):
    """XViT's per-frame backbone with ATS: the image algorithm on the B * T frames, each frame's CLS scoring its
    own tokens (what the ATS code, built on XViT's, does). The key/value shift then aligns tokens by their
    original position, so a dropped neighbour contributes zeros (TemporalShift)."""


@MODEL_REGISTRY.register()
class ATSXViT(XViT):
    """ATS on XViT (ATSFrameViT as the backbone, the temporal head unchanged); loads XViT checkpoints."""

    frame_model = ATSFrameViT
    frame_model_kwargs = staticmethod(ats_kwargs)

    def forward(self, video: Tensor) -> Tensor:
        logits = super().forward(video)
        self.last_num_kept = self.base_model.last_num_kept  # [stages, B * T], per frame
        return logits


ATS_MODELS = ("ATSVisionTransformer", "ATSTimeSformer", "ATSXViT")


def add_ats_config(cfg) -> None:
    from fvcore.common.config import CfgNode

    cfg.ATS = CfgNode()
    # Blocks (0-based) after whose attention ATS samples tokens; the official DeiT-S layout is 3..11.
    cfg.ATS.BLOCKS = [3, 4, 5, 6, 7, 8, 9, 10, 11]
    # Budget K per stage (one value for all stages, or one per block in BLOCKS): > 1 is a token count (CLS
    # included), <= 1 a ratio of the stage's input tokens, 0 no budget (the official code's only working case).
    cfg.ATS.BUDGETS = [0.0]
    # "none": per-image results (= the official code on one image at a time); "batch_max" / "full": the official
    # batched run with DROP_TOKENS True / False, whose results depend on the batch.
    cfg.ATS.SCORE_PADDING = "none"
    # TimeSformer with divided space-time attention: "per_frame" (each frame's CLS copy samples its frame) or
    # "space_time" (the frame-averaged CLS attention samples all N * T tokens). Joint attention always samples the
    # whole clip (one sequence); space only and XViT always per frame (one sequence per frame).
    cfg.ATS.VIDEO_SAMPLING = "per_frame"


def validate_ats_config(cfg) -> None:
    from vitadapt.config import ConfigError

    if cfg.MODEL.NAME not in ATS_MODELS:
        return
    a = cfg.ATS
    if a.VIDEO_SAMPLING not in VIDEO_SAMPLINGS:
        raise ConfigError(f"ATS.VIDEO_SAMPLING must be one of {', '.join(VIDEO_SAMPLINGS)}, got '{a.VIDEO_SAMPLING}'")
    per_frame_only = cfg.MODEL.NAME == "ATSXViT" or (cfg.MODEL.NAME == "ATSTimeSformer"
                                                     and cfg.TIMESFORMER.ATTENTION_TYPE == "space_only")
    if a.VIDEO_SAMPLING == "space_time" and per_frame_only:
        raise ConfigError(f"ATS.VIDEO_SAMPLING space_time needs a sequence spanning the clip; {cfg.MODEL.NAME} "
                          f"attends within each frame, so ATS samples per frame there (set per_frame)")
    if any(not 0 <= b < cfg.VIT.DEPTH for b in a.BLOCKS) or len(set(a.BLOCKS)) != len(a.BLOCKS):
        raise ConfigError(f"ATS.BLOCKS {list(a.BLOCKS)} must be distinct block indices in [0, VIT.DEPTH={cfg.VIT.DEPTH})")
    if len(a.BUDGETS) not in (1, len(a.BLOCKS)):
        raise ConfigError(f"ATS.BUDGETS {list(a.BUDGETS)} needs 1 value or one per ATS.BLOCKS entry "
                          f"({len(a.BLOCKS)}: {list(a.BLOCKS)}), got {len(a.BUDGETS)}")
    if any(b < 0 for b in a.BUDGETS):
        raise ConfigError(f"ATS.BUDGETS must be >= 0, got {list(a.BUDGETS)}")
    if a.SCORE_PADDING not in SCORE_PADDINGS:
        raise ConfigError(f"ATS.SCORE_PADDING must be one of {SCORE_PADDINGS}, got '{a.SCORE_PADDING}'")
    _warn_degenerate_ats(cfg)


def _warn_degenerate_ats(cfg) -> None:
    """Valid configs under which ATS does nothing, or keeps a single patch token: logged, not refused (a study
    may want them)."""
    a = cfg.ATS
    if not a.BLOCKS:
        logger.warning("ATS.BLOCKS is empty: no block samples tokens, the model is a plain ViT")
        return
    if 1.0 in a.BUDGETS:
        logger.warning("ATS.BUDGETS %s: a budget of 1 is read as the ratio 1.0 of a stage's tokens (budgets <= 1 "
                       "are ratios), which limits nothing; write 0 for no budget, or a token count >= 2",
                       list(a.BUDGETS))
    # Upper bound on the tokens (CLS included) each stage keeps, as num_samples computes it, at the test size.
    n = (cfg.DATA.TEST_CROP_SIZE // cfg.VIT.PATCH_SIZE) ** 2 + 1
    budgets = list(a.BUDGETS) * len(a.BLOCKS) if len(a.BUDGETS) == 1 else list(a.BUDGETS)
    for block, budget in sorted(zip(a.BLOCKS, budgets)):
        if budget > 0:
            k = max(round(budget * n) if budget <= 1 else round(budget), 2)
            n = min(n, k)
        if n <= 2:
            logger.warning("ATS.BUDGETS %s with ATS.BLOCKS %s: from block %d on, ATS keeps at most CLS and 1 patch "
                           "token (at DATA.TEST_CROP_SIZE %d); the image is classified from a single token",
                           list(a.BUDGETS), list(a.BLOCKS), block, cfg.DATA.TEST_CROP_SIZE)
            return


def official_to_config_opts(config: dict) -> List[str]:
    """KEY VALUE overrides for the official ATS `ViT(...)` constructor arguments (a golden file's `config`)."""
    unsupported = {k: config[k] for k in ("qk_scale", "representation_size", "hybrid_backbone", "norm_layer")
                   if config.get(k) is not None}
    if unsupported:
        raise ValueError(f"official ATS arguments not supported by vitadapt: {unsupported}")
    # An official run that finishes had every budget clamped to its stage's input (anything else crashes, or is
    # raised to at least 8 and then clamped): in effect, no budget.
    budgets = [0.0]
    pairs = {"MODEL.NAME": "ATSVisionTransformer", "MODEL.NUM_CLASSES": config["num_classes"],
             "DATA.TRAIN_CROP_SIZE": config["img_size"], "DATA.TEST_CROP_SIZE": config["img_size"],
             "VIT.PATCH_SIZE": config["patch_size"], "VIT.IN_CHANS": config["in_channels"],
             "VIT.EMBED_DIM": config["embed_dim"], "VIT.DEPTH": config["depth"], "VIT.NUM_HEADS": config["num_heads"],
             "VIT.MLP_RATIO": float(config["mlp_ratio"]), "VIT.QKV_BIAS": bool(config["qkv_bias"]),
             "ATS.BLOCKS": list(config["ats_blocks"]), "ATS.BUDGETS": budgets,
             "ATS.SCORE_PADDING": "batch_max" if config["drop_tokens"] else "full"}
    return [str(x) for kv in pairs.items() for x in kv]


_MASK = re.compile(r"^blocks\.(\d+)\.attn\.out_zero_mask$")


def convert_official_state_dict(sd: dict, report=None, ats_blocks: Optional[Sequence[int]] = None) -> dict:
    """Drops the official ATS blocks' `attn.out_zero_mask` (an all-zero, unused parameter, spec §2.2) and says so
    in `report`; refuses non-zero ones, which no official model has: their weights would not be what they seem.
    With `ats_blocks`, warns when the file's ATS blocks (those with a mask) are not the model's ATS.BLOCKS."""
    from .convert import CheckpointMismatchError

    masks = [k for k in sd if _MASK.match(k)]
    if not masks:
        return sd
    source = report.source if report is not None else "state_dict"
    nonzero = [k for k in masks if sd[k].count_nonzero()]  # NaN counts as non-zero
    if nonzero:
        raise CheckpointMismatchError(f"{source}: {', '.join(nonzero)} is not all zeros; the official ATS model "
                                      "keeps it at zero, so this is not an official ATS checkpoint")
    blocks = sorted(int(_MASK.match(k).group(1)) for k in masks)
    if report is not None:
        report.converted.append(f"dropped attn.out_zero_mask of blocks {blocks} (all zeros, unused)")
    if ats_blocks is not None and blocks != sorted(ats_blocks):
        logger.warning("%s was trained with ATS at blocks %s (its out_zero_mask keys), but ATS.BLOCKS is %s: the "
                       "weights load (ATS has none), the token sampling differs from training", source, blocks,
                       sorted(ats_blocks))
    return {k: v for k, v in sd.items() if k not in masks}


register_config("ATS", add_ats_config, validate_ats_config)
