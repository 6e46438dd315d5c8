"""DVT, the Dynamic Vision Transformer (Wang et al., "Not All Images are Worth 16x16 Words", NeurIPS 2021).

Three complete transformers read the same image with more and more tokens (7x7, 10x10, 14x14 at 224 px; official
names less_less_token / less_token / normal_token); an image stops at the first exit whose softmax confidence
reaches that exit's threshold. Each stage is the shared backbone (VisionTransformer with patch 32 / 23+pad 3 / 16,
or T2TViT with its three token grids), and the later stages reuse the earlier ones through TokenAdapter hooks:

* feature reuse: every block of a later stage has its own `feature_resuse_mlp` (LayerNorm, C -> 128 -> 48; the
  official spelling, kept so that released checkpoints load) applied to the previous stage's last block output
  (before its final norm); the 48 channels, resampled to this stage's grid with a zero CLS row, are appended to
  the block's MLP input (norm2 over C + 48, MLP C + 48 -> hidden -> C; the residual keeps width C).
* relation reuse: the previous stage's pre-softmax attention logits of all its blocks, concatenated over heads x
  blocks, go through `relation_reuse_conv` (1x1 conv HD -> 3HD, GELU, 3HD -> HD), are resampled (keys, then
  queries; the CLS row and column pass through) and added to each block's logits before the softmax (a float mask
  to the fused attention kernel).

Resampling is the official nearest 2x upsampling followed by adaptive average pooling, applied as the one linear
map it is (`resample_matrix`; on the CPU one [N+1, n+1] matrix product beats both the official ops and the
separable row-and-column form), instead of materialising the upsampled maps (for 14x14, [B x 72, 197, 20, 20]
floats per stage). The official code sizes the upsampling by the target
grid (14 for 10x10, 20 for 14x14), which is twice the source grid in its geometry; here it is twice the source
grid for any geometry (the digits demo: 4 / 6 / 8 tokens a side).

At inference with thresholds, exit k runs only on the images no earlier exit answered; the batch is regrouped
after every exit (`forward`), so an image that stops at 7x7 costs only the first stage. Without thresholds, and in
training, every exit runs on every image (the official forward); the logits of all exits are in `last_exit_logits`
(training sums their losses, `tools/run_net.py` derives the budgeted curves from them).
"""

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp, trunc_normal_
from torch import Tensor, nn

from vitadapt.config import ConfigError, register_config

from .build import MODEL_REGISTRY
from .t2t import TOKEN_GRIDS, T2TViT, t2t_kwargs, unfold_size
from .tokens import TokenAdapter, TokenBatch
from .video import TimeSformer, XViT, check_undivided, check_video
from .vit import Block, VisionTransformer, _init_linear_and_norm, vit_kwargs

STAGE_NAMES = ("less_less_token", "less_token", "normal_token")  # official attribute names = state-dict prefixes
REUSE_CHANNELS = 48  # feature reuse: channels appended to every block's MLP input (official, hard-coded)
REUSE_HIDDEN = 128  # hidden width of feature_resuse_mlp (official, hard-coded)
BACKBONES = ("VisionTransformer", "T2TViT")


def resample_1d(src: int, dst: int) -> Tensor:
    """[dst, src]: nearest upsampling of a length-src line to 2src, then adaptive average pooling to dst, as a
    matrix, built by running those very operations on the basis vectors. Both operations are separable, so the
    official 2-D resampling of a src x src grid is this matrix on the rows and on the columns."""
    basis = torch.eye(src, dtype=torch.float64).reshape(src, 1, src)
    pooled = F.adaptive_avg_pool1d(F.interpolate(basis, size=2 * src, mode="nearest"), dst)
    return pooled.reshape(src, dst).t()


def resample_frames(patches: Tensor, spatial: Tensor, frames: int) -> Tensor:
    """[..., n * F] -> [..., N * F]: the patches of F frames (patch i of frame t at i * F + t, TimeSformer's joint
    order) resampled frame by frame by `spatial` [N, n]; equal to resample_matrix(src, dst, F) without its CLS row
    and column, at F times fewer operations per dimension."""
    per_frame = patches.unflatten(-1, (-1, frames)).transpose(-1, -2)  # [..., F, n]
    return torch.matmul(per_frame, spatial.t()).transpose(-1, -2).flatten(-2)


def _with_cls(x: Tensor, resample_patches) -> Tensor:
    """x [..., 1 + n * F] resampled along its last dimension: the CLS entry passes, the patches by
    `resample_patches`."""
    return torch.cat([x[..., :1], resample_patches(x[..., 1:])], dim=-1)


