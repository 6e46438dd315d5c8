"""Video backbones on the shared ViT: TimeSformer (divided / joint space-time, space only) and XViT.

Both are the image backbone's Block, Attention and TokenBatch with a video token layout (spec video.md 1-2):
- TimeSformer: one sequence per clip, a single CLS then patch n of frame t at 1 + n * T + t (space-major,
  time-minor, the official order). Divided attention adds a temporal sub-layer to the shared Block
  (DividedSpaceTimeBlock); joint attention is the plain Block over all 1 + N * T tokens; space only runs the
  plain Block per frame and averages the frames before the final norm.
- XViT: the image ViT on every frame (its own CLS each), with the space-time mixing shift of keys and values
  (TemporalShift, through Attention.kv_mixing) and a one-block temporal transformer over the frames' CLS
  outputs (TemporalHead).
State-dict keys are the official ones (TimeSformer's inner model; XViT's base_model. / consensus.), so released
checkpoints load strictly after `adapt_official_state_dict` (prefixes, XViT's unused new_fc, inflation of an
ImageNet ViT).
"""

import math
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import Tensor, nn

from vitadapt.config import register_config

from .build import MODEL_REGISTRY
from .flops import block_macs, vit_macs
from .tokens import TokenBatch
from .vit import Attention, Block, VisionTransformer, _init_linear_and_norm, vit_kwargs

ATTENTION_TYPES = ("divided_space_time", "joint_space_time", "space_only")
POS_EMBED_RESIZES = ("official", "grid")


def frames_of(video: Tensor) -> Tensor:
    """[B, C, T, H, W] -> [B * T, C, H, W], row b * T + t (the layout of every per-frame computation here)."""
    b, c, t, h, w = video.shape
    return video.transpose(1, 2).reshape(b * t, c, h, w)


def check_video(video: Tensor, model: str) -> None:
    if video.dim() != 5:
        raise ValueError(f"{model} takes clips [B, C, T, H, W], got a tensor of shape {tuple(video.shape)}")


