"""A-ViT, adaptive token halting (Yin et al., CVPR 2022), on the shared backbone.

After every block each live token k gets a halting score h = sigmoid(GATE_SCALE * y[0] - GATE_CENTER) from
channel 0 of its block output y (residual included; there are no extra parameters). Its cumulative score c
grows by h, and once c > 1 - HALTING_EPS the token halts: it has run N_k blocks (its depth) and leaves. The
last block halts every token. A token's feature is the ACT mixture sum_{l<N_k} h_l y_l + R_k y_{N_k} with the
remainder R_k = 1 - sum_{l<N_k} h_l; the classifier reads the CLS token's mixture (CLS halts too).

The official code keeps halted tokens in the tensor (zeroed, masked as keys), so it costs as much as DeiT.
Here a halted token leaves the TokenBatch: masked execution marks it (the official computation, the parity
reference), packed execution removes it, so later blocks run on live tokens only and an image whose tokens
halt early costs fewer MACs and less time, whatever its batch-mates do.

Training losses (`auxiliary_losses`, added to the task loss by the trainer):
* ponder = PONDER_WEIGHT * mean over all tokens (CLS included) of rho_k = N_k + R_k; its gradient flows
  through the remainders only.
* prior = PRIOR_WEIGHT * KL(target || q), q the per-block halting scores normalised to sum 1 and clamped to
  [0.01, 0.99]; the target is N(arange(depth); PRIOR_TARGET_DEPTH, 1). KLDivLoss 'batchmean' on a 1-D input
  divides by the depth.

AVIT.OFFICIAL_PRIOR True (the default) reproduces the official prior with its quirks:
* the per-block score is mean(h[1:]), which slices the *batch* (NVlabs/A-ViT#4): every image but the first,
  every token, CLS and halted tokens included. A one-image batch gives NaN, and the prior is skipped.
* A halted token's h comes from the output the official code still computes for it: its zeroed row attends,
  with the bias-only query, to the live keys, and the MLP sees a zero input. That output is the same for all
  halted tokens of an image, so vitadapt computes it once per image (`halted_token_output`), with the same
  gradients: the official zeroing goes through `.data`, so gradients reach the token's last real output
  through the residual. Stochastic depth and dropout are not applied to it.
* The target is scaled so that its first PRIOR_TARGET_DEPTH entries sum to 0.98: at depth 12 and target 8 it
  sums to 3.26, not 1.
* The prior is added only when it is > 0.
AVIT.OFFICIAL_PRIOR False is the corrected prior: the mean over the patch tokens of every image (a halted
token counts 0), a target normalised to 1, always added.
"""

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from vitadapt.config import ConfigError, register_config

from .build import MODEL_REGISTRY
from .tokens import TokenAdapter, TokenBatch
from .video import FrameViT, TimeSformer, XViT
from .vit import Block, VisionTransformer, vit_kwargs

logger = logging.getLogger(__name__)

# Official target recipe: the first `target_depth` entries of the unnormalised target sum to 1 - 0.02.
OFFICIAL_PRIOR_BUFFER = 0.02
PRIOR_CLAMP = (0.01, 0.99)


def prior_target(depth: int, target_depth: int, official: bool) -> Tensor:
    """The halting-score target over `depth` blocks: a unit Gaussian around `target_depth` (0-based index)."""
    x = torch.arange(depth, dtype=torch.float64)
    pdf = torch.exp(-0.5 * (x - target_depth) ** 2) / math.sqrt(2 * math.pi)
    scale = (1.0 - OFFICIAL_PRIOR_BUFFER) / pdf[:target_depth].sum() if official else 1.0 / pdf.sum()
    return (pdf * scale).float()


class KeyValueTap(TokenAdapter):
    """Keeps the keys and values of its block's attention while the official prior needs them."""

    def __init__(self):
        super().__init__()
        self.recorded = None

    def observe_attention(self, tokens, keys, values, key_mask):
        self.recorded = (keys, values, key_mask)


