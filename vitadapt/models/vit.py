"""The one backbone every method shares: a DeiT/timm Vision Transformer whose blocks pass a TokenBatch.

State-dict keys are timm's and DeiT's (cls_token, pos_embed, patch_embed.proj.*, blocks.N.{norm1,
attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}.*, norm.*, head.*), so official checkpoints load as they
are. With identical weights the logits equal timm's VisionTransformer.
"""

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed, resample_abs_pos_embed, trunc_normal_
from torch import Tensor, nn

from .build import MODEL_REGISTRY
from .flops import vit_macs
from .tokens import TokenAdapter, TokenBatch

try:  # variable-length flash attention over packed sequences (torch >= 2.10, CUDA, half precision)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:  # older torch: packed tokens always take the padded path
    varlen_attn = None


# On a CPU, torch's fused attention kernel costs more than the three explicit operators for one image's attention:
# measured inside whole forwards (2-core CPU, DeiT-S, 6 heads), explicit is 2% faster for one image of 197 tokens
# (dense DeiT-S and ATS alike) and 3-7% slower from 2 or 4 images on, where the fused kernel's tiling wins.
# Inference only: training keeps the fused kernel and its backward.
SMALL_ATTENTION_LOGITS = 2 ** 18


def explicit_is_faster(q: Tensor) -> bool:
    """Whether self-attention with queries q [..., N, dh] (e.g. [B, heads, N, dh]) runs faster explicitly (small,
    on the CPU)."""
    return small_attention(q.device, math.prod(q.shape[:-2]), q.shape[-2])


def small_attention(device: torch.device, sequences: int, n: int) -> bool:
    """Whether `sequences` attention calls over n tokens each (images x heads) run faster explicitly."""
    return device.type == "cpu" and sequences * n * n <= SMALL_ATTENTION_LOGITS