def resample_matrix(src: int, dst: int, frames: int = 1) -> Tensor:
    """[dst*dst*F + 1, src*src*F + 1]: the official resampling (nearest 2x upsampling, adaptive average pooling to
    dst x dst) of flattened grids as one matrix, with a leading row and column passing the CLS token. With F frames
    in one sequence (TimeSformer's joint attention: patch n of frame t at 1 + n * F + t), every frame is resampled
    on its own: the spatial map times the identity over frames."""
    spatial = torch.kron(resample_1d(src, dst), resample_1d(src, dst)).contiguous()
    full = torch.zeros(dst * dst * frames + 1, src * src * frames + 1, dtype=torch.float64)
    full[0, 0] = 1.0
    full[1:, 1:] = torch.kron(spatial, torch.eye(frames, dtype=torch.float64))
    return full


class ReuseInputs(TokenAdapter):
    """What one block of a DVT stage receives from the stage before (an attention bias, reused feature channels),
    set by DVT before the stage runs; and, when the next stage reuses relations, the block's attention logits."""

    def __init__(self):
        super().__init__()
        self.clear()

    def clear(self) -> None:
        self.bias: Optional[Tensor] = None
        self.features: Optional[Tensor] = None
        self.records_attention_logits = False
        self.logits: Optional[Tensor] = None

    def attention_bias(self, tokens: TokenBatch) -> Optional[Tensor]:
        return self.bias

    def observe_attention_logits(self, logits: Tensor) -> None:
        self.logits = logits

    def mlp_input(self, tokens: TokenBatch) -> Tensor:
        return tokens.x if self.features is None else torch.cat([tokens.x, self.features], dim=-1)


def add_feature_reuse(block: Block) -> None:
    """Widens the block's MLP input by REUSE_CHANNELS and gives it its own `feature_resuse_mlp` (official layout)."""
    dim, eps = block.norm1.normalized_shape[0], block.norm1.eps
    hidden, drop = block.mlp.fc1.out_features, block.mlp.drop1.p
    block.norm2 = nn.LayerNorm(dim + REUSE_CHANNELS, eps=eps)
    block.mlp = Mlp(dim + REUSE_CHANNELS, hidden, out_features=dim, act_layer=nn.GELU, drop=drop)
    block.feature_resuse_mlp = nn.Sequential(nn.LayerNorm(dim, eps=eps),
                                             Mlp(dim, REUSE_HIDDEN, REUSE_CHANNELS, act_layer=nn.GELU, drop=drop))


def relation_reuse_conv(channels: int) -> nn.Sequential:
    """1x1 conv over the upstream heads x blocks (official `relation_reuse_conv`)."""
    return nn.Sequential(nn.Conv2d(channels, 3 * channels, 1), nn.GELU(), nn.Conv2d(3 * channels, channels, 1))


def _pointwise(convs: nn.Sequential, x: Tensor) -> Tensor:
    """relation_reuse_conv (1x1 conv, GELU, 1x1 conv) on x [B, C, H, W], as the matrix products over channels a 1x1
    convolution is: several times faster than the CPU convolution kernel on these shapes, same result."""
    first, act, second = convs
    b, c, h, w = x.shape
    y = torch.baddbmm(first.bias[:, None], first.weight.flatten(1).expand(b, -1, -1), x.reshape(b, c, h * w))
    y = torch.baddbmm(second.bias[:, None], second.weight.flatten(1).expand(b, -1, -1), act(y))
    return y.reshape(b, -1, h, w)


@dataclass
class StageOutput:
    """What a stage hands to the next one, for the images it ran on."""

    logits: Tensor  # [B, classes]
    # [S, L, C] last block output before the final norm (feature reuse input), one row per sequence: S = B for
    # images and joint space-time clips, B * T for per-frame sequences (XViT, TimeSformer space only).
    features: Tensor
    side: int  # token grid side
    relations: Optional[List[Tensor]] = None  # per block [S, H, L, L] pre-softmax logits, bias included
    trace: Dict[str, object] = field(default_factory=dict)  # intermediates, when DVT.trace is set

    @property
    def frames(self) -> int:
        """Frames in one sequence: L = 1 + side * side * frames."""
        return (self.features.shape[1] - 1) // (self.side * self.side)

    def select(self, rows: Tensor) -> "StageOutput":
        """The inputs (images or clips) at the bool mask `rows`, with all their sequences."""
        per_input = self.features.shape[0] // self.logits.shape[0]
        seq = rows.repeat_interleave(per_input) if per_input > 1 else rows
        relations = None if self.relations is None else [r[seq] for r in self.relations]
        return StageOutput(self.logits[rows], self.features[seq], self.side, relations)


