"""T2T-ViT (Yuan et al., "Tokens-to-Token ViT", ICCV 2021) on the shared backbone, as DVT uses it.

The transformer body is the shared `vit.Block` (TokenBatch, adapters, MAC accounting), with the T2T-ViT settings:
LayerNorm eps 1e-5, no qkv bias, a fixed sinusoid positional embedding and an optional explicit `qk_scale`
(the official factories pass `embed_dim**-0.5` only when `pretrained`, so the released T2T-ViT weights need it;
DVT trains from scratch with the default `head_dim**-0.5`). Only the tokenizer is new: the Tokens-to-Token module
(soft split with nn.Unfold -> a one-head Performer "token transformer" -> re-structure to a grid, twice, then a
third soft split and a linear projection to embed_dim).

Token grids (DVT, `models/t2t_vit.py:99-133`), for a 224 image:
  performer                  Unfold(7, s4, p2)  -> 56, Unfold(3, s2, p1) -> 28, Unfold(3, s2, p1) -> 14
  performer_less_token       Unfold(11, s6, p5) -> 38, Unfold(3, s2, p1) -> 19, Unfold(3, s2, p1) -> 10
  performer_less_less_token  Unfold(14, s8, p3) -> 28, Unfold(3, s2, p1) -> 14, Unfold(3, s2, p1) -> 7

State-dict keys are the official ones (cls_token, pos_embed, tokens_to_token.attention{1,2}.{w, kqv, proj, norm1,
norm2, mlp.0, mlp.2}.*, tokens_to_token.project.*, blocks.N.*, norm.*, head.*), so official files load strictly.
The fixed tensors (`pos_embed`, the Performer's random features `w`) are persistent buffers here (official:
Parameters with requires_grad=False): same keys, and they never reach the optimizer.
"""

import math
from typing import Tuple

import torch
from timm.layers import trunc_normal_
from torch import Tensor, nn

from vitadapt.config import ConfigError, register_config

from .build import MODEL_REGISTRY
from .flops import block_macs
from .tokens import TokenBatch
from .vit import VisionTransformer, _init_linear_and_norm, sinusoid_table, vit_kwargs

# tokens_type -> (kernel, stride, padding) of the three soft splits.
TOKEN_GRIDS = {
    "performer": ((7, 4, 2), (3, 2, 1), (3, 2, 1)),
    "performer_less_token": ((11, 6, 5), (3, 2, 1), (3, 2, 1)),
    "performer_less_less_token": ((14, 8, 3), (3, 2, 1), (3, 2, 1)),
}
T2T_NORM_EPS = 1e-5  # torch's LayerNorm default, used everywhere in the official T2T-ViT code


def unfold_size(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


class TokenPerformer(nn.Module):
    """One-head Performer token transformer of T2T (official `Token_performer`): FAVOR+ positive random features
    approximate softmax attention in linear time; the residual of the attention is the value `v` (the token width
    changes from `dim` to `in_dim`), then a pre-norm MLP with its own residual."""

    def __init__(self, dim: int, in_dim: int, kernel_ratio: float = 0.5, drop: float = 0.1):
        super().__init__()
        self.emb = in_dim
        self.kqv = nn.Linear(dim, 3 * in_dim)
        self.dp = nn.Dropout(drop)
        self.proj = nn.Linear(in_dim, in_dim)
        self.norm1 = nn.LayerNorm(dim, eps=T2T_NORM_EPS)
        self.norm2 = nn.LayerNorm(in_dim, eps=T2T_NORM_EPS)
        self.epsilon = 1e-8  # official: keeps the normaliser away from 0
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, in_dim), nn.Dropout(drop))
        self.m = int(in_dim * kernel_ratio)
        # Fixed random features: orthogonal rows scaled by sqrt(m) (official init; not trained).
        self.register_buffer("w", nn.init.orthogonal_(torch.randn(self.m, in_dim)) * math.sqrt(self.m))

    def prm_exp(self, x: Tensor) -> Tensor:
        """[B, T, m] exp(w^T x - |x|^2 / 2) / sqrt(m): positive random features of the Gaussian kernel."""
        xd = (x * x).sum(dim=-1, keepdim=True) / 2
        wtx = torch.einsum("bti,mi->btm", x.float(), self.w)
        return torch.exp(wtx - xd) / math.sqrt(self.m)

    def single_attn(self, x: Tensor) -> Tensor:
        k, q, v = torch.split(self.kqv(x), self.emb, dim=-1)  # official order: k, q, v
        kp, qp = self.prm_exp(k), self.prm_exp(q)
        denom = torch.einsum("bti,bi->bt", qp, kp.sum(dim=1)).unsqueeze(2)  # [B, T, 1]
        kptv = torch.einsum("bin,bim->bnm", v.float(), kp)  # [B, emb, m]
        y = torch.einsum("bti,bni->btn", qp, kptv) / (denom + self.epsilon)
        return v + self.dp(self.proj(y))  # v is the skip connection

    def forward(self, x: Tensor) -> Tensor:
        x = self.single_attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def macs(self, tokens: int) -> int:
        """MACs of one image with `tokens` tokens (linear layers and the three einsums of the kernel attention)."""
        dim, e, m = self.kqv.in_features, self.emb, self.m
        return tokens * (3 * dim * e + 2 * e * m + m + 2 * e * m + 3 * e * e)