def varlen_supported(x: Tensor) -> bool:
    """Whether varlen_attn can run on tokens like x [T, C]: the installed torch has it, on a CUDA device, in half
    precision (its flash / cuDNN kernels)."""
    return varlen_attn is not None and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0,
                 proj_drop: float = 0.0, qk_scale: Optional[float] = None):
        super().__init__()
        self.num_heads = num_heads
        # qk_scale: an explicit logit scale (official T2T-ViT checkpoints: embed_dim**-0.5); None: head_dim**-0.5.
        self.qk_scale = qk_scale
        self.scale = qk_scale if qk_scale is not None else (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        # A backbone's change of the keys and values before attention, kv_mixing(k or v [B, heads, N, head_dim] in
        # the padded layout, tokens), e.g. XViT's space-time mixing shift; None leaves them as computed.
        self.kv_mixing: Optional[nn.Module] = None
        # False: explicit softmax(Q K^T * scale) V (VIT.FUSED_ATTENTION), the official code's order of operations.
        self.fused = True
        # Packed images of different lengths attend without padding to the longest image (VIT.VARLEN_ATTENTION):
        # through varlen_attn where it runs, one image at a time on a CPU; elsewhere padded, the padding masked.
        self.varlen = True
        # Whether the last forward computed the CLS attention row on the side (q_cls K^T, counted by vit_macs),
        # not read from an attention matrix it computed anyway.
        self.cls_row_on_side = False

    def forward(self, x: Tensor, tokens: TokenBatch, need_cls_attention: bool = False,
                adapter: Optional[TokenAdapter] = None) -> Tuple[Tensor, Optional[Tensor], Optional[Tensor]]:
        """x: the normed tokens, laid out like tokens.x. Returns (output like x, CLS attention row [B,H,N] or
        None, values [B,H,N,D] or None), the last two in the padded layout."""
        if self.takes_varlen(x, tokens, need_cls_attention, adapter):
            return self.varlen_forward(x, tokens, need_cls_attention)
        qkv = tokens.padded(self.qkv(x))  # packed tokens: per-token work stays [T, C], attention is per image
        b, n, c3 = qkv.shape
        c = c3 // 3
        q, k, v = qkv.reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        if self.kv_mixing is not None:
            k, v = self.kv_mixing(k, tokens), self.kv_mixing(v, tokens)
        key_mask = tokens.key_mask()
        bias = adapter.attention_bias(tokens) if adapter is not None else None
        explicit = (not self.fused or (adapter is not None and adapter.records_attention_logits)
                    or (not self.training and explicit_is_faster(q)))
        if explicit:
            # Explicit attention: asked for, the method needs the logits themselves (DVT reuses them), or small.
            logits = (q @ k.transpose(-2, -1)) * self.scale
            if bias is not None:
                logits = logits + bias
            if key_mask is not None:
                logits = logits.masked_fill(~key_mask, float("-inf"))
            if adapter is not None and adapter.records_attention_logits:
                adapter.observe_attention_logits(logits)
            probs = logits.softmax(dim=-1)
            if key_mask is not None:  # a sequence without a live key attends to nothing, as in the fused kernel
                probs = torch.where(key_mask.any(dim=-1, keepdim=True), probs, 0.0)
            out = F.dropout(probs, self.attn_drop, self.training) @ v
        else:
            mask = key_mask
            if bias is not None:  # an additive bias before the softmax is a float mask to the fused kernel
                mask = bias if key_mask is None else bias.masked_fill(~key_mask, float("-inf"))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                                 dropout_p=self.attn_drop if self.training else 0.0,
                                                 **self.fused_scale)
        if adapter is not None:  # e.g. per-image head selection, before the heads are merged
            out = adapter.attention_heads(tokens, out)
            if adapter.observes_attention:
                adapter.observe_attention(tokens, k, v, key_mask)
        out = self.proj_drop(self.proj(tokens.unpadded(out.transpose(1, 2).reshape(b, n, c))))
        # The CLS row of an explicit attention without a bias is row 0 of its matrix (where the official ATS and
        # EViT read it too); the fused kernel hides the matrix: then the row alone is one cheap [1 x N] product.
        self.cls_row_on_side = need_cls_attention and not (explicit and bias is None)
        if not need_cls_attention:
            return out, None, None
        if not self.cls_row_on_side:
            return out, probs[:, :, 0], v
        logits = (q[:, :, :1] @ k.transpose(-2, -1)).squeeze(2) * self.scale
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, :, 0], float("-inf"))
        return out, logits.softmax(dim=-1), v

    def takes_varlen(self, x: Tensor, tokens: TokenBatch, need_cls_attention: bool,
                     adapter: Optional[TokenAdapter]) -> bool:
        """Packed images of unequal lengths, a plain attention (nothing a method reads or changes in the padded
        layout but the CLS row and the values, no key/value mixing, no attention dropout in training), and the
        kernel runs on x or x is on a CPU (where attending image by image beats padding: 2.5% faster A-ViT forwards
        at batch 16, 7% at 64). The CLS row comes with the image-by-image path only (the kernel hides it)."""
        if not (self.varlen and tokens.is_packed and not tokens.uniform):
            return False
        if self.kv_mixing is not None or not self.fused or (self.training and self.attn_drop > 0):
            return False
        if adapter is not None and (adapter.observes_attention or adapter.records_attention_logits or any(
                getattr(type(adapter), hook) is not getattr(TokenAdapter, hook)
                for hook in ("attention_heads", "attention_bias"))):
            return False
        return x.device.type == "cpu" or (varlen_supported(x) and not need_cls_attention)

    def varlen_forward(self, x: Tensor, tokens: TokenBatch, need_cls_attention: bool = False):
        """Attention of packed tokens x [T, C], each image over its own tokens, without padding: varlen_attn where
        it runs, else (on a CPU) one attention call per image. Returns what forward does: the CLS row and the
        values (padded layout) when asked for, each image's row over its own keys only."""
        t, c = x.shape
        heads, dh = self.num_heads, c // self.num_heads
        qkv = self.qkv(x).view(t, 3, heads, dh)
        cls_attention = values = None
        if varlen_supported(x) and not need_cls_attention:
            self.cls_row_on_side = False
            q, k, v = qkv.unbind(1)  # [T, heads, dh] each
            starts = F.pad(tokens.lengths.cumsum(0), (1, 0)).to(torch.int32)  # [B + 1] first row of each image
            out = varlen_attn(q, k, v, starts, starts, tokens.width, tokens.width, scale=self.scale)
        else:
            images = [qkv[rows] for rows in tokens.image_slices()]
            # Every image's CLS row from its attention matrix where all run explicitly (the longest decides),
            # else every row on the side (so that vit_macs counts the side products of all images or none).
            self.cls_row_on_side = need_cls_attention and not (
                not self.training and small_attention(x.device, heads, tokens.width))
            if need_cls_attention and not self.cls_row_on_side:
                outs, rows = zip(*(self.attend_rows(image, need_cls_row=True) for image in images))
                out, rows = torch.cat(outs), torch.cat(rows, dim=1)  # [T, heads, dh], [heads, T]
            else:
                out = torch.cat([self.attend_rows(image) for image in images])
                if need_cls_attention:
                    rows = torch.cat([self.cls_attention_row(image) for image in images], dim=1)
            if need_cls_attention:
                cls_attention = tokens.padded(rows.t()).transpose(1, 2).contiguous()  # [B, heads, W], 0 as padding
                values = tokens.padded(qkv[:, 2].reshape(t, c)).view(-1, tokens.width, heads, dh).transpose(1, 2)
        return self.proj_drop(self.proj(out.reshape(t, c))), cls_attention, values

    def attend_rows(self, qkv: Tensor, need_cls_row: bool = False):
        """One sequence's attention: qkv [N, 3, heads, dh] (any number of heads), output [N, heads, dh]; with
        need_cls_row (for a sequence small enough to run explicitly), (output, the CLS row [heads, N])."""
        q, k, v = qkv.permute(1, 2, 0, 3).unbind(0)
        if need_cls_row or (not self.training and explicit_is_faster(q)):
            # The scale applied by the product (no pass over the logits): 3-9% faster; exact for a power of two
            # (DeiT's 1/8), within 1e-6 for T2T-ViT's embed_dim**-0.5.
            logits = torch.baddbmm(q.new_empty(()), q, k.transpose(-2, -1), beta=0, alpha=self.scale)
            probs = logits.softmax(dim=-1)
            out = (probs @ v).transpose(0, 1)
            return (out, probs[:, 0]) if need_cls_row else out
        return F.scaled_dot_product_attention(q, k, v, **self.fused_scale).transpose(0, 1)

    def cls_attention_row(self, qkv: Tensor) -> Tensor:
        """One sequence's CLS attention row: qkv [N, 3, heads, dh], row [heads, N] (the padded path's side product,
        over this sequence's keys only)."""
        q, k = qkv[:1, 0].transpose(0, 1), qkv[:, 1].permute(1, 2, 0)  # [heads, 1, dh], [heads, dh, N]
        return ((q @ k).squeeze(1) * self.scale).softmax(dim=-1)

    @property
    def fused_scale(self) -> dict:
        """The logit scale for scaled_dot_product_attention: an explicit qk_scale (T2T-ViT's embed_dim**-0.5), else
        the kernel's own default (head_dim**-0.5)."""
        return {} if self.qk_scale is None else {"scale": self.qk_scale}