@MODEL_REGISTRY.register()
class DVT(nn.Module):
    """The cascade: `less_less_token`, `less_token`, `normal_token` (exits 1-3), each a VisionTransformer or T2TViT.

    thresholds: confidence (max softmax probability) an image needs to stop at each exit but the last; None runs
    every exit on every image (training, anytime evaluation, threshold search)."""

    token_statistics: tuple = ()
    num_exits = len(STAGE_NAMES)
    # Official training files (timm's saver) hold state_dict and state_dict_ema; the official training always keeps
    # an EMA and reports and selects on its metrics, so its weights are the ones to evaluate (released files hold
    # model_state_dict only).
    official_files_prefer_ema = True

    def __init__(self, stages: Sequence[VisionTransformer], feature_reuse: bool = True, relation_reuse: bool = True,
                 thresholds: Optional[Sequence[float]] = None, img_size: int = 224):
        super().__init__()
        self.img_size = img_size
        if len(stages) != self.num_exits:
            raise ValueError(f"DVT has {self.num_exits} stages, got {len(stages)}")
        for name, stage in zip(STAGE_NAMES, stages):
            setattr(self, name, stage)
        self.feature_reuse, self.relation_reuse = feature_reuse, relation_reuse
        self.num_classes = stages[-1].num_classes
        for k, stage in enumerate(stages):
            for block in stage.blocks:
                block.adapter = ReuseInputs()
                if k > 0 and feature_reuse:
                    add_feature_reuse(block)
                    for module in (block.norm2, block.mlp, block.feature_resuse_mlp):
                        module.apply(_init_linear_and_norm)  # the official (timm) init of the new layers
            if k > 0 and relation_reuse:
                upstream = stages[k - 1]
                channels = len(stage.blocks) * stage.blocks[0].attn.num_heads
                if channels != len(upstream.blocks) * upstream.blocks[0].attn.num_heads:
                    raise ValueError("relation reuse needs the same heads x depth in consecutive stages")
                stage.relation_reuse_conv = relation_reuse_conv(channels)  # torch's default conv init, as official
        self.thresholds: Optional[Tensor] = None
        self.set_thresholds(thresholds)
        self.trace = False  # record every intermediate (parity checks)
        self._resamplers: Dict[Tuple, Tensor] = {}
        self._exit_macs: Dict[int, Tensor] = {}

    @classmethod
    def from_config(cls, cfg) -> "DVT":
        d = cfg.DVT
        stages = []
        for k in range(cls.num_exits):
            if d.BACKBONE == "T2TViT":
                stage = T2TViT(**dict(t2t_kwargs(cfg), tokens_type=d.TOKENS_TYPES[k]))
            else:
                stage = VisionTransformer(**dict(vit_kwargs(cfg), patch_size=d.PATCH_SIZES[k],
                                                 patch_padding=d.PATCH_PADDINGS[k]))
                trunc_normal_(stage.cls_token, std=0.02)  # DVT's DeiT init (timm 0.3.2), not timm's newer 1e-6
            stages.append(stage)
        return cls(stages, d.FEATURE_REUSE, d.RELATION_REUSE, d.THRESHOLDS or None, cfg.DATA.TEST_CROP_SIZE)

    @property
    def stages(self) -> List[VisionTransformer]:
        return [getattr(self, name) for name in STAGE_NAMES]

    def set_thresholds(self, thresholds: Optional[Sequence[float]]) -> None:
        """Confidence thresholds of the exits (K - 1 values, or K with the last one ignored); None: run every exit."""
        if thresholds is None:
            self.thresholds = None
            return
        values = torch.as_tensor(list(map(float, thresholds)), dtype=torch.float32)
        if values.numel() not in (self.num_exits - 1, self.num_exits):
            raise ValueError(f"DVT needs {self.num_exits - 1} exit thresholds (or {self.num_exits}, the last one "
                             f"unused), got {values.numel()}")
        self.thresholds = values[: self.num_exits - 1]

    def no_weight_decay(self):
        return {f"{name}.{key}" for name, stage in zip(STAGE_NAMES, self.stages)
                for key in getattr(stage, "no_weight_decay", lambda: ())()}

    # ----------------------------------------------------------------------------------------------- one stage
    def _resampler(self, src: int, dst: int, like: Tensor) -> Tensor:
        key = (src, dst, like.device, like.dtype)
        if key not in self._resamplers:
            self._resamplers[key] = resample_matrix(src, dst).to(device=like.device, dtype=like.dtype)
        return self._resamplers[key]

    def _relation_bias(self, stage: VisionTransformer, upstream: StageOutput, side: int) -> List[Tensor]:
        """Per block [B, H, N + 1, N + 1]: the upstream logits mixed over heads x blocks, resampled to this grid."""
        mixed = _pointwise(stage.relation_reuse_conv, torch.cat(upstream.relations, dim=1))  # [B, HD, n + 1, n + 1]
        resample = self._resampler(upstream.side, side, mixed)  # [N + 1, n + 1]
        frames = upstream.frames
        if frames == 1:
            bias = torch.matmul(resample, torch.matmul(mixed, resample.t()))  # keys, then queries
        else:  # the CLS row and column pass; every frame's block of patches is resampled as an image's
            per_frame = lambda x: resample_frames(x, resample[1:, 1:], frames)  # noqa: E731
            bias = _with_cls(_with_cls(mixed, per_frame).transpose(-1, -2), per_frame).transpose(-1, -2)
        return list(bias.chunk(len(stage.blocks), dim=1))

    def _reused_features(self, stage: VisionTransformer, upstream: StageOutput, side: int) -> List[Tensor]:
        """Per block [B, N + 1, 48]: that block's feature_resuse_mlp of the upstream features, resampled to this
        grid; the CLS row is zero.
        The blocks' small MLPs run as one batched product (their LayerNorms share the normalisation), which
        matters on the CPU: twelve separate passes over [B, 50, C] cost more in overhead than in arithmetic."""
        mlps = [block.feature_resuse_mlp for block in stage.blocks]
        norm, fc2 = mlps[0][0], mlps[0][1].fc2
        x = F.layer_norm(upstream.features, norm.normalized_shape, eps=norm.eps)  # [B, n + 1, C]
        b, n, c = x.shape
        gamma = torch.stack([m[0].weight for m in mlps])[:, None]  # [D, 1, C]
        beta = torch.stack([m[0].bias for m in mlps])[:, None]
        h = x.reshape(1, b * n, c) * gamma + beta  # [D, B(n + 1), C]: each block's LayerNorm affine
        h = torch.baddbmm(torch.stack([m[1].fc1.bias for m in mlps])[:, None], h,
                          torch.stack([m[1].fc1.weight for m in mlps]).transpose(1, 2))
        h = mlps[0][1].drop1(mlps[0][1].act(h))
        h = torch.baddbmm(torch.stack([m[1].fc2.bias for m in mlps])[:, None], h,
                          torch.stack([m[1].fc2.weight for m in mlps]).transpose(1, 2))
        h = mlps[0][1].drop2(h).reshape(len(mlps) * b, n, fc2.out_features)
        # The resampling matrix's CLS row takes no patch: the reused channels of the CLS token are zero.
        resample = self._resampler(upstream.side, side, h)
        if upstream.frames == 1:
            out = torch.matmul(resample[:, 1:], h[:, 1:])
        else:
            patches = resample_frames(h[:, 1:].transpose(1, 2), resample[1:, 1:], upstream.frames).transpose(1, 2)
            out = torch.cat([patches.new_zeros(patches.shape[0], 1, patches.shape[2]), patches], dim=1)
        return list(out.reshape(len(mlps), b, -1, fc2.out_features).unbind(0))

    def run_stage(self, k: int, images: Tensor, upstream: Optional[StageOutput]) -> StageOutput:
        stage = self.stages[k]
        tokens = stage.embed(images)
        side = stage_side(stage, images.shape[-1])
        reuse = upstream is not None
        biases = self._relation_bias(stage, upstream, side) if reuse and self.relation_reuse else None
        features = self._reused_features(stage, upstream, side) if reuse and self.feature_reuse else None
        record = k + 1 < self.num_exits and self.relation_reuse
        trace: Dict[str, object] = {}
        if self.trace:
            trace.update(relation_bias=biases, reused_features=[])
        for i, block in enumerate(stage.blocks):
            inputs = block.adapter
            inputs.bias = biases[i] if biases is not None else None
            if features is not None:
                inputs.features = features[i]
                if self.trace:
                    trace["reused_features"].append(inputs.features)
            inputs.records_attention_logits = record
            tokens = block(tokens)
        relations = [block.adapter.logits for block in stage.blocks] if record else None
        for block in stage.blocks:
            block.adapter.clear()  # the tensors of this forward are not kept past it
        features = tokens.x
        normed = stage.final_tokens(tokens)
        logits = stage.forward_head(normed)
        if self.trace:
            trace.update(pre_logits=normed.cls_tokens(), features=features, relations=relations)
        return StageOutput(logits, features, side, relations, trace)

    # ------------------------------------------------------------------------------------------------ forward
    def forward(self, images: Tensor) -> Tensor:
        """[B, classes]: the logits of the exit each image stopped at (the last exit when no thresholds are set)."""
        self.last_img_size = images.shape[-1]
        if self.thresholds is None or self.training:
            outputs, upstream = [], None
            for k in range(self.num_exits):
                upstream = self.run_stage(k, images, upstream)
                outputs.append(upstream)
            self.last_exit_logits = [o.logits for o in outputs]
            self.last_trace = [o.trace for o in outputs] if self.trace else None
            self.last_exit = torch.full((images.shape[0],), self.num_exits - 1, dtype=torch.long, device=images.device)
            return outputs[-1].logits
        return self._early_exit(images)

    def _early_exit(self, images: Tensor) -> Tensor:
        """Runs exit k only on the images that no earlier exit answered, regrouped into one smaller batch."""
        batch = images.shape[0]
        logits: Optional[Tensor] = None
        exit_of = torch.full((batch,), self.num_exits - 1, dtype=torch.long, device=images.device)
        remaining = torch.arange(batch, device=images.device)  # original positions of the images still running
        upstream = None
        for k in range(self.num_exits):
            upstream = self.run_stage(k, images, upstream)
            if logits is None:
                logits = upstream.logits.new_empty(batch, upstream.logits.shape[1])
            if k + 1 < self.num_exits:
                confident = upstream.logits.softmax(dim=-1).amax(dim=-1) >= self.thresholds[k].to(upstream.logits)
            else:
                confident = torch.ones(remaining.numel(), dtype=torch.bool, device=images.device)
            done = remaining[confident]
            logits[done] = upstream.logits[confident]
            exit_of[done] = k
            if bool(confident.all()):
                break
            waiting = ~confident
            remaining, images, upstream = remaining[waiting], images[waiting], upstream.select(waiting)
        self.last_exit = exit_of
        self.last_exit_logits = None
        self.last_trace = None
        return logits

    # ------------------------------------------------------------------------------------------------ costs
    def exit_macs(self, img_size: Optional[int] = None) -> Tensor:
        """[K] float64 cumulative MACs of one image leaving at each exit (reuse modules included), counted as fvcore
        counts the official graph (matmuls, convolutions, einsums, LayerNorm 5 per element, upsampling and pooling 1
        per element), so that the full-size models give the official per-exit GFLOPs."""
        size = img_size or self.img_size
        if size not in self._exit_macs:
            per_stage, upstream = [], None
            for k, stage in enumerate(self.stages):
                side = stage_side(stage, size)
                per_stage.append(self.stage_macs(stage, side, upstream, size))
                upstream = side
            self._exit_macs[size] = torch.tensor(per_stage, dtype=torch.float64).cumsum(0)
        return self._exit_macs[size]

    def stage_macs(self, stage: VisionTransformer, side: int, upstream: Optional[int], size: int) -> float:
        """MACs of one input through one stage whose token grid is side x side (upstream: the grid side of the stage
        before, None for the first)."""
        reuse = upstream is not None
        return _stage_macs(stage, side, upstream, reuse and self.feature_reuse, reuse and self.relation_reuse, size)

    def macs_per_image(self) -> Tensor:
        """[B] MACs of each image of the last forward: the cumulative cost of the exit it left at."""
        return self.exit_macs(self.last_img_size).to(self.last_exit.device)[self.last_exit]

    def image_statistics(self) -> Dict[str, Tensor]:
        return {"exit": self.last_exit.double() + 1}  # 1-based, as the paper names the exits