def halted_token_output(block: Block, keys: Optional[Tensor], values: Optional[Tensor],
                        key_mask: Optional[Tensor], batch_size: int) -> Tensor:
    """[B, C] the block output the official code computes for a halted token of each image (see the module
    docstring). keys/values [B, H, N, D] and key_mask as attention saw them; keys None: no live token at all."""
    attn = block.attn
    dim = attn.proj.in_features
    bias = attn.qkv.bias if attn.qkv.bias is not None else attn.qkv.weight.new_zeros(3 * dim)
    value_bias = bias[2 * dim:].expand(batch_size, dim)
    if keys is None:
        mixed = value_bias  # every key masked alike: uniform attention over identical bias-only values
    else:
        query = bias[:dim].view(attn.num_heads, -1)
        scores = torch.einsum("hd,bhnd->bhn", query, keys) * attn.scale
        if key_mask is not None:
            live = key_mask[:, :, 0]  # [B, 1, N]
            has_live = live.any(dim=-1, keepdim=True)
            scores = scores.masked_fill(~live & has_live, float("-inf"))
        mixed = torch.einsum("bhn,bhnd->bhd", scores.softmax(dim=-1), values).reshape(batch_size, dim)
        if key_mask is not None:
            mixed = torch.where(has_live[:, 0], mixed, value_bias)
    return attn.proj(mixed) + block.mlp(mixed.new_zeros(1, dim))


@dataclass
class HaltingState:
    """Per-token ACT state of one forward, one row per (image, original token id): [B * N0] (output [B * N0, C])."""

    cumulative: Tensor
    remainder: Tensor
    rho: Tensor
    depth: Tensor
    output: Tensor
    # Official prior only, per image: halted tokens, and the gradient carrier of their outputs (see _halt).
    halted: Tensor
    halted_carry: Tensor
    phantom_sum: Tensor

    @classmethod
    def start(cls, x: Tensor) -> "HaltingState":
        b, n, c = x.shape
        x = x.new_empty(0, dtype=torch.float32)  # float32 state, also under fp16 autocast (c is compared to 1 - eps)
        zeros = x.new_zeros(b * n)
        return cls(cumulative=zeros, remainder=torch.ones_like(zeros), rho=zeros, depth=torch.ones_like(zeros),
                   output=x.new_zeros(b * n, c), halted=x.new_zeros(b), halted_carry=x.new_zeros(b),
                   phantom_sum=x.new_zeros(b))