class PaddedPatchEmbed(nn.Module):
    """Patch embedding of a zero-padded image (timm's PatchEmbed needs the size to be a multiple of the patch)."""

    def __init__(self, img_size: int, patch_size: int, padding: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, patch_size, padding=padding)
        side = (img_size + 2 * padding - patch_size) // patch_size + 1
        self.patch_size, self.grid_size, self.num_patches = (patch_size, patch_size), (side, side), side * side

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0, norm_eps: float = 1e-6,
                 qk_scale: Optional[float] = None):
        super().__init__()
        # norm_eps: 1e-6 for DeiT/timm, 1e-5 (torch's default) for T2T-ViT.
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qkv_bias, attn_drop, drop, qk_scale=qk_scale)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        # Stochastic depth, per image (TokenBatch.drop_path also handles packed tokens).
        self.drop_path = drop_path
        # A method's hooks for this block (see TokenAdapter); None runs the plain block.
        self.adapter: Optional[TokenAdapter] = None

    def forward(self, tokens: TokenBatch) -> TokenBatch:
        adapter = self.adapter
        if adapter is not None:
            tokens = adapter.before_block(tokens)
        tokens = self.feed_forward(self.attend(tokens, adapter), adapter)
        if adapter is not None:
            tokens = adapter.after_block(tokens)
        return tokens

    def attend(self, tokens: TokenBatch, adapter: Optional[TokenAdapter]) -> TokenBatch:
        """The attention sub-layer with its residual, then the method's after_attention hook."""
        n_attn = tokens.num_live()
        tokens, cls_attention, values = self.attention_residual(tokens, adapter)
        if adapter is not None:
            tokens = adapter.after_attention(tokens, cls_attention, values)
        n_mlp = n_attn if adapter is None else tokens.num_live()  # only a method's hook changes the tokens here
        tokens.token_counts.append(torch.stack([n_attn, n_mlp], dim=1))
        return tokens

    def attention_residual(self, tokens: TokenBatch, adapter: Optional[TokenAdapter]):
        """tokens + attention(norm1(tokens)), and the CLS attention row and values when the adapter asks for them
        (its after_attention hook is the caller's: a video block may call it on another layout)."""
        need_cls = adapter is not None and adapter.needs_cls_attention
        out, cls_attention, values = self.attn(self.norm1(tokens.x), tokens, need_cls, adapter)
        return tokens.add_residual(tokens.drop_path(out, self.drop_path, self.training)), cls_attention, values

    def feed_forward(self, tokens: TokenBatch, adapter: Optional[TokenAdapter]) -> TokenBatch:
        """The MLP sub-layer with its residual."""
        h = tokens.x if adapter is None else adapter.mlp_input(tokens)
        return tokens.add_residual(tokens.drop_path(self.mlp(self.norm2(h)), self.drop_path, self.training))