def stage_side(stage: VisionTransformer, size: int) -> int:
    if isinstance(stage, T2TViT):
        return stage.tokens_to_token.grid_sizes(size)[-1]
    return stage.grid_for((size, size))[0]


def _norm_macs(elements: int) -> int:
    return 5 * elements  # fvcore's LayerNorm estimate (with affine parameters)


def _stage_macs(stage: VisionTransformer, side: int, upstream: Optional[int], feature_reuse: bool,
                relation_reuse: bool, size: int, sequences: int = 1, frames: int = 1,
                head: Optional[float] = None) -> float:
    """MACs of one input through one stage (fvcore conventions on the official graph, see DVT.exit_macs). An image
    is one sequence of one frame; a clip of T frames is one sequence of T frames (TimeSformer's joint attention) or
    T sequences of one frame (per-frame backbones), each frame resampled as an image. `head`: the MACs after the last
    block (default: the final norm over every token and the linear classifier)."""
    n = side * side * frames + 1  # tokens per sequence
    total_frames = sequences * frames
    dim = stage.embed_dim
    if isinstance(stage, T2TViT):
        t2t = stage.tokens_to_token
        n0, n1, _ = t2t.grid_sizes(size)
        embed = t2t.macs(size) + sum(_norm_macs(t * t * (p.kqv.in_features + p.emb))
                                     for t, p in ((n0, t2t.attention1), (n1, t2t.attention2)))
    else:
        proj = stage.patch_embed.proj
        embed = total_frames * side * side * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * dim
    total = embed
    m = None if upstream is None else upstream * upstream * frames + 1  # upstream tokens per sequence
    for block in stage.blocks:
        width = block.norm2.normalized_shape[0]  # C, or C + 48 with feature reuse
        hidden = block.mlp.fc1.out_features
        per_sequence = _norm_macs(n * dim) + 4 * n * dim * dim + 2 * n * n * dim  # norm1, qkv + proj, QK^T + AV
        per_sequence += _norm_macs(n * width) + n * width * hidden + n * hidden * dim  # norm2, MLP
        if feature_reuse:
            per_sequence += _norm_macs(m * dim) + m * dim * REUSE_HIDDEN + m * REUSE_HIDDEN * REUSE_CHANNELS
            total += total_frames * 2 * REUSE_CHANNELS * (2 * upstream) ** 2  # upsampled elements, then pooled ones
        total += sequences * per_sequence
    if relation_reuse:
        channels = stage.relation_reuse_conv[0].in_channels
        total += sequences * 2 * m * m * channels * 3 * channels  # the two 1x1 convolutions
        total += total_frames * 2 * channels * (m + n) * (2 * upstream) ** 2  # keys then queries: upsampled + pooled
    total += (sequences * _norm_macs(n * dim) + dim * stage.num_classes) if head is None else head
    return total