@MODEL_REGISTRY.register()
class AViTVisionTransformer(VisionTransformer):
    """DeiT whose tokens halt one by one (A-ViT); state_dict keys are DeiT's, no extra parameters."""

    token_statistics = ("kept_tokens", "token_depth")

    # Blocks may see no live token (every token halted), so DDP must expect unused parameters.
    has_unused_parameters = True

    def __init__(self, gate_scale: float = 10.0, gate_center: float = 30.0, halting_eps: float = 0.01,
                 ponder_weight: float = 5e-4, prior_weight: float = 1e-3, prior_target_depth: int = 8,
                 official_prior: bool = True, **vit_args):
        super().__init__(**vit_args)
        self.gate_scale, self.gate_center, self.halting_eps = gate_scale, gate_center, halting_eps
        self.ponder_weight, self.prior_weight = ponder_weight, prior_weight
        self.prior_target_depth, self.official_prior = prior_target_depth, official_prior
        for block in self.blocks:
            block.adapter = KeyValueTap()
        self._warned_skipped_prior = False

    @classmethod
    def from_config(cls, cfg) -> "AViTVisionTransformer":
        return cls(**avit_kwargs(cfg), **vit_kwargs(cfg))

    def halting_scores(self, y: Tensor) -> Tensor:
        return torch.sigmoid(y[..., 0] * self.gate_scale - self.gate_center)

    def forward_features(self, images: Tensor) -> TokenBatch:
        tokens = self.embed(images)
        batch, num_tokens = tokens.x.shape[:2]
        state = HaltingState.start(tokens.x)
        record_prior = self.training and self.prior_weight > 0
        phantom = record_prior and self.official_prior
        for block in self.blocks:
            block.adapter.observes_attention = phantom
        scores: List[Tensor] = []  # per-block halting score the prior reads
        # As in the backbone: with `trace_token_ids`, the ids of the tokens still running after every block.
        self.last_token_ids = [] if getattr(self, "trace_token_ids", False) else None
        skipped = False
        for i, block in enumerate(self.blocks):
            if i > 0 and not bool(tokens.num_live().any()):  # every token halted: nothing left to compute
                skipped = True
                tokens.token_counts.append(tokens.x.new_zeros(batch, 2, dtype=torch.long))
                if phantom:
                    out = halted_token_output(block, None, None, None, batch)[:, 0].float()
                    state.phantom_sum = state.phantom_sum + out
                    scores.append(self._official_layer_score(None, out, state, num_tokens))
                elif record_prior:  # corrected prior: halted tokens count 0
                    scores.append(state.output.new_zeros(()))
            else:
                tokens = block(tokens)
                tokens = self._halt(i, block, tokens, state, scores if record_prior else None, phantom)
            if self.last_token_ids is not None:
                self.last_token_ids.append(tokens.padded(tokens.ids).masked_fill(~tokens.live_mask(), -1))
        for block in self.blocks:
            block.adapter.recorded = None
        self.last_depth = state.depth.detach().view(batch, num_tokens)  # blocks each token ran (1..depth)
        self.last_rho = state.rho.view(batch, num_tokens)  # ponder cost, differentiable
        self.last_halting_scores = torch.stack(scores) if scores else None
        features = self.norm(state.output.view(batch, num_tokens, -1))
        if phantom and skipped:
            # Blocks skipped by every token still feed the official prior. DDP (find_unused_parameters) treats
            # parameters the forward output does not reach as unused, so the output must reach them (times 0).
            features = features + 0.0 * state.phantom_sum.sum()
        ids = torch.arange(num_tokens, device=images.device).expand(batch, num_tokens)
        return TokenBatch(x=features, ids=ids,
                          token_counts=tokens.token_counts, num_initial=num_tokens, execution=tokens.execution)

    def _halt(self, i: int, block: Block, tokens: TokenBatch, state: HaltingState, scores: Optional[List[Tensor]],
              phantom: bool) -> TokenBatch:
        """One ACT step after block i: scores, remainders, the output mixture; keeps the tokens still running."""
        batch, num_tokens = state.halted.shape[0], state.output.shape[0] // state.halted.shape[0]
        # One row per token slot (packed: the live tokens only); the image of a row only where it is needed.
        y, ids, image, live = tokens.rows(with_image=batch > 1 or scores is not None)
        y = y.float()
        slot = ids if image is None else image * num_tokens + ids  # the token's row in the state
        live_f = None if live is None else live.to(y.dtype)  # None: every row is a live token

        def live_only(t: Tensor) -> Tensor:  # t with the rows of dead slots (masked execution) zeroed
            return t if live_f is None else t * live_f

        h_raw = self.halting_scores(y)
        if scores is not None:
            live_sums = y.new_zeros(batch).index_add(0, image, live_only(h_raw))
            if phantom:
                keys, values, key_mask = block.adapter.recorded
                out = halted_token_output(block, keys, values, key_mask, batch)[:, 0].float()
                state.phantom_sum = state.phantom_sum + out
                scores.append(self._official_layer_score(live_sums, out, state, num_tokens))
            else:  # mean over the patch tokens of every image; halted tokens and CLS count 0
                cls_sums = y.new_zeros(batch).index_add(0, image, live_only(h_raw * (ids == 0).to(y.dtype)))
                scores.append((live_sums - cls_sums).sum() / (batch * (num_tokens - 1)))
        last = i == len(self.blocks) - 1
        h = torch.ones_like(h_raw) if last else h_raw  # the last block halts every token (no gradient)
        cumulative = state.cumulative.index_select(0, slot) + h.detach()
        remainder = state.remainder.index_select(0, slot)
        threshold = 1 - self.halting_eps
        reached, running = cumulative > threshold, cumulative < threshold
        if live is not None:
            reached, running = reached & live, running & live
        running_f = running.to(y.dtype)
        finishing = remainder * reached.to(y.dtype)  # what a token halting here adds: its remainder
        mixture = (finishing + h * running_f).unsqueeze(-1) * y
        # In place where no gradient is recorded: out of place, every block copied the whole [B * N, C] state.
        state.output = state.output.index_add(0, slot, mixture) if torch.is_grad_enabled() else \
            state.output.index_add_(0, slot, mixture)
        state.rho = state.rho.index_add(0, slot, finishing + (1.0 if live_f is None else live_f))
        state.remainder = state.remainder.index_add(0, slot, running_f * h, alpha=-1)
        state.cumulative = state.cumulative.index_add(0, slot, live_only(h.detach()))
        state.depth = state.depth.index_add(0, slot, running_f)
        if last:
            return tokens
        if phantom:  # tokens halting here: later garbage outputs pass gradients to y[0] (official `.data`)
            stopped = 1.0 - running_f if live_f is None else live_f - running_f
            state.halted = state.halted.index_add(0, image, stopped)
            state.halted_carry = state.halted_carry.index_add(
                0, image, stopped * (y[:, 0] - state.phantom_sum[image]))
        return tokens.filter(running)

    def _official_layer_score(self, live_sums: Optional[Tensor], phantom_out: Tensor, state: HaltingState,
                              num_tokens: int) -> Tensor:
        """mean(h[1:]) of the official code: every image but the first, every token, halted ones included.

        A halted token's output has the value `phantom_out` of its image, and the gradient of its last real
        output plus the phantom outputs since (`.data` zeroing), this block's included. Summed over an image's
        halted tokens, that gradient is carried by halted_carry + halted * phantom_sum."""
        carry = state.halted_carry + state.halted * state.phantom_sum
        z = phantom_out.detach() + (carry - carry.detach()) / state.halted.clamp(min=1)
        per_image = state.halted * self.halting_scores(z.unsqueeze(-1))
        if live_sums is not None:  # the running tokens' own scores, summed per image
            per_image = per_image + live_sums
        return per_image[1:].sum() / ((per_image.shape[0] - 1) * num_tokens)

    def auxiliary_losses(self) -> Dict[str, Tensor]:
        """The A-ViT losses of the last training forward, by name, as they are added to the task loss (the
        trainer sums them). The keys are always the same; a prior that is off or skipped is a constant 0."""
        losses = {"ponder": self.ponder_weight * self.last_rho.mean()}
        if self.prior_weight > 0:
            if self.last_halting_scores is None:
                raise RuntimeError("A-ViT auxiliary_losses() reads the halting scores of a training-mode forward; "
                                   "the last forward ran in eval mode")
            prior = self.halting_prior(self.last_halting_scores)
            if self.official_prior and not bool(prior > 0):
                if not self._warned_skipped_prior:
                    logger.warning("A-ViT halting prior is %s (the official prior needs 2+ images per batch and "
                                   "process) and is not added, as in the official code", prior.item())
                    self._warned_skipped_prior = True
                prior = torch.zeros((), device=prior.device)
            losses["halting_prior"] = prior
        return losses

    def halting_prior(self, scores: Tensor) -> Tensor:
        target = prior_target(len(self.blocks), self.prior_target_depth, self.official_prior).to(scores.device)
        q = (scores / scores.sum()).clamp(*PRIOR_CLAMP)
        return self.prior_weight * F.kl_div(q.log(), target, reduction="batchmean")

    def check_checkpoint_source(self, path: str) -> None:
        """Official A-ViT files carry their gate in the file name (<name>-<scale>-<center>.pth, and 5/50 for
        the visualization checkpoint); vitadapt takes it from the config and refuses a file that says otherwise."""
        name = os.path.basename(path)
        expected = None
        match = re.search(r"-(\d+(?:\.\d+)?)-(\d+(?:\.\d+)?)\.pth$", name)
        if match:
            expected = (float(match.group(1)), float(match.group(2)))
        elif "visualization" in name:
            expected = (5.0, 50.0)
        logger.info("A-ViT gate: AVIT.GATE_SCALE %g, AVIT.GATE_CENTER %g (from the config, not from the file name)",
                    self.gate_scale, self.gate_center)
        if expected is not None and expected != (self.gate_scale, self.gate_center):
            raise ConfigError(
                f"{path}: the official A-ViT code would run this file with gate scale {expected[0]:g} and center "
                f"{expected[1]:g} (read from its name), but AVIT.GATE_SCALE / AVIT.GATE_CENTER are "
                f"{self.gate_scale:g} / {self.gate_center:g}; set them to match, or rename the file if its name is wrong")