def to_frames(patches: Tensor, frames: int) -> Tensor:
    """[B, N * T, ...] in the clip order (patch n of frame t at n * T + t) -> [B * T, N, ...], one row per frame."""
    b, nt = patches.shape[:2]
    return patches.reshape(b, nt // frames, frames, *patches.shape[2:]).transpose(1, 2).reshape(
        b * frames, nt // frames, *patches.shape[2:])


def from_frames(per_frame: Tensor, frames: int) -> Tensor:
    """Inverse of to_frames: [B * T, N, ...] -> [B, N * T, ...]."""
    bt, n = per_frame.shape[:2]
    return per_frame.reshape(bt // frames, frames, n, *per_frame.shape[2:]).transpose(1, 2).reshape(
        bt // frames, n * frames, *per_frame.shape[2:])


def compacts(grid: TokenBatch) -> bool:
    """Packed execution of a grid with dropped tokens: sub-layers run on its live tokens only."""
    return grid.keep is not None and grid.execution == "packed"


def on_live(layer, grid: TokenBatch) -> TokenBatch:
    """layer(tokens) -> tokens on a grid whose tokens must stay in place: on its live tokens only, written back into
    the grid, when it compacts; on the grid as it is otherwise."""
    return layer(grid.packed_live()).into_grid(grid) if compacts(grid) else layer(grid)


class DividedSpaceTimeBlock(Block):
    """TimeSformer's divided space-time attention (official Block, attention_type 'divided_space_time').

    1. temporal: attention over the T tokens of each patch location (CLS excluded), then temporal_fc, added to
       the patch tokens (stochastic depth before temporal_fc, as the official block);
    2. spatial: the shared attention sub-layer per frame, on the post-temporal tokens with the CLS copied into
       every frame; the CLS leaves as the mean of its T copies (= CLS + the mean of the T updates);
    3. the shared MLP sub-layer on the whole sequence.
    Keys: the plain Block's plus temporal_norm1, temporal_attn.{qkv,proj} and temporal_fc.

    A token method (spec video.md 3.4) marks tokens dropped in a [B, 1 + N * T] keep mask; tokens keep their place,
    since both attentions need the (location, frame) grid. A dropped token is no key in the temporal attention of
    its location nor in the spatial attention of its frame, and gets no update. Packed execution packs the live
    tokens of each sub-layer's layout (locations, frames, clip) and computes it on them only, then writes them back
    into the grid (`on_live`); masked execution computes the whole grid, as the official block would. The method's after_attention
    runs after the spatial attention, per frame (adapter.video_scope "frame": each frame's CLS copy scores its
    frame) or once per clip ("clip": the frame-averaged CLS attention scores all N * T tokens, the attention the
    official CLS update averages).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 qk_scale: Optional[float] = None):
        super().__init__(dim, num_heads, mlp_ratio, qkv_bias, drop, attn_drop, drop_path, norm_eps, qk_scale)
        self.temporal_norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.temporal_attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, qk_scale=qk_scale)
        self.temporal_fc = nn.Linear(dim, dim)
        # [B] MACs and LayerNorm-ed elements of each clip in the last forward, from its live tokens.
        self.last_macs: Optional[Tensor] = None
        self.last_norm_elements: Optional[Tensor] = None

    def forward(self, tokens: TokenBatch) -> TokenBatch:
        adapter = self.adapter
        if adapter is not None:
            tokens = adapter.before_block(tokens)
        x, t = tokens.x, tokens.frames
        b, length, c = x.shape
        n = (length - 1) // t
        live = tokens.live_mask()[:, 1:]  # [B, N * T] patch tokens no method dropped
        masked = tokens.keep is not None
        along_time = TokenBatch.dense(x[:, 1:].reshape(b * n, t, c), tokens.execution)  # one row per location
        if masked:
            along_time = along_time.with_keep(live.reshape(b * n, t))
        out = on_live(self.temporal_residual_update, along_time).x.reshape(b, n * t, c)
        patches = x[:, 1:] + (out * live[..., None].to(out.dtype) if masked else out)
        frames = TokenBatch.dense(torch.cat([x[:, :1].repeat_interleave(t, dim=0), to_frames(patches, t)], dim=1),
                                  tokens.execution)  # tokens stay in place: the grid is rebuilt below
        if masked:
            frames = frames.with_keep(torch.cat([live.new_ones(b * t, 1), to_frames(live, t)], dim=1))
        frame_live = frames.num_live()
        spatial = frames.packed_live() if compacts(frames) else frames
        out, cls_attention, values = self.attention_residual(spatial, adapter)
        if adapter is not None and adapter.video_scope == "frame":
            out = adapter.after_attention(out, cls_attention, values)
        if spatial.is_packed and cls_attention is not None:  # the clip scope reads them on the grid
            cls_attention, values = spatial.grid_layout(cls_attention, 1 + n, 2), spatial.grid_layout(values, 1 + n, 2)
        frames = out.into_grid(frames) if out.is_packed else out  # a selection in packed execution packs too
        cls = frames.x[:, :1].reshape(b, t, 1, c).mean(dim=1)
        keep = None if frames.keep is None else torch.cat([live.new_ones(b, 1), from_frames(frames.keep[:, 1:], t)],
                                                          dim=1)
        clip = tokens.replace(x=torch.cat([cls, from_frames(frames.x[:, 1:], t)], dim=1), keep=keep)
        if adapter is not None and adapter.video_scope == "clip":
            selected = adapter.after_attention(clip, *clip_attention(cls_attention, values, t))
            clip = selected.into_grid(clip) if selected.is_packed else selected
        n_attn, n_mlp = 1 + live.sum(dim=1), clip.num_live()
        clip.token_counts.append(torch.stack([n_attn, n_mlp], dim=1))
        self.count_macs(live.reshape(b, n, t).sum(dim=2), frame_live.reshape(b, t), n_mlp)
        tokens = on_live(lambda rows: self.feed_forward(rows, adapter), clip)
        if adapter is not None:
            tokens = adapter.after_block(tokens)
        return tokens

    def temporal_residual_update(self, rows: TokenBatch) -> TokenBatch:
        """temporal_fc(temporal attention): the update of the patch tokens, rows of one location's T frames."""
        out = self.temporal_attn(self.temporal_norm1(rows.x), rows)[0]
        return rows.replace(x=self.temporal_fc(rows.drop_path(out, self.drop_path, self.training)))

    def count_macs(self, per_location: Tensor, per_frame: Tensor, n_mlp: Tensor) -> None:
        """The block's cost per clip from its live tokens: per_location [B, N] live patch tokens of each location
        (temporal attention), per_frame [B, T] live tokens of each frame's sequence, CLS copy included (spatial
        attention), n_mlp [B] live tokens after the method's decision (MLP)."""
        c, hidden = self.norm1.normalized_shape[0], self.mlp.fc1.out_features
        p, f, m = per_location.double(), per_frame.double(), n_mlp.double()
        patches = p.sum(dim=1)
        temporal = 4 * patches * c * c + 2 * (p * p).sum(dim=1) * c + patches * c * c  # qkv, proj, QK/AV, fc
        spatial = 4 * f.sum(dim=1) * c * c + 2 * (f * f).sum(dim=1) * c
        if self.attn.cls_row_on_side:  # each frame's CLS row for the method, q_cls K^T (see vit_macs)
            spatial = spatial + f.sum(dim=1) * c
        self.last_macs = temporal + spatial + 2 * m * c * hidden
        self.last_norm_elements = patches + f.sum(dim=1) + m


def clip_attention(cls_attention: Tensor, values: Tensor, frames: int):
    """Per-frame CLS attention rows [B * T, H, 1 + N] and values [B * T, H, 1 + N, D] as one clip-level row
    [B, H, 1 + N * T] and values [B, H, 1 + N * T, D]: patch n of frame t at 1 + n * T + t, its weight the frame
    CLS copy's divided by T (the official CLS update is the mean of the T copies' updates)."""
    bt, h, n1 = cls_attention.shape
    b = bt // frames
    rows = cls_attention.reshape(b, frames, h, n1)
    cls = rows[:, :, :, :1].mean(dim=1)
    patches = from_frames(cls_attention[:, :, 1:].transpose(1, 2), frames).transpose(1, 2) / frames
    v = values.transpose(1, 2)  # [B * T, 1 + N, H, D]
    v_cls = v[:, :1].reshape(b, frames, 1, *v.shape[2:]).mean(dim=1)
    v_clip = torch.cat([v_cls, from_frames(v[:, 1:], frames)], dim=1).transpose(1, 2)
    return torch.cat([cls, patches], dim=2), v_clip


def resize_pos_grid(pos: Tensor, grid, mode: str = "nearest", scale: Optional[float] = None) -> Tensor:
    """pos [1, 1 + h * w, C] (CLS first, square grid) resized on its 2-D grid to `grid` (h', w'); with `scale`,
    by that factor (XViT's per-forward bicubic resize)."""
    side = int(round(math.sqrt(pos.shape[1] - 1)))
    patches = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if scale is None:
        patches = F.interpolate(patches, size=tuple(grid), mode=mode)
    else:
        patches = F.interpolate(patches, scale_factor=scale, mode=mode)
    return torch.cat([pos[:, :1], patches.flatten(2).transpose(1, 2)], dim=1)


def resize_sequence(embed: Tensor, length: int) -> Tensor:
    """[1, L, C] -> [1, length, C] by 1-D nearest interpolation along the sequence (the official TimeSformer
    resize of time_embed, and of the flattened pos_embed patches when inflating)."""
    return F.interpolate(embed.transpose(1, 2), size=length, mode="nearest").transpose(1, 2)


@MODEL_REGISTRY.register()
class TimeSformer(VisionTransformer):
    """TimeSformer (Bertasius et al., ICML 2021), official `timesformer/models/vit.py` VisionTransformer.

    Input clips [B, 3, T, H, W]. `time_embed` (1, T, C) is added to every patch token (not the CLS) unless
    attention is space only. `pos_resize` is how an ImageNet checkpoint's pos_embed meets another patch count:
    "official" (1-D nearest on the flattened sequence, which scrambles the 2-D layout unless the count is the
    same) or "grid" (2-D resize of the patch grid).
    """

    takes_video = True  # clips [B, C, T, H, W] (models.build.input_shape)

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 400,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.1, head_drop_rate: float = 0.0, token_execution: str = "packed",
                 num_frames: int = 8, attention_type: str = "divided_space_time", pos_resize: str = "official",
                 patch_padding: int = 0):
        if attention_type not in ATTENTION_TYPES:
            raise ValueError(f"attention_type must be one of {ATTENTION_TYPES}, got '{attention_type}'")
        if pos_resize not in POS_EMBED_RESIZES:
            raise ValueError(f"pos_resize must be one of {POS_EMBED_RESIZES}, got '{pos_resize}'")
        self.attention_type, self.num_frames, self.pos_resize = attention_type, num_frames, pos_resize
        block = DividedSpaceTimeBlock if attention_type == "divided_space_time" else Block
        super().__init__(img_size, patch_size, in_chans, num_classes, embed_dim, depth, num_heads, mlp_ratio,
                         qkv_bias, drop_rate, attn_drop_rate, drop_path_rate, head_drop_rate, token_execution,
                         patch_padding=patch_padding, block_class=block)
        if attention_type != "space_only":
            self.time_embed = nn.Parameter(torch.zeros(1, num_frames, embed_dim))  # zero: the official init
            self.time_drop = nn.Dropout(drop_rate)

    @classmethod
    def from_config(cls, cfg) -> "TimeSformer":
        return cls(**cls.config_kwargs(cfg))

    @staticmethod
    def config_kwargs(cfg) -> dict:
        t = cfg.TIMESFORMER
        return dict(vit_kwargs(cfg), num_frames=cfg.DATA.NUM_FRAMES, attention_type=t.ATTENTION_TYPE,
                    pos_resize=t.POS_EMBED_RESIZE)

    def init_weights(self) -> None:
        """The official initialisation: trunc-normal(.02) pos_embed, cls_token and Linear weights; time_embed and
        every temporal_fc zero, so a new or inflated model starts as a per-frame image model."""
        trunc_normal_(self.pos_embed, std=0.02)
        trunc_normal_(self.cls_token, std=0.02)
        self.apply(_init_linear_and_norm)
        for block in self.blocks:
            if isinstance(block, DividedSpaceTimeBlock):
                nn.init.zeros_(block.temporal_fc.weight)
                nn.init.zeros_(block.temporal_fc.bias)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "time_embed"}

    def embed(self, video: Tensor) -> TokenBatch:
        check_video(video, "TimeSformer")
        b, _, t, h, w = video.shape
        x = self.patch_embed(frames_of(video))  # [B * T, N, C]
        grid = self.grid_for((h, w))
        pos = self.pos_embed
        if grid != tuple(self.patch_grid):  # official: nearest 2-D resize of the grid in the forward
            pos = resize_pos_grid(pos, grid, mode="nearest")
        x = self.pos_drop(torch.cat([self.cls_token.expand(b * t, -1, -1), x], dim=1) + pos)
        if self.attention_type == "space_only":
            return TokenBatch.dense(x, self.token_execution, frames=t)
        # Divided attention keeps every token in place (its blocks need the (location, frame) grid); packed execution
        # computes each of its sub-layers on the live tokens only (DividedSpaceTimeBlock).
        execution = self.token_execution
        n, c = x.shape[1] - 1, x.shape[2]
        time = self.time_embed if self.time_embed.shape[1] == t else resize_sequence(self.time_embed, t)
        patches = x[:, 1:].reshape(b, t, n, c).transpose(1, 2) + time[:, None]  # [B, N, T, C]
        x = torch.cat([x[::t, :1], self.time_drop(patches.reshape(b, n * t, c))], dim=1)
        return TokenBatch.dense(x, execution, frames=t)

    def forward_features(self, video: Tensor) -> TokenBatch:
        # run_blocks traces token ids per sequence (a clip, or a frame for space only): see frame_token_ids.
        return self.final_tokens(self.run_blocks(self.embed(video)))

    def final_tokens(self, tokens: TokenBatch) -> TokenBatch:
        if self.attention_type == "space_only":
            # Official: the frames' sequences averaged, the final norm, then the CLS. The norm works per token, so
            # the frames' CLS tokens averaged are all it needs (whatever tokens a method left in each frame).
            cls = tokens.cls_tokens().reshape(-1, tokens.frames, tokens.x.shape[-1]).mean(dim=1)
            tokens = TokenBatch.dense(cls[:, None], self.token_execution, frames=tokens.frames).replace(
                token_counts=tokens.token_counts)  # the counts stay the frames'
        return tokens.replace(x=self.norm(tokens.x))

    def forward(self, video: Tensor) -> Tensor:
        self.last_clip_shape = tuple(int(s) for s in video.shape)  # ints, also under fvcore's trace
        tokens = self.forward_features(video)
        # Live tokens at every block, [sequences, depth, 2] (joint and divided: one row per clip, space only: per
        # frame), and per clip (last_token_counts, what the engine's statistics read).
        counts = tokens.counts_per_block().detach() if tokens.token_counts else None
        self.last_sequence_token_counts = counts
        rows = tokens.frames if self.attention_type == "space_only" else 1  # sequences per clip
        self.last_token_counts = None if counts is None else counts.reshape(-1, rows, *counts.shape[1:]).sum(dim=1)
        return self.forward_head(tokens)

    def frame_token_ids(self) -> List[Tensor]:
        """Per block, [B, T, L] the live tokens of every frame after it, as image ids (0 CLS, 1 + n patch n, -1 for
        an empty slot), from last_token_ids: a clip-level token 1 + n * T + t is patch n of frame t."""
        b, _, t = self.last_clip_shape[:3]
        out = []
        for ids in self.last_token_ids:
            if self.attention_type == "space_only":
                out.append(ids.reshape(b, t, -1))
                continue
            patch = ids - 1  # -1 -> -2 (none), 0 -> -1 (CLS)
            frame = torch.arange(t, device=ids.device)[None, :, None]
            mine = (patch[:, None, :] >= 0) & (patch[:, None, :] % t == frame)
            per_frame = torch.where(mine, patch[:, None, :] // t + 1, torch.full_like(mine, -1, dtype=ids.dtype))
            out.append(torch.cat([torch.zeros_like(per_frame[..., :1]), per_frame], dim=-1))  # the CLS is shared
        return out

    def macs_per_image(self, layer_norms: bool = False) -> Tensor:
        """[B] MACs per clip of the last forward, from the tokens each block saw (divided attention: the live
        tokens of each of its sub-layers, what packed execution computes). `layer_norms` adds fvcore's 5 per normalised element, the convention of the
        official FLOPs figures (spec video.md 1.8)."""
        b, _, t, h, w = self.last_clip_shape
        c = self.embed_dim
        head = c * self.num_classes if self.num_classes > 0 else 0
        if self.attention_type == "divided_space_time":  # each block counted its clips' live tokens
            proj = self.patch_embed.proj
            n = (h // proj.kernel_size[0]) * (w // proj.kernel_size[1])
            macs = n * t * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * c + head
            macs = macs + sum(block.last_macs for block in self.blocks)
            if layer_norms:  # the final norm runs on every token of the sequence
                macs = macs + 5 * c * (sum(block.last_norm_elements for block in self.blocks) + 1 + n * t)
            return macs
        counts = self.last_sequence_token_counts
        # Per sequence: patch embedding and blocks (vit_macs counts one head per sequence), norm1 / norm2 inputs.
        macs = vit_macs(self, counts) - head + (5 * c * counts.sum(dim=(1, 2)).double() if layer_norms else 0)
        if self.attention_type == "space_only":
            return macs.reshape(b, t).sum(dim=1) + head + (5 * c if layer_norms else 0)  # final norm: the CLS
        return macs + head + (5 * c * counts[:, -1, 1].double() if layer_norms else 0)

    # ------------------------------------------------------------------ checkpoints
    def adapt_official_state_dict(self, sd: Dict[str, Tensor], report) -> Dict[str, Tensor]:
        """Released TimeSformer files ({'model_state': {'model.' + key}}) lose the wrapper's prefix. When
        fine-tuning, an ImageNet ViT / DeiT file (no time_embed, no temporal_* key) is inflated as the official
        load_pretrained does (spec video.md 1.5): temporal_attn from attn and temporal_norm1 from norm1 in every
        block, temporal_fc and time_embed from this model's initialisation (zero), pos_embed resized per
        `pos_resize` when the patch count differs. For evaluation such a file is refused (missing keys), as is a
        video file that lacks any key."""
        if sd and all(k.startswith("model.") for k in sd):
            sd = {k[len("model."):]: v for k, v in sd.items()}
            report.converted.append("'model.' prefix of the official wrapper removed")
        own = self.state_dict()
        image_vit = "blocks.0.attn.qkv.weight" in sd and not any(k == "time_embed" or ".temporal_" in k for k in sd)
        if image_vit and "time_embed" in own and getattr(report, "fine_tuning", False):
            sd = self._inflate(sd, own, report)
        time = sd.get("time_embed")
        if time is not None and "time_embed" in own and time.shape != own["time_embed"].shape:
            sd = dict(sd, time_embed=resize_sequence(time, own["time_embed"].shape[1]))
            report.resized.append(f"time_embed {tuple(time.shape)} -> {tuple(own['time_embed'].shape)} (1-D "
                                  "nearest, official)")
        return sd

    def _inflate(self, sd: Dict[str, Tensor], own: Dict[str, Tensor], report) -> Dict[str, Tensor]:
        sd = dict(sd)
        from_init = ["time_embed"]
        for i, block in enumerate(self.blocks):
            if not isinstance(block, DividedSpaceTimeBlock):
                continue
            for part, source in (("temporal_attn", "attn"), ("temporal_norm1", "norm1")):
                for key in [k for k in own if k.startswith(f"blocks.{i}.{part}.")]:
                    src = key.replace(f".{part}.", f".{source}.")
                    if key not in sd and src in sd:
                        sd[key] = sd[src].clone()
            from_init += [f"blocks.{i}.temporal_fc.weight", f"blocks.{i}.temporal_fc.bias"]
        for key in from_init:
            sd.setdefault(key, own[key])
        divided = self.attention_type == "divided_space_time"
        report.converted.append("inflated from an image ViT: " + ("temporal_attn.* <- attn.* and temporal_norm1.* "
                                "<- norm1.* in every block; temporal_fc.* and " if divided else "")
                                + "time_embed from this model's initialisation (zero, as the official init)")
        pos, target = sd.get("pos_embed"), own["pos_embed"]
        if pos is not None and pos.shape[1] != target.shape[1] and self.pos_resize == "official":
            # Official: 1-D nearest over the flattened patches (the 2-D layout is only kept when the count is).
            sd["pos_embed"] = torch.cat([pos[:, :1], resize_sequence(pos[:, 1:], target.shape[1] - 1)], dim=1)
            report.resized.append(f"pos_embed {tuple(pos.shape)} -> {tuple(target.shape)} (1-D nearest over the "
                                  "flattened patches, official; TIMESFORMER.POS_EMBED_RESIZE grid resizes the grid)")
        return sd  # "grid": adapt_vit_state_dict resamples the 2-D grid afterwards


def check_undivided(method: str, attention_type: str) -> None:
    """A token method whose decision needs one sequence per clip or per frame refuses divided attention, whose
    blocks reshape the full [B, N, T] grid (spec video.md 3.4 designs it; vitadapt does not have it yet)."""
    if attention_type == "divided_space_time":
        raise ValueError(f"{method} on TimeSformer runs with TIMESFORMER.ATTENTION_TYPE joint_space_time or "
                         "space_only; divided space-time attention is not supported yet")


def timesformer_macs(model: TimeSformer, n: int, t: int, layer_norms: bool = False) -> float:
    """MACs of one clip of T frames with N patches each (fvcore's convention: one multiply-add = 1)."""
    c = model.embed_dim
    hidden = model.blocks[0].mlp.fc1.out_features
    k = model.patch_embed.proj.kernel_size
    total = n * t * model.patch_embed.proj.in_channels * k[0] * k[1] * c
    tokens = 1 + n * t
    normed = 0  # elements through a LayerNorm
    for _ in model.blocks:
        if model.attention_type == "joint_space_time":
            total += _block(tokens, tokens, c, hidden)
            normed += 2 * tokens
        elif model.attention_type == "space_only":
            total += t * _block(1 + n, 1 + n, c, hidden)
            normed += 2 * t * (1 + n)
        else:  # temporal qkv/proj/attention over T per location, temporal_fc, spatial per frame, MLP on all
            total += 4 * n * t * c * c + 2 * n * t * t * c + n * t * c * c
            total += t * (4 * (1 + n) * c * c + 2 * (1 + n) ** 2 * c) + 2 * tokens * c * hidden
            normed += n * t + t * (1 + n) + tokens
    normed += 1 if model.attention_type == "space_only" else tokens  # space only: the frames' mean CLS
    total += c * model.num_classes if model.num_classes > 0 else 0
    return float(total + (5 * normed * c if layer_norms else 0))


def _block(n_attn: int, n_mlp: int, dim: int, hidden: int) -> float:
    return block_macs(torch.tensor(float(n_attn)), torch.tensor(float(n_mlp)), dim, hidden).item()


class TemporalShift(nn.Module):
    """XViT's space-time mixing (official temporal_shift.py): keys or values [R, heads, L, head_dim], R = clips x
    `segments` consecutive frames. Over the concatenated heads (channel head * head_dim + j), channels [0, C/div)
    come from the next frame of the segment and [C/div, 2C/div) from the previous one, zeros at the segment's ends;
    every token (CLS included) takes them from the token at its own position in the neighbouring frame.

    Position means the original patch (TokenBatch.ids), so the shift stays right when a method drops or reorders
    tokens per frame: a neighbour that is not there (dropped, or a token made by a method, such as EViT's fused
    one) gives zeros, as the official zero padding does at the ends of a segment."""

    def __init__(self, segments: int, fold_div: int):
        super().__init__()
        self.segments, self.fold_div = segments, fold_div

    def forward(self, x: Tensor, tokens: Optional[TokenBatch] = None) -> Tensor:
        r, heads, length, d = x.shape
        if r % self.segments:
            raise ValueError(f"XViT's shift groups frames in segments of {self.segments} (XVIT.NUM_SEGMENTS), "
                             f"but got {r} frames in the batch")
        if tokens is None or (tokens.keep is None and not tokens.is_packed and length == tokens.num_initial
                              and bool((tokens.ids == torch.arange(length, device=x.device)).all())):
            return self.shift(x)  # every token at its own position: shift the sequence as it is
        # Tokens by original position: scatter into the full grid, shift it, read every token's position back.
        ids, live = tokens.padded(tokens.ids), tokens.live_mask()
        live = live & (ids >= 0) & (ids < tokens.num_initial)
        slot = torch.where(live, ids, tokens.num_initial)[..., None]  # dead slots, made-up tokens: a spare column

        def by_position(moving: Tensor) -> Tensor:
            index = slot.expand(-1, -1, moving.shape[-1])
            grid = moving.new_zeros(r, tokens.num_initial + 1, moving.shape[-1])
            grid.scatter_(1, index, moving * live[..., None].to(moving.dtype))
            grid[:, -1] = 0
            return self._shift(grid).gather(1, index)

        return self._move_channels(x, by_position)

    def shift(self, x: Tensor) -> Tensor:
        """x [R, heads, L, head_dim] shifted as the sequence is, whatever the tokens (no position alignment)."""
        return self._move_channels(x, self._shift)

    def _move_channels(self, x: Tensor, move) -> Tensor:
        """Only the 2 C / div shifted channels move (channels last, through `move`); the others stay the token's."""
        r, heads, length, d = x.shape
        channels = x.transpose(1, 2).reshape(r, length, heads * d)
        moved = move(channels[..., :2 * (heads * d // self.fold_div)])
        out = torch.cat([moved, channels[..., moved.shape[-1]:]], dim=-1)
        return out.reshape(r, length, heads, d).transpose(1, 2)

    def _shift(self, x: Tensor) -> Tensor:
        """[R, L, 2 fold] channels: [0, fold) from the next frame of the segment, [fold, 2 fold) from the previous."""
        r, length, width = x.shape
        fold = width // 2
        x = x.reshape(r // self.segments, self.segments, length, width)
        zeros = x.new_zeros(x.shape[0], 1, length, fold)
        out = torch.cat([torch.cat([x[:, 1:, :, :fold], zeros], dim=1),
                         torch.cat([zeros, x[:, :-1, :, fold:]], dim=1)], dim=-1)
        return out.reshape(r, length, width)


class FrameViT(VisionTransformer):
    """XViT's backbone (official transformers/vit.py with make_temporal_shift): the image ViT on each frame, a
    temporal embedding (1, F, 1, C) added to consecutive groups of F frames, and TemporalShift on the keys and
    values of the blocks in `shift_blocks`. The stored pos_embed is for `img_size` (224 in the official files)
    and is bicubic-resized by the grid ratio in every forward at another input size, as the official code does.
    It has no classifier: the frame features go to the temporal head (the official head is a Dropout)."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0,
                 feature_drop_rate: float = 0.0, token_execution: str = "packed", num_frames: int = 8,
                 segments: int = 8, shift_div: int = 8, shift_blocks: Sequence[int] = (), patch_padding: int = 0):
        super().__init__(img_size, patch_size, in_chans, 0, embed_dim, depth, num_heads, mlp_ratio, qkv_bias,
                         drop_rate, attn_drop_rate, drop_path_rate, feature_drop_rate, token_execution,
                         patch_padding=patch_padding)
        self.temp_embed = nn.Parameter(torch.zeros(1, num_frames, 1, embed_dim))
        self.segments = segments
        for i in shift_blocks:
            if i < depth:  # the official configs list 0..14 for 12 blocks
                self.blocks[i].attn.kv_mixing = TemporalShift(segments, shift_div)
        trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token", "temp_embed"}

    def pos_embed_at(self, grid) -> Tensor:
        """The positional embedding for a patch grid: the stored one, or its bicubic resize by the grid ratio."""
        if tuple(grid) == tuple(self.patch_grid):
            return self.pos_embed
        return resize_pos_grid(self.pos_embed, grid, mode="bicubic", scale=grid[0] / self.patch_grid[0])

    def embed(self, frames: Tensor) -> TokenBatch:
        groups = self.temp_embed.shape[1]
        if frames.shape[0] % groups or frames.shape[0] % self.segments:
            raise ValueError(f"XViT groups the frames of a clip by {groups} (XVIT.NUM_FRAMES_EMBED) and "
                             f"{self.segments} (XVIT.NUM_SEGMENTS): the clip length must be a multiple of both")
        x = self.patch_embed(frames)
        grid = self.grid_for(frames.shape[-2:])
        x = self.pos_drop(torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed_at(grid))
        x = (x.reshape(-1, groups, *x.shape[1:]) + self.temp_embed).reshape(x.shape)
        return TokenBatch.dense(x, self.token_execution, frames=groups)


class TemporalHead(nn.Module):
    """XViT's temporal aggregation (official VitHead): a CLS token (zero at start) and `depth` transformer blocks
    (no qkv bias, LayerNorm eps 1e-5) over the frames' features, then LayerNorm-Linear-GELU-Dropout-Linear on the
    CLS."""

    def __init__(self, dim: int, num_heads: int, depth: int, mlp_dim: int, num_classes: int, dropout: float,
                 hidden_dropout: float = 0.0, attention_dropout: float = 0.0):
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.temporal_encoder = nn.ModuleList(
            Block(dim, num_heads, 4.0, qkv_bias=False, drop=hidden_dropout, attn_drop=attention_dropout,
                  drop_path=hidden_dropout, norm_eps=1e-5) for _ in range(depth))
        self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                                      nn.Linear(mlp_dim, num_classes))
        # torch's default initialisation, as the official VitHead (no trunc-normal 0.02 here: a head that small
        # starts with near-constant logits and trains from scratch through a long plateau).

    def forward(self, features: Tensor) -> Tensor:
        x = torch.cat([self.cls_token.expand(features.shape[0], -1, -1), features], dim=1)
        tokens = TokenBatch.dense(x)
        for block in self.temporal_encoder:
            tokens = block(tokens)
        return self.mlp_head(tokens.x[:, 0])

    def macs(self, frames: int) -> float:
        dim = self.cls_token.shape[-1]
        blocks = sum(_block(frames + 1, frames + 1, dim, b.mlp.fc1.out_features) for b in self.temporal_encoder)
        hidden, classes = self.mlp_head[1].out_features, self.mlp_head[4].out_features
        return blocks + dim * hidden + hidden * classes


@MODEL_REGISTRY.register()
class XViT(nn.Module):
    """XViT (Bulat et al., NeurIPS 2021), official `XVIT` with CONSENSUS_TYPE 'vit' and USE_XVIT: FrameViT as
    `base_model`, TemporalHead as `consensus`. Input clips [B, 3, T, H, W]."""

    takes_video = True
    # The per-frame backbone: a method on XViT (ATSXViT, ...) names its own FrameViT subclass and arguments.
    frame_model = FrameViT

    @staticmethod
    def frame_model_kwargs(cfg) -> dict:
        return {}

    def __init__(self, base_model: FrameViT, consensus: TemporalHead):
        super().__init__()
        self.base_model, self.consensus = base_model, consensus
        self.num_classes = consensus.mlp_head[4].out_features

    @classmethod
    def from_config(cls, cfg, **frame_kwargs) -> "XViT":
        """frame_kwargs: more arguments of the frame model (DVT's exits: patch_padding)."""
        v, x, h = cfg.VIT, cfg.XVIT, cfg.TEMPORAL_HEAD
        base = cls.frame_model(img_size=x.POS_EMBED_IMG_SIZE, patch_size=v.PATCH_SIZE, in_chans=v.IN_CHANS,
                        embed_dim=v.EMBED_DIM, depth=v.DEPTH, num_heads=v.NUM_HEADS, mlp_ratio=v.MLP_RATIO,
                        qkv_bias=v.QKV_BIAS, drop_rate=v.DROP_RATE, attn_drop_rate=v.ATTN_DROP_RATE,
                        drop_path_rate=v.DROP_PATH_RATE, feature_drop_rate=x.DROPOUT_RATE,
                        token_execution=v.TOKEN_EXECUTION, num_frames=x.NUM_FRAMES_EMBED,
                        segments=x.NUM_SEGMENTS, shift_div=x.SHIFT_DIV,
                        shift_blocks=x.LOCATIONS_LIST if x.USE_XVIT else (), **cls.frame_model_kwargs(cfg), **frame_kwargs)
        head = TemporalHead(v.EMBED_DIM, h.NUM_ATTENTION_HEADS, h.NUM_HIDDEN_LAYERS, h.MLP_DIM, cfg.MODEL.NUM_CLASSES,
                            x.DROPOUT_RATE, h.HIDDEN_DROPOUT_PROB, h.ATTENTION_PROBS_DROPOUT_PROB)
        return cls(base, head)

    def forward(self, video: Tensor) -> Tensor:
        check_video(video, "XViT")
        b, _, t = video.shape[:3]
        self.last_clip_shape = tuple(int(s) for s in video.shape)
        features = self.base_model(frames_of(video))  # [B * T, C], the frames' CLS features
        return self.consensus(features.reshape(b, t, -1))

    # The backbone steps of VisionTransformer (embed, blocks, final_tokens, forward_head), so that a model built of
    # backbones (DVT's cascade) runs XViT as it runs an image ViT: the frames through base_model, the head per clip.
    def embed(self, video: Tensor) -> TokenBatch:
        check_video(video, "XViT")
        self.last_clip_shape = tuple(int(s) for s in video.shape)
        return self.base_model.embed(frames_of(video))

    @property
    def blocks(self) -> nn.ModuleList:
        return self.base_model.blocks

    @property
    def patch_embed(self) -> nn.Module:
        return self.base_model.patch_embed

    @property
    def embed_dim(self) -> int:
        return self.base_model.embed_dim

    def grid_for(self, size):
        return self.base_model.grid_for(size)

    def final_tokens(self, tokens: TokenBatch) -> TokenBatch:
        return self.base_model.final_tokens(tokens)

    def forward_head(self, tokens: TokenBatch) -> Tensor:
        """[B, classes] from the final tokens of the B * T frames of the last `embed`."""
        b, _, t = self.last_clip_shape[:3]
        return self.consensus(self.base_model.forward_head(tokens).reshape(b, t, -1))

    @property
    def token_statistics(self) -> tuple:
        return self.base_model.token_statistics

    @property
    def last_token_counts(self) -> Optional[Tensor]:
        """[B, depth, 2] live tokens per clip (its frames together) at every block of the last forward."""
        counts = getattr(self.base_model, "last_token_counts", None)
        if counts is None:
            return None
        return counts.reshape(self.last_clip_shape[0], -1, *counts.shape[1:]).sum(dim=1)

    def frame_token_ids(self) -> List[Tensor]:
        """Per block, [B, T, L] the live tokens of every frame after it (image ids, -1 for an empty slot), when the
        backbone traced them (base_model.trace_token_ids)."""
        b, _, t = self.last_clip_shape[:3]
        return [ids.reshape(b, t, -1) for ids in self.base_model.last_token_ids]

    def macs_per_image(self) -> Tensor:
        """[B] MACs per clip of the last forward: T frames through the backbone plus the temporal head (the shift
        costs none)."""
        b, _, t = self.last_clip_shape[:3]
        frames = self.base_model.macs_per_image().reshape(b, t).sum(dim=1)
        return frames + self.consensus.macs(t)

    def adapt_official_state_dict(self, sd: Dict[str, Tensor], report) -> Dict[str, Tensor]:
        """Official XViT files hold `new_fc.*`, a classifier the 'vit' consensus never uses: dropped and reported.
        An ImageNet ViT / DeiT file goes into base_model (the official loader's fallback) without its head; the
        temporal embedding and head then start from this model's initialisation when fine-tuning (reported),
        and are missing keys otherwise."""
        sd = dict(sd)
        unused = sorted(k for k in sd if k.startswith("new_fc."))
        for key in unused:
            del sd[key]
        if unused:
            report.converted.append(f"{', '.join(unused)} dropped: the official XVIT keeps this classifier but "
                                    "never uses it with CONSENSUS_TYPE vit")
        if sd and not any(k.startswith(("base_model.", "consensus.")) for k in sd) and "cls_token" in sd:
            dropped = sorted(k for k in sd if k.startswith(("head.", "pre_logits.", "head_dist.", "fc_norm.")))
            sd = {f"base_model.{k}": v for k, v in sd.items() if k not in dropped}
            report.converted.append("an image ViT put into base_model" + (f" without its classifier "
                                    f"({', '.join(dropped)})" if dropped else ""))
            if getattr(report, "fine_tuning", False):
                own = self.state_dict()
                new = [k for k in own if k not in sd]
                sd.update({k: own[k] for k in new})
                report.converted.append(f"newly initialised (not in the file): {', '.join(new)}")
        return sd


def add_video_config(cfg) -> None:
    from fvcore.common.config import CfgNode

    cfg.TIMESFORMER = CfgNode()
    # divided_space_time (the paper's model), joint_space_time or space_only (official ATTENTION_TYPE).
    cfg.TIMESFORMER.ATTENTION_TYPE = "divided_space_time"
    # How an ImageNet checkpoint's pos_embed meets another patch count when inflated: "official" (1-D nearest
    # over the flattened patches, what the official load_pretrained does) or "grid" (2-D resize of the grid).
    cfg.TIMESFORMER.POS_EMBED_RESIZE = "official"

    cfg.XVIT = CfgNode()
    # The space-time mixing shift of keys and values (False: a per-frame ViT with the temporal head only).
    cfg.XVIT.USE_XVIT = True
    # Frames that shift together: consecutive groups of NUM_SEGMENTS frames (official K400/K600 configs: 8 with
    # 16-frame clips, i.e. two independent halves; set it to DATA.NUM_FRAMES for one group per clip).
    cfg.XVIT.NUM_SEGMENTS = 8
    # 1 / SHIFT_DIV of the channels comes from the next frame, as many from the previous one.
    cfg.XVIT.SHIFT_DIV = 8
    # Blocks whose keys and values are shifted (indices past the depth are ignored: the configs list 0..14).
    cfg.XVIT.LOCATIONS_LIST = list(range(15))
    # Length of the temporal embedding (1, F, 1, C), added to consecutive groups of F frames (official: the
    # backbone's default num_frames 8, whatever DATA.NUM_FRAMES).
    cfg.XVIT.NUM_FRAMES_EMBED = 8
    # The image size the stored pos_embed is laid out for (official: 224; resized bicubically in the forward).
    cfg.XVIT.POS_EMBED_IMG_SIZE = 224
    # Official MODEL.DROPOUT_RATE: dropout on the frame features and inside the head's MLP.
    cfg.XVIT.DROPOUT_RATE = 0.5

    cfg.TEMPORAL_HEAD = CfgNode()  # XViT's temporal aggregation transformer (official TEMPORAL_HEAD node)
    cfg.TEMPORAL_HEAD.NUM_ATTENTION_HEADS = 12
    cfg.TEMPORAL_HEAD.NUM_HIDDEN_LAYERS = 1
    cfg.TEMPORAL_HEAD.MLP_DIM = 768
    cfg.TEMPORAL_HEAD.HIDDEN_DROPOUT_PROB = 0.0
    cfg.TEMPORAL_HEAD.ATTENTION_PROBS_DROPOUT_PROB = 0.0


def validate_video_model_config(cfg) -> None:
    from vitadapt.config import ConfigError

    if not getattr(MODEL_REGISTRY.get(cfg.MODEL.NAME), "takes_video", False):
        return
    if cfg.MIXUP.ENABLE and cfg.MIXUP.CUTMIX_ALPHA > 0:
        raise ConfigError(f"MIXUP.CUTMIX_ALPHA must be 0 for the video model {cfg.MODEL.NAME}: timm's cutmix cuts "
                          "boxes out of the last two dimensions of image batches, and clips are [B, C, T, H, W] "
                          "(mixup alone, MIXUP.ALPHA, works on clips; XViT's recipe uses 0.4)")
    if issubclass(MODEL_REGISTRY.get(cfg.MODEL.NAME), TimeSformer):
        t = cfg.TIMESFORMER
        if t.ATTENTION_TYPE not in ATTENTION_TYPES:
            raise ConfigError(f"TIMESFORMER.ATTENTION_TYPE must be one of {', '.join(ATTENTION_TYPES)}, got "
                              f"'{t.ATTENTION_TYPE}'")
        if t.POS_EMBED_RESIZE not in POS_EMBED_RESIZES:
            raise ConfigError(f"TIMESFORMER.POS_EMBED_RESIZE must be one of {', '.join(POS_EMBED_RESIZES)}, got "
                              f"'{t.POS_EMBED_RESIZE}'")
    if not issubclass(MODEL_REGISTRY.get(cfg.MODEL.NAME), XViT):
        return
    x, h, frames = cfg.XVIT, cfg.TEMPORAL_HEAD, cfg.DATA.NUM_FRAMES
    for key, value in (("XVIT.NUM_SEGMENTS", x.NUM_SEGMENTS), ("XVIT.NUM_FRAMES_EMBED", x.NUM_FRAMES_EMBED)):
        if value < 1 or frames % value:
            raise ConfigError(f"{key} ({value}) must divide DATA.NUM_FRAMES ({frames}): XViT groups the frames of "
                              "a clip in consecutive runs of that length")
    if x.SHIFT_DIV < 2:
        raise ConfigError(f"XVIT.SHIFT_DIV must be >= 2 (two folds of C / SHIFT_DIV channels), got {x.SHIFT_DIV}")
    if any(i < 0 for i in x.LOCATIONS_LIST):
        raise ConfigError(f"XVIT.LOCATIONS_LIST holds block indices >= 0, got {list(x.LOCATIONS_LIST)}")
    if cfg.VIT.EMBED_DIM % h.NUM_ATTENTION_HEADS:
        raise ConfigError(f"TEMPORAL_HEAD.NUM_ATTENTION_HEADS ({h.NUM_ATTENTION_HEADS}) must divide VIT.EMBED_DIM "
                          f"({cfg.VIT.EMBED_DIM})")
    if x.POS_EMBED_IMG_SIZE % cfg.VIT.PATCH_SIZE:
        raise ConfigError(f"XVIT.POS_EMBED_IMG_SIZE ({x.POS_EMBED_IMG_SIZE}) must be a multiple of VIT.PATCH_SIZE")


register_config("VIDEO_MODELS", add_video_config, validate_video_model_config, types={"XVIT.LOCATIONS_LIST": [int]})