class VideoDVT(DVT):
    """DVT on a video backbone: every exit reads each frame of the clip as a coarser or finer token grid
    (DVT.PATCH_SIZES / PATCH_PADDINGS, per frame), and a clip (one view) stops at the first exit confident about the
    clip, with all its frames. Reuse is frame by frame: an upstream frame's features and attention logits are
    resampled to the same frame of the finer grid (resample_matrix with frames), so attention between frames
    (TimeSformer's joint attention) carries over as it was. Costs are per clip (exit_macs, macs_per_image)."""

    takes_video = True

    def __init__(self, stages, feature_reuse: bool = True, relation_reuse: bool = True, thresholds=None,
                 img_size: int = 224, num_frames: int = 8):
        super().__init__(stages, feature_reuse, relation_reuse, thresholds, img_size)
        self.num_frames = num_frames

    def forward(self, video: Tensor) -> Tensor:
        check_video(video, type(self).__name__)
        if video.shape[2] != self.num_frames:  # costs are per clip of the last forward's length
            self.num_frames = video.shape[2]
            self._exit_macs.clear()
        return super().forward(video)

    def layout(self, stage) -> Tuple[int, int]:
        """(sequences per clip, frames per sequence) of a stage's tokens."""
        raise NotImplementedError

    def head_macs(self, stage, side: int) -> float:
        raise NotImplementedError

    def stage_macs(self, stage, side: int, upstream: Optional[int], size: int) -> float:
        reuse = upstream is not None
        sequences, frames = self.layout(stage)
        return _stage_macs(stage, side, upstream, reuse and self.feature_reuse, reuse and self.relation_reuse, size,
                           sequences, frames, self.head_macs(stage, side))