def avit_kwargs(cfg) -> dict:
    a = cfg.AVIT
    return dict(gate_scale=a.GATE_SCALE, gate_center=a.GATE_CENTER, halting_eps=a.HALTING_EPS,
                ponder_weight=a.PONDER_WEIGHT, prior_weight=a.PRIOR_WEIGHT, prior_target_depth=a.PRIOR_TARGET_DEPTH,
                official_prior=a.OFFICIAL_PRIOR)


# ------------------------------------------------------------------ A-ViT on video
@MODEL_REGISTRY.register()
class AViTTimeSformer(AViTVisionTransformer, TimeSformer):
    """A-ViT on TimeSformer with joint space-time attention: every token of the clip, the CLS and the N * T
    patches, halts on its own from channel 0 of its output, exactly as an image token does (halting is a property
    of the token, not of a frame); ponder and prior losses over the clip's tokens. Space-only attention is
    refused (the halting loop normalises each sequence, where the official space-only head averages the frames
    first), and so is divided attention (its grid)."""

    def __init__(self, **kwargs):
        if kwargs.get("attention_type") != "joint_space_time":
            raise ValueError("A-ViT on TimeSformer runs with TIMESFORMER.ATTENTION_TYPE joint_space_time; "
                             f"{kwargs.get('attention_type')} is not supported")
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg) -> "AViTTimeSformer":
        return cls(**avit_kwargs(cfg), **TimeSformer.config_kwargs(cfg))