@MODEL_REGISTRY.register()
class VisionTransformer(nn.Module):
    """DeiT / timm ViT with a CLS token and absolute positional embeddings."""

    # Per-image statistics the engine logs for this model beyond accuracy and GMACs (README, 'Statistics in the
    # logs'): "kept_tokens" where a method changes which tokens exist, "token_depth" where tokens halt.
    token_statistics: tuple = ()

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, num_classes: int = 1000,
                 embed_dim: int = 768, depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, drop_rate: float = 0.0, attn_drop_rate: float = 0.0,
                 drop_path_rate: float = 0.0, head_drop_rate: float = 0.0, token_execution: str = "packed",
                 patch_padding: int = 0, block_class: type = None):
        super().__init__()
        # How a method's per-image token selection runs: "packed" (real removal) or "masked" (dense + mask).
        self.token_execution = token_execution
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        if patch_padding:  # zeros around the image before patching (DVT's 10x10 grid: 23 px patches of 224 + 2 x 3)
            self.patch_embed = PaddedPatchEmbed(img_size, patch_size, patch_padding, in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, strict_img_size=False)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 1, embed_dim))
        self.build_body(depth, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate,
                        head_drop_rate, block_class=block_class)
        self.init_weights()

    def build_body(self, depth: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, drop_rate: float,
                   attn_drop_rate: float, drop_path_rate: float, head_drop_rate: float, norm_eps: float = 1e-6,
                   qk_scale: Optional[float] = None, block_class: type = None) -> None:
        """Everything after the embedding: dropout, the blocks (stochastic depth rising linearly to
        drop_path_rate), the final norm and the classifier. Backbones with another embedding (T2T-ViT) or
        another block (TimeSformer's divided space-time attention) share it."""
        dim = self.embed_dim
        self.pos_drop = nn.Dropout(drop_rate)
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        block_class = block_class or Block
        self.blocks = nn.ModuleList(block_class(dim, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate,
                                                rates[i], norm_eps=norm_eps, qk_scale=qk_scale) for i in range(depth))
        self.norm = nn.LayerNorm(dim, eps=norm_eps)
        self.head_drop = nn.Dropout(head_drop_rate)
        self.head = nn.Linear(dim, self.num_classes) if self.num_classes > 0 else nn.Identity()

    @classmethod
    def from_config(cls, cfg) -> "VisionTransformer":
        return cls(**vit_kwargs(cfg))

    def init_weights(self) -> None:
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        self.apply(_init_linear_and_norm)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_linear_and_norm(self.head)

    def no_weight_decay(self):
        return {"pos_embed", "cls_token"}

    @property
    def patch_grid(self) -> Tuple[int, int]:
        return self.patch_embed.grid_size

    def grid_for(self, size) -> Tuple[int, int]:
        """The patch grid (rows, columns) of an input of spatial size (H, W), padding included."""
        proj = self.patch_embed.proj
        return tuple((int(s) + 2 * pad - kernel) // stride + 1 for s, kernel, stride, pad
                     in zip(size, proj.kernel_size, proj.stride, proj.padding))

    def embed(self, images: Tensor) -> TokenBatch:
        x = self.patch_embed(images)
        grid = self.grid_for(images.shape[-2:])
        pos = self.pos_embed
        if grid != tuple(self.patch_grid):
            pos = resample_abs_pos_embed(pos, list(grid), list(self.patch_grid), num_prefix_tokens=1)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return TokenBatch.dense(self.pos_drop(x), self.token_execution)

    def forward_features(self, images: Tensor) -> TokenBatch:
        return self.final_tokens(self.run_blocks(self.embed(images)))

    def final_tokens(self, tokens: TokenBatch) -> TokenBatch:
        """The last block's output as the head reads it (the final norm)."""
        return tokens.replace(x=self.norm(tokens.x))

    def run_blocks(self, tokens: TokenBatch) -> TokenBatch:
        """Every block in turn. With `trace_token_ids` set, the original ids of the live tokens after every block,
        [sequences, N_i] with -1 for none, go to last_token_ids (for visualisations; off by default, it costs a
        copy per block)."""
        self.last_token_ids = [] if getattr(self, "trace_token_ids", False) else None
        for block in self.blocks:
            tokens = block(tokens)
            if self.last_token_ids is not None:
                self.last_token_ids.append(tokens.padded(tokens.ids).masked_fill(~tokens.live_mask(), -1))
        return tokens

    def forward_head(self, tokens: TokenBatch) -> Tensor:
        """The head hook: a method that classifies differently (exits, pooling over kept tokens) overrides this."""
        return self.head(self.head_drop(tokens.cls_tokens()))

    def forward(self, images: Tensor) -> Tensor:
        tokens = self.forward_features(images)
        # Live tokens per image at every block: [B, depth, 2] (attention, MLP), read by FLOP counting and logs.
        self.last_token_counts = tokens.counts_per_block().detach()
        return self.forward_head(tokens)

    def macs_per_image(self) -> Tensor:
        """[B] MACs of each image of the last forward, from the tokens each block saw (a method whose cost depends
        on more than the token counts overrides this)."""
        return vit_macs(self, self.last_token_counts)