@MODEL_REGISTRY.register()
class DVTTimeSformer(VideoDVT):
    """DVT with TimeSformer exits (TIMESFORMER.ATTENTION_TYPE joint_space_time: one sequence of 1 + N * T tokens per
    clip, whose attention logits between all frames are reused; or space_only: each frame a sequence, reused as a
    DVT image). Divided attention is refused: its two attentions per block would each need their own reuse."""

    @classmethod
    def from_config(cls, cfg) -> "DVTTimeSformer":
        d = cfg.DVT
        check_undivided("DVT", cfg.TIMESFORMER.ATTENTION_TYPE)
        stages = [TimeSformer(**dict(TimeSformer.config_kwargs(cfg), patch_size=d.PATCH_SIZES[k],
                                     patch_padding=d.PATCH_PADDINGS[k])) for k in range(cls.num_exits)]
        return cls(stages, d.FEATURE_REUSE, d.RELATION_REUSE, d.THRESHOLDS or None, cfg.DATA.TEST_CROP_SIZE,
                   cfg.DATA.NUM_FRAMES)

    def layout(self, stage: TimeSformer) -> Tuple[int, int]:
        return (1, self.num_frames) if stage.attention_type == "joint_space_time" else (self.num_frames, 1)

    def head_macs(self, stage: TimeSformer, side: int) -> float:
        sequences, frames = self.layout(stage)
        normed = 1 if stage.attention_type == "space_only" else side * side * frames + 1  # space only: the mean CLS
        return _norm_macs(normed * stage.embed_dim) + stage.embed_dim * stage.num_classes


@MODEL_REGISTRY.register()
class DVTXViT(VideoDVT):
    """DVT with XViT exits: each exit an XViT (per-frame ViT with the space-time mixing shift, and its own temporal
    head); the frames are reused as DVT images, the shift mixes each exit's own keys and values."""

    @classmethod
    def from_config(cls, cfg) -> "DVTXViT":
        d = cfg.DVT
        stages = []
        for k in range(cls.num_exits):
            view = cfg.clone()
            view.defrost()
            view.VIT.PATCH_SIZE = d.PATCH_SIZES[k]
            stages.append(XViT.from_config(view, patch_padding=d.PATCH_PADDINGS[k]))
        return cls(stages, d.FEATURE_REUSE, d.RELATION_REUSE, d.THRESHOLDS or None, cfg.DATA.TEST_CROP_SIZE,
                   cfg.DATA.NUM_FRAMES)

    def layout(self, stage: XViT) -> Tuple[int, int]:
        return self.num_frames, 1

    def head_macs(self, stage: XViT, side: int) -> float:
        # The final norm on every token of every frame (base_model.norm), then the temporal head.
        return self.num_frames * _norm_macs((side * side + 1) * stage.embed_dim) + stage.consensus.macs(self.num_frames)