class T2TModule(nn.Module):
    """Tokens-to-Token tokenizer (official `T2T_module`, performer variants): image -> [B, grid*grid, embed_dim]."""

    def __init__(self, img_size: int = 224, tokens_type: str = "performer", in_chans: int = 3,
                 embed_dim: int = 768, token_dim: int = 64):
        super().__init__()
        if tokens_type not in TOKEN_GRIDS:
            raise ValueError(f"T2T tokens_type {tokens_type!r}: expected one of {sorted(TOKEN_GRIDS)}")
        self.tokens_type = tokens_type
        self.splits = TOKEN_GRIDS[tokens_type]
        (k0, s0, p0), (k1, s1, p1), (k2, s2, p2) = self.splits
        self.soft_split0 = nn.Unfold(k0, stride=s0, padding=p0)
        self.soft_split1 = nn.Unfold(k1, stride=s1, padding=p1)
        self.soft_split2 = nn.Unfold(k2, stride=s2, padding=p2)
        self.attention1 = TokenPerformer(in_chans * k0 * k0, token_dim, kernel_ratio=0.5)
        self.attention2 = TokenPerformer(token_dim * k1 * k1, token_dim, kernel_ratio=0.5)
        self.project = nn.Linear(token_dim * k2 * k2, embed_dim)
        self.grid_size = self.grid_for(img_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def grid_sizes(self, size: int) -> Tuple[int, int, int]:
        """Side of the token grid after each of the three soft splits, for a square `size` image."""
        out = []
        for kernel, stride, padding in self.splits:
            size = unfold_size(size, kernel, stride, padding)
            out.append(size)
        return tuple(out)

    def grid_for(self, size: int) -> Tuple[int, int]:
        side = self.grid_sizes(size)[-1]
        return side, side

    @staticmethod
    def _restructure(x: Tensor, height: int, width: int) -> Tensor:
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], height, width)

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        (k0, s0, p0), (k1, s1, p1), _ = self.splits
        x = self.attention1(self.soft_split0(images).transpose(1, 2))
        h, w = unfold_size(h, k0, s0, p0), unfold_size(w, k0, s0, p0)
        x = self.attention2(self.soft_split1(self._restructure(x, h, w)).transpose(1, 2))
        h, w = unfold_size(h, k1, s1, p1), unfold_size(w, k1, s1, p1)
        return self.project(self.soft_split2(self._restructure(x, h, w)).transpose(1, 2))

    def macs(self, size: int) -> int:
        """MACs of one square `size` image through the tokenizer."""
        n0, n1, n2 = self.grid_sizes(size)
        return (self.attention1.macs(n0 * n0) + self.attention2.macs(n1 * n1)
                + n2 * n2 * self.project.in_features * self.project.out_features)