def sinusoid_table(n_position: int, dim: int) -> Tensor:
    """[1, n_position, dim] the fixed Transformer sinusoid table (angle pos / 10000^(2 * (j // 2) / dim): sin on even
    channels, cos on odd ones), in float64 then float32, as the official AdaViT and T2T-ViT code."""
    pos = torch.arange(n_position, dtype=torch.float64)[:, None]
    j = torch.arange(dim)
    angle = pos / torch.pow(10000.0, (2 * (j // 2)).double() / dim)
    return torch.where(j % 2 == 0, torch.sin(angle), torch.cos(angle)).float().unsqueeze(0)


def _init_linear_and_norm(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def vit_kwargs(cfg) -> dict:
    """Constructor arguments of the backbone from the VIT, MODEL and DATA nodes."""
    v = cfg.VIT
    return dict(img_size=cfg.DATA.TRAIN_CROP_SIZE, patch_size=v.PATCH_SIZE, in_chans=v.IN_CHANS,
                num_classes=cfg.MODEL.NUM_CLASSES, embed_dim=v.EMBED_DIM, depth=v.DEPTH, num_heads=v.NUM_HEADS,
                mlp_ratio=v.MLP_RATIO, qkv_bias=v.QKV_BIAS, drop_rate=v.DROP_RATE, attn_drop_rate=v.ATTN_DROP_RATE,
                drop_path_rate=v.DROP_PATH_RATE, head_drop_rate=v.HEAD_DROP_RATE, token_execution=v.TOKEN_EXECUTION)