# --------------------------------------------------------------------------------------------------- config
def add_dvt_config(cfg) -> None:
    from fvcore.common.config import CfgNode

    cfg.DVT = CfgNode()
    # The stages' backbone: VisionTransformer (DeiT; VIT.* sizes) or T2TViT (VIT.* sizes and the T2T node).
    cfg.DVT.BACKBONE = "VisionTransformer"
    # DeiT backbone: patch size and zero padding of each exit's patch embedding (official 7x7 / 10x10 / 14x14 at
    # 224 px: 32, 23 with 3 px of padding, 16).
    cfg.DVT.PATCH_SIZES = [32, 23, 16]
    cfg.DVT.PATCH_PADDINGS = [0, 3, 0]
    # T2T backbone: each exit's T2T.TOKENS_TYPE (its soft-split schedule).
    cfg.DVT.TOKENS_TYPES = ["performer_less_less_token", "performer_less_token", "performer"]
    # The later exits reuse the earlier ones' features / attention relations (official: both).
    cfg.DVT.FEATURE_REUSE = True
    cfg.DVT.RELATION_REUSE = True
    # Early exit at test: confidence thresholds of exits 1 and 2 (a third value is accepted and ignored). Empty:
    # chosen by DVT.BUDGET_POINT / DVT.BUDGET_GMACS below, else every exit runs and the last one answers.
    cfg.DVT.THRESHOLDS = []
    # Operating point of the early-exit test, one of the official budget points 1..59 (exit proportions
    # (p/20)^[1,2,3], normalised): its thresholds from the threshold search (DVT.THRESHOLD_SOURCE search) or as
    # stored in an official checkpoint's `dynamic_threshold` (checkpoint). 0: none.
    cfg.DVT.BUDGET_POINT = 0
    cfg.DVT.THRESHOLD_SOURCE = "search"
    # Or the most accurate budget point whose expected GMACs per image on the threshold-search images is at most
    # this. 0: none.
    cfg.DVT.BUDGET_GMACS = 0.0
    # Test job: the budgeted-batch and anytime curves (accuracy vs mean GMACs; JSON and PNG in OUTPUT_DIR).
    cfg.DVT.CURVES = True
    # Threshold search (budgeted batch): DVT.THRESHOLD_IMAGES images of this split, drawn with DVT.THRESHOLD_SEED,
    # seen with the test transform (the official code uses 50,000 training images with train augmentation and an
    # unseeded draw, so its thresholds change run to run).
    cfg.DVT.THRESHOLD_SPLIT = "train"
    cfg.DVT.THRESHOLD_IMAGES = 50000
    cfg.DVT.THRESHOLD_SEED = 0


def validate_dvt_config(cfg) -> None:
    model = MODEL_REGISTRY.get(cfg.MODEL.NAME)
    if not issubclass(model, DVT):
        return
    d, k = cfg.DVT, DVT.num_exits
    if d.BACKBONE not in BACKBONES:
        raise ConfigError(f"DVT.BACKBONE {d.BACKBONE!r}: expected one of {', '.join(BACKBONES)}")
    if issubclass(model, VideoDVT) and d.BACKBONE != "VisionTransformer":
        raise ConfigError(f"{cfg.MODEL.NAME}'s exits are video backbones with DVT.PATCH_SIZES / PATCH_PADDINGS; "
                          f"DVT.BACKBONE {d.BACKBONE!r} is for images (MODEL.NAME DVT)")
    if issubclass(model, DVTTimeSformer) and cfg.TIMESFORMER.ATTENTION_TYPE == "divided_space_time":
        raise ConfigError("DVTTimeSformer runs with TIMESFORMER.ATTENTION_TYPE joint_space_time or space_only; "
                          "divided space-time attention is not supported (its two attentions per block would each "
                          "need their own relation reuse)")
    for key in ("PATCH_SIZES", "PATCH_PADDINGS", "TOKENS_TYPES"):
        if len(d[key]) != k:
            raise ConfigError(f"DVT.{key} needs one value per exit ({k}), got {list(d[key])}")
    sides = []
    for crop in (cfg.DATA.TRAIN_CROP_SIZE, cfg.DATA.TEST_CROP_SIZE):
        sides = []
        for i in range(k):
            if d.BACKBONE == "T2TViT":
                if d.TOKENS_TYPES[i] not in TOKEN_GRIDS:
                    raise ConfigError(f"DVT.TOKENS_TYPES[{i}] {d.TOKENS_TYPES[i]!r}: expected one of "
                                      f"{', '.join(sorted(TOKEN_GRIDS))}")
                side = crop
                for kernel, stride, padding in TOKEN_GRIDS[d.TOKENS_TYPES[i]]:
                    side = unfold_size(side, kernel, stride, padding)
            else:
                if d.PATCH_SIZES[i] < 1 or d.PATCH_PADDINGS[i] < 0:
                    raise ConfigError(f"DVT.PATCH_SIZES / PATCH_PADDINGS [{i}]: {d.PATCH_SIZES[i]} / "
                                      f"{d.PATCH_PADDINGS[i]}, expected a size >= 1 and a padding >= 0")
                if d.PATCH_PADDINGS[i] == 0 and crop % d.PATCH_SIZES[i]:
                    raise ConfigError(f"DVT.PATCH_SIZES[{i}] = {d.PATCH_SIZES[i]} does not divide the {crop} px crop; "
                                      f"give DVT.PATCH_PADDINGS[{i}] > 0 (zero padding, as the official 23 px "
                                      "patches with 3 px at 224 px) or another size")
                side = unfold_size(crop, d.PATCH_SIZES[i], d.PATCH_SIZES[i], d.PATCH_PADDINGS[i])
            if side < 1:
                raise ConfigError(f"DVT exit {i + 1} has no token for a {crop} px crop")
            sides.append(side)
        if any(b <= a for a, b in zip(sides, sides[1:])):
            raise ConfigError(f"DVT exits must see more and more tokens; the grids are {sides} at {crop} px "
                              "(DVT.PATCH_SIZES / DVT.TOKENS_TYPES)")
    if len(d.THRESHOLDS) not in (0, k - 1, k):
        raise ConfigError(f"DVT.THRESHOLDS needs {k - 1} values (exits 1..{k - 1}; a {k}th is ignored), got "
                          f"{list(d.THRESHOLDS)}")
    if not 0 <= d.BUDGET_POINT <= 59:
        raise ConfigError(f"DVT.BUDGET_POINT must be 0 (none) or one of the official points 1..59, got {d.BUDGET_POINT}")
    if d.THRESHOLD_SOURCE not in ("search", "checkpoint"):
        raise ConfigError(f"DVT.THRESHOLD_SOURCE {d.THRESHOLD_SOURCE!r}: expected search or checkpoint")
    chosen = [name for name, on in (("DVT.THRESHOLDS", bool(d.THRESHOLDS)), ("DVT.BUDGET_POINT", d.BUDGET_POINT > 0),
                                    ("DVT.BUDGET_GMACS", d.BUDGET_GMACS > 0)) if on]
    if len(chosen) > 1:
        raise ConfigError(f"{' and '.join(chosen)} both choose the early-exit thresholds; set only one")
    if d.BUDGET_GMACS < 0:
        raise ConfigError(f"DVT.BUDGET_GMACS must be >= 0 (0: none), got {d.BUDGET_GMACS}")
    if d.THRESHOLD_SOURCE == "checkpoint" and d.BUDGET_POINT == 0:
        raise ConfigError("DVT.THRESHOLD_SOURCE checkpoint reads the thresholds of DVT.BUDGET_POINT (1..59) from the "
                          "checkpoint's dynamic_threshold; set DVT.BUDGET_POINT")
    if d.THRESHOLD_IMAGES < 1:
        raise ConfigError(f"DVT.THRESHOLD_IMAGES must be >= 1, got {d.THRESHOLD_IMAGES}")
    if d.RELATION_REUSE and cfg.VIT.DEPTH * cfg.VIT.NUM_HEADS < 1:
        raise ConfigError("DVT.RELATION_REUSE needs VIT.DEPTH x VIT.NUM_HEADS >= 1")