@MODEL_REGISTRY.register()
class T2TViT(VisionTransformer):
    """T2T-ViT: the shared transformer body behind a Tokens-to-Token tokenizer, CLS token, fixed sinusoid pos_embed.

    Inherits forward_features / forward_head / forward (TokenBatch blocks, adapters, token counts) from
    VisionTransformer; only the embedding, the initialisation and the MAC count differ."""

    def __init__(self, img_size: int = 224, tokens_type: str = "performer", in_chans: int = 3,
                 num_classes: int = 1000, embed_dim: int = 768, depth: int = 12, num_heads: int = 12,
                 mlp_ratio: float = 4.0, qkv_bias: bool = False, qk_scale=None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, head_drop_rate: float = 0.0,
                 token_dim: int = 64, norm_eps: float = T2T_NORM_EPS, token_execution: str = "packed"):
        nn.Module.__init__(self)  # VisionTransformer's patch embedding and learned pos_embed are not built
        self.token_execution = token_execution
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.img_size = img_size
        self.tokens_to_token = T2TModule(img_size, tokens_type, in_chans, embed_dim, token_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.register_buffer("pos_embed", sinusoid_table(self.tokens_to_token.num_patches + 1, embed_dim))
        self.build_body(depth, num_heads, mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_path_rate,
                        head_drop_rate, norm_eps=norm_eps, qk_scale=qk_scale)
        self.init_weights()

    @classmethod
    def from_config(cls, cfg) -> "T2TViT":
        return cls(**t2t_kwargs(cfg))

    def init_weights(self) -> None:
        trunc_normal_(self.cls_token, std=0.02)  # official T2T_ViT init
        self.apply(_init_linear_and_norm)

    def no_weight_decay(self):
        return {"cls_token"}  # pos_embed is a fixed buffer

    @property
    def patch_grid(self) -> Tuple[int, int]:
        return self.tokens_to_token.grid_size

    def embed(self, images: Tensor) -> TokenBatch:
        x = self.tokens_to_token(images)
        pos = self.pos_embed
        if x.shape[1] + 1 != pos.shape[1]:
            # Another input size: the official model refuses it; the 1-D sinusoid table extends to any length.
            pos = sinusoid_table(x.shape[1] + 1, self.embed_dim).to(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + pos
        return TokenBatch.dense(self.pos_drop(x), self.token_execution)

    def adapt_official_state_dict(self, sd, report):
        """Official files have the same keys; a sinusoid pos_embed of another length is regenerated, not
        interpolated (it is fixed, not learned)."""
        pos = sd.get("pos_embed")
        if pos is not None and pos.shape != self.pos_embed.shape and pos.shape[-1] == self.embed_dim:
            sd = dict(sd)
            sd["pos_embed"] = self.pos_embed.detach().clone()
            report.converted.append(f"pos_embed: fixed sinusoid {tuple(pos.shape)} -> {tuple(self.pos_embed.shape)}")
        return sd

    def macs_per_image(self) -> Tensor:
        """[B] MACs: the T2T tokenizer (for the last input size) plus the blocks on the tokens they saw and the head."""
        counts = self.last_token_counts
        dim = self.embed_dim
        blocks = block_macs(counts[..., 0], counts[..., 1], dim, self.blocks[0].mlp.fc1.out_features).sum(dim=1)
        head = dim * self.num_classes if self.num_classes > 0 else 0
        return self.tokens_to_token.macs(getattr(self, "last_img_size", self.img_size)) + blocks + head

    def forward(self, images: Tensor) -> Tensor:
        self.last_img_size = images.shape[-1]
        return super().forward(images)


def add_t2t_config(cfg) -> None:
    from fvcore.common.config import CfgNode

    cfg.T2T = CfgNode()
    # Tokens-to-Token soft-split schedule, i.e. the token grid: performer (14x14 at 224), performer_less_token
    # (10x10), performer_less_less_token (7x7); see vitadapt/models/t2t.py.
    cfg.T2T.TOKENS_TYPE = "performer"
    # Width of the tokens inside the tokenizer (official token_dim).
    cfg.T2T.TOKEN_DIM = 64
    # Attention logit scale: 0.0 = head_dim**-0.5 (official default, DVT); > 0: that scale (the official
    # pretrained T2T-ViT checkpoints use embed_dim**-0.5, e.g. 256**-0.5 for T2T-ViT-12).
    cfg.T2T.QK_SCALE = 0.0
    # LayerNorm eps of the blocks and the final norm (official: torch's default 1e-5).
    cfg.T2T.NORM_EPS = 1e-5


def validate_t2t_config(cfg) -> None:
    if cfg.MODEL.NAME != "T2TViT":
        return
    t = cfg.T2T
    if t.TOKENS_TYPE not in TOKEN_GRIDS:
        raise ConfigError(f"T2T.TOKENS_TYPE {t.TOKENS_TYPE!r}: expected one of {', '.join(sorted(TOKEN_GRIDS))}")
    if t.TOKEN_DIM < 2:
        raise ConfigError(f"T2T.TOKEN_DIM must be >= 2 (the performer uses TOKEN_DIM // 2 features), got {t.TOKEN_DIM}")
    if t.QK_SCALE < 0:
        raise ConfigError(f"T2T.QK_SCALE must be >= 0 (0: head_dim**-0.5), got {t.QK_SCALE}")
    if not 0 < t.NORM_EPS < 1:
        raise ConfigError(f"T2T.NORM_EPS must be in (0, 1), got {t.NORM_EPS}")
    splits = TOKEN_GRIDS[t.TOKENS_TYPE]
    for crop in (cfg.DATA.TRAIN_CROP_SIZE, cfg.DATA.TEST_CROP_SIZE):
        size = crop
        for kernel, stride, padding in splits:
            size = unfold_size(size, kernel, stride, padding)
        if size < 1:
            raise ConfigError(f"T2T.TOKENS_TYPE {t.TOKENS_TYPE} leaves no token for a {crop}px crop")


def t2t_kwargs(cfg) -> dict:
    """Constructor arguments of T2TViT from the VIT, T2T, MODEL and DATA nodes (VIT.PATCH_SIZE is unused)."""
    kw = vit_kwargs(cfg)
    kw.pop("patch_size")
    t = cfg.T2T
    kw.update(tokens_type=t.TOKENS_TYPE, token_dim=t.TOKEN_DIM, qk_scale=t.QK_SCALE if t.QK_SCALE > 0 else None,
              norm_eps=t.NORM_EPS)
    return kw


register_config("T2T", add_t2t_config, validate_t2t_config)