class AViTFrameViT(AViTVisionTransformer, FrameViT):
    """XViT's per-frame backbone with A-ViT: the tokens of each frame halt on their own. A halted token is no longer
    computed, so the key/value shift gives its neighbours in the next and previous frames zeros from it."""


@MODEL_REGISTRY.register()
class AViTXViT(XViT):
    """A-ViT on XViT (AViTFrameViT as the backbone, the temporal head unchanged), with its ponder and prior
    losses; loads XViT checkpoints."""

    frame_model = AViTFrameViT
    frame_model_kwargs = staticmethod(avit_kwargs)
    has_unused_parameters = True  # every token of a frame may halt before the last block

    def auxiliary_losses(self) -> Dict[str, Tensor]:
        return self.base_model.auxiliary_losses()


AVIT_MODELS = ("AViTVisionTransformer", "AViTTimeSformer", "AViTXViT")


def add_avit_config(cfg) -> None:
    from fvcore.common.config import CfgNode

    cfg.AVIT = CfgNode()
    # Halting score h = sigmoid(GATE_SCALE * y[0] - GATE_CENTER), y[0] channel 0 of a token's block output
    # (official: tiny 10 / 30, small 10 / 75; the visualization checkpoint 5 / 50).
    cfg.AVIT.GATE_SCALE = 10.0
    cfg.AVIT.GATE_CENTER = 30.0
    # A token halts once its cumulative h exceeds 1 - HALTING_EPS (official: 0.01, hard-coded).
    cfg.AVIT.HALTING_EPS = 0.01
    # Weight of the ponder loss, mean of depth + remainder over tokens (official ponder_token_scale).
    cfg.AVIT.PONDER_WEIGHT = 5e-4
    # Weight of the distributional prior on the per-block halting scores (official distr_prior_alpha); 0 disables it.
    cfg.AVIT.PRIOR_WEIGHT = 1e-3
    # Centre (0-based block index) of the Gaussian target of the prior (official: 8 of 12).
    cfg.AVIT.PRIOR_TARGET_DEPTH = 8
    # Reproduce the official prior with its quirks (batch slice, halted tokens' outputs, unnormalised target,
    # added only if > 0); False: the corrected prior. See vitadapt/models/avit.py.
    cfg.AVIT.OFFICIAL_PRIOR = True