register_config("DVT", add_dvt_config, validate_dvt_config,
                types={"DVT.THRESHOLDS": [float], "DVT.PATCH_SIZES": [int], "DVT.PATCH_PADDINGS": [int],
                       "DVT.TOKENS_TYPES": [str]})


def official_to_config_opts(config: dict) -> List[str]:
    """KEY VALUE overrides for a golden file's official DVT constructor arguments (config['ctor'][stage])."""
    ctors = [config["ctor"][name] for name in STAGE_NAMES]
    first, last = ctors[0], ctors[-1]
    t2t = config.get("backbone") == "t2t" or "tokens_type" in first
    pairs = {"MODEL.NAME": "DVT", "MODEL.NUM_CLASSES": first["num_classes"],
             "DATA.TRAIN_CROP_SIZE": first["img_size"], "DATA.TEST_CROP_SIZE": first["img_size"],
             "VIT.IN_CHANS": first["in_chans"], "VIT.EMBED_DIM": first["embed_dim"], "VIT.DEPTH": first["depth"],
             "VIT.NUM_HEADS": first["num_heads"], "VIT.MLP_RATIO": float(first["mlp_ratio"]),
             "VIT.QKV_BIAS": bool(first["qkv_bias"]), "VIT.DROP_RATE": float(first["drop_rate"]),
             "VIT.ATTN_DROP_RATE": float(first["attn_drop_rate"]), "VIT.DROP_PATH_RATE": float(first["drop_path_rate"]),
             "DVT.FEATURE_REUSE": bool(last["feature_reuse"]), "DVT.RELATION_REUSE": bool(last["relation_reuse"])}
    if t2t:
        pairs.update({"DVT.BACKBONE": "T2TViT", "DVT.TOKENS_TYPES": [c["tokens_type"] for c in ctors],
                      "T2T.TOKEN_DIM": first["token_dim"], "T2T.QK_SCALE": float(first["qk_scale"] or 0.0),
                      "T2T.NORM_EPS": 1e-5})
    else:
        # The official PatchEmbed: patch 16 or 32 as given, any other size is a 23 px, 3 px padded convolution.
        pairs.update({"DVT.BACKBONE": "VisionTransformer",
                      "DVT.PATCH_SIZES": [c["patch_size"] if c["patch_size"] in (16, 32) else 23 for c in ctors],
                      "DVT.PATCH_PADDINGS": [0 if c["patch_size"] in (16, 32) else 3 for c in ctors]})
    return [str(x) for kv in pairs.items() for x in kv]