def validate_avit_config(cfg) -> None:
    if cfg.MODEL.NAME not in AVIT_MODELS:
        return
    a = cfg.AVIT
    if cfg.MODEL.NAME == "AViTTimeSformer" and cfg.TIMESFORMER.ATTENTION_TYPE != "joint_space_time":
        raise ConfigError(f"MODEL.NAME AViTTimeSformer needs TIMESFORMER.ATTENTION_TYPE joint_space_time, got "
                          f"{cfg.TIMESFORMER.ATTENTION_TYPE}")
    if not 0 < a.HALTING_EPS < 1:
        raise ConfigError(f"AVIT.HALTING_EPS must be in (0, 1), got {a.HALTING_EPS}")
    if a.PONDER_WEIGHT < 0 or a.PRIOR_WEIGHT < 0:
        raise ConfigError(f"AVIT.PONDER_WEIGHT ({a.PONDER_WEIGHT}) and AVIT.PRIOR_WEIGHT ({a.PRIOR_WEIGHT}) must be >= 0")
    if not 1 <= a.PRIOR_TARGET_DEPTH < cfg.VIT.DEPTH:
        raise ConfigError(f"AVIT.PRIOR_TARGET_DEPTH must be in [1, VIT.DEPTH) = [1, {cfg.VIT.DEPTH}), "
                          f"got {a.PRIOR_TARGET_DEPTH}")
    # Valid configs under which halting stops depending on the token, or every token halts at once: logged, not
    # refused (tests and studies use them). A token whose channel 0 is 0 gets h0 = sigmoid(-GATE_CENTER) per block
    # and halts after the first block at which its cumulative score exceeds 1 - HALTING_EPS.
    h0 = 1.0 / (1.0 + math.exp(min(a.GATE_CENTER, 700.0)))
    blocks = min(cfg.VIT.DEPTH, math.floor((1 - a.HALTING_EPS) / h0) + 1)
    gate = (f"AVIT.GATE_SCALE {a.GATE_SCALE:g}, AVIT.GATE_CENTER {a.GATE_CENTER:g}, AVIT.HALTING_EPS "
            f"{a.HALTING_EPS:g}")
    if a.GATE_SCALE == 0:
        logger.warning("%s: with a gate scale of 0 every token gets the same halting score %.3g per block, so all "
                       "tokens halt together after %d of VIT.DEPTH=%d blocks; halting no longer adapts to the token",
                       gate, h0, blocks, cfg.VIT.DEPTH)
    elif a.GATE_CENTER <= 0 or blocks <= 1:
        logger.warning("%s: a token whose channel 0 is near 0 gets halting score %.3g per block and halts after %d of "
                       "VIT.DEPTH=%d blocks; almost every token stops at once (the official centers are 30 to 75)",
                       gate, h0, blocks, cfg.VIT.DEPTH)


register_config("AVIT", add_avit_config, validate_avit_config)


def official_to_config_opts(config: dict) -> List[str]:
    """KEY VALUE overrides for the official A-ViT constructor and args (a golden file's `config`)."""
    ctor, args = config["constructor"], config["args"]
    if ctor.get("representation_size") is not None or ctor.get("distilled"):
        raise ValueError("official A-ViT arguments not supported by vitadapt: representation_size / distilled")
    if args.get("act_mode", 4) != 4:
        raise ValueError(f"official A-ViT act_mode {args['act_mode']}: only token halting (4) exists")
    size = ctor["img_size"][0] if isinstance(ctor["img_size"], (list, tuple)) else ctor["img_size"]
    pairs = {"MODEL.NAME": "AViTVisionTransformer", "MODEL.NUM_CLASSES": ctor["num_classes"],
             "DATA.TRAIN_CROP_SIZE": size, "DATA.TEST_CROP_SIZE": size, "VIT.PATCH_SIZE": ctor["patch_size"],
             "VIT.IN_CHANS": ctor["in_chans"], "VIT.EMBED_DIM": ctor["embed_dim"], "VIT.DEPTH": ctor["depth"],
             "VIT.NUM_HEADS": ctor["num_heads"], "VIT.MLP_RATIO": float(ctor["mlp_ratio"]),
             "VIT.QKV_BIAS": bool(ctor["qkv_bias"]), "VIT.DROP_RATE": float(ctor.get("drop_rate", 0.0)),
             "VIT.ATTN_DROP_RATE": float(ctor.get("attn_drop_rate", 0.0)),
             "VIT.DROP_PATH_RATE": float(ctor.get("drop_path_rate", 0.0)),
             "AVIT.GATE_SCALE": float(args["gate_scale"]), "AVIT.GATE_CENTER": float(args["gate_center"]),
             "AVIT.PONDER_WEIGHT": float(args["ponder_token_scale"]),
             "AVIT.PRIOR_WEIGHT": float(args["distr_prior_alpha"]), "AVIT.OFFICIAL_PRIOR": True}
    hard = config.get("hardcoded", {})
    if "eps" in hard:
        pairs["AVIT.HALTING_EPS"] = float(hard["eps"])
    return [str(x) for kv in pairs.items() for x in kv]
