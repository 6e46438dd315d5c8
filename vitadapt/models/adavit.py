"""AdaViT, adaptive heads, blocks and tokens (Meng et al., CVPR 2022), on the shared backbone.

Before every block i a small decision head per choice reads the block input and decides, per image:
* heads (i >= KEEP_LAYERS): Linear(C, H) on the CLS token -> which attention heads run;
* layer (i >= KEEP_LAYERS): Linear(C, 2) on the CLS token -> whether the attention and MLP branches run;
* tokens (i >= TOKEN_START_LAYER): Linear(C, 1) on norm1(x) of every patch token -> which tokens take part
  (threshold 0.6, hidden in the official code; CLS always takes part).
Training draws Gumbel-sigmoid decisions, sigmoid((logit + g1 - g2) / TAU), with straight-through hard values;
evaluation thresholds sigmoid(logit).

How the official code applies them (masking, every head, token and branch is still computed):
* a dropped head's q, k, v are zero; proj and MLP fc1 see the dropped heads' channels zeroed at their input,
  biases kept (ADAVIT.HEAD_V2: fc1's hidden units of the dropped heads' channels are zeroed instead;
  ADAVIT.HEAD_ATTN: a dropped head's attention is the identity and nothing is zeroed);
* a dropped token is no key for the kept tokens, its own attention output (and with TOKEN_WITH_MLP its MLP
  output) is zeroed: it passes through the block unchanged, and the next block decides again;
* x = x + a * attn(x); x = x + m * mlp(norm2(x)) with the branch decisions a, m; no stochastic depth in blocks
  with branch decisions.

VIT.TOKEN_EXECUTION masked computes exactly that (the parity reference, and always used in training: the
straight-through gradient of a skipped head, token or branch is the output it would have produced).
packed (the default) really skips at inference, per image: a branch that is off is not computed, dropped
tokens are not computed by the layers they skip, and q, k, v and attention run for the kept (image, head) pairs
only. proj and fc1 run over all channels with the dropped heads' ones zero (as the official masks; on a CPU that
is cheaper than gathering per image). Both give the same logits.

Costs per image, both logged: the official flops table (adavit_costs), and the MACs packed execution really
computes (`macs_per_image`).

Backbones: AdaViTVisionTransformer is the official DeiT variant (ada_step_deit_*: patch embedding, LayerNorm eps
1e-6, qkv bias); AdaViTT2TViT the T2T-ViT one (ada_step_t2t_vit_{14,19}_lnorm: Tokens-to-Token tokenizer,
LayerNorm eps 1e-5, no qkv bias, optional qk_scale), the same decisions and block computation through inheritance.
"""

import itertools
import logging
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from timm.layers import drop_path
from torch import Tensor, nn

from vitadapt.config import ConfigError, register_config

from .adavit_costs import (OFFICIAL_BASE_GFLOPS_DEIT, OFFICIAL_BASE_GFLOPS_OTHER, UsageLossWeights,
                           official_flops_table, official_gflops, usage_loss)
from .build import MODEL_REGISTRY
from .t2t import T2TViT, t2t_kwargs, validate_t2t_config
from .tokens import TokenBatch
from .video import FrameViT, TimeSformer, XViT
from .vit import Block, VisionTransformer, _init_linear_and_norm, sinusoid_table, vit_kwargs

logger = logging.getLogger(__name__)


class DecisionHead(nn.Module):
    """One linear decision head; `mlp_head` is the official parameter name (blocks.i.head_select.mlp_head.*)."""

    def __init__(self, dim: int, outputs: int):
        super().__init__()
        self.mlp_head = nn.Linear(dim, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp_head(x)


def gumbel_sigmoid(logits: Tensor, threshold: float, tau: float, training: bool,
                   noise: Optional[Tuple[Tensor, Tensor]] = None) -> Tensor:
    """Hard 0/1 decisions with the straight-through gradient of sigmoid((logits + g1 - g2) / tau) in training,
    of sigmoid(logits) in evaluation (no noise, no tau), as the official `_gumbel_sigmoid`."""
    if training:
        if noise is None:  # Gumbel(0, 1) = -log(Exponential(1))
            noise = tuple(-torch.empty_like(logits).exponential_().log() for _ in range(2))
        soft = torch.sigmoid((logits + noise[0] - noise[1]) / tau)
    else:
        soft = torch.sigmoid(logits)
    hard = (soft > threshold).to(soft.dtype)
    if not soft.requires_grad:  # nothing to pass a gradient to (inference): the hard values themselves
        return hard
    return hard - soft.detach() + soft


def head_major_qkv(qkv: nn.Linear, heads: int) -> Tuple[Tensor, Optional[Tensor]]:
    """qkv's weight as [heads, 3 * dh, C] (each head's q, k, v rows contiguous, for one product per head or per
    run of heads) and its bias as [heads, 3 * dh] (None without one). The copy is kept until the weights change
    (their version counter moves with every in-place update: an optimizer step, a checkpoint load), so that
    inference copies them once, not per forward (at batch 1 the copy cost as much as a tenth of the block)."""
    versions = (heads, qkv.weight._version, None if qkv.bias is None else qkv.bias._version)
    cached = getattr(qkv, "_head_major", None)
    if cached is None or cached[0] is not qkv.weight or cached[1] != versions:
        out, c = qkv.weight.shape
        dh = out // (3 * heads)
        with torch.no_grad():
            weight = qkv.weight.view(3, heads, dh, c).transpose(0, 1).reshape(heads, 3 * dh, c)
            bias = None if qkv.bias is None else qkv.bias.view(3, heads, dh).transpose(0, 1).reshape(heads, 3 * dh)
        cached = (qkv.weight, versions, weight, bias)
        qkv._head_major = cached
    return cached[2], cached[3]


@dataclass
class Decisions:
    """One block's decisions for a batch; None where the block has no such decision (everything runs)."""

    heads: Optional[Tensor] = None  # [B, H]
    layer: Optional[Tensor] = None  # [B, 2]: attention branch, MLP branch
    tokens: Optional[Tensor] = None  # [B, N], CLS column 1
    head_logits: Optional[Tensor] = None
    layer_logits: Optional[Tensor] = None
    token_logits: Optional[Tensor] = None


@MODEL_REGISTRY.register()
class AdaViTVisionTransformer(VisionTransformer):
    """DeiT with AdaViT decision heads; loads official AdaViT files (separate q/k/v) and DeiT files (decision
    heads newly initialised, only when fine-tuning)."""

    token_statistics = ("kept_tokens",)
    # Official AdaViT .pth.tar files hold state_dict and state_dict_ema; its evaluation uses the EMA weights.
    official_files_prefer_ema = True

    def __init__(self, ada_head: bool = True, ada_layer: bool = True, ada_token: bool = True,
                 token_with_mlp: bool = True, keep_layers: int = 1, token_start_layer: int = 0,
                 head_threshold: float = 0.5, layer_threshold: float = 0.5, token_threshold: float = 0.6,
                 tau: float = 5.0, token_pre_softmax: bool = True, token_detach_attn: bool = True,
                 token_detach_attn_at_mlp: bool = False, head_v2: bool = False, head_attn: bool = False,
                 norm_policy: bool = False, train_pos_embed: bool = False,
                 usage_weights: UsageLossWeights = UsageLossWeights(), official_base_gflops: float = 0.06,
                 decision_init_keep: float = 0.0, **vit_args):
        super().__init__(**vit_args)
        self.keep_layers, self.token_start_layer = keep_layers, token_start_layer
        self.thresholds = {"heads": head_threshold, "layer": layer_threshold, "tokens": token_threshold}
        self.tau = tau
        self.token_pre_softmax, self.token_detach_attn = token_pre_softmax, token_detach_attn
        self.token_with_mlp, self.token_detach_attn_at_mlp = token_with_mlp, token_detach_attn_at_mlp
        self.head_v2, self.head_attn = head_v2 and ada_head, head_attn and ada_head
        dim, heads = self.embed_dim, self.blocks[0].attn.num_heads
        for i, block in enumerate(self.blocks):
            decides = i >= keep_layers
            block.head_select = DecisionHead(dim, heads) if ada_head and decides else None
            block.layer_select = DecisionHead(dim, 2) if ada_layer and decides else None
            block.attn.token_select = DecisionHead(dim, 1) if ada_token and i >= token_start_layer else None
            # Official: norm_layer(dim), the backbone's LayerNorm (eps 1e-6 for DeiT, 1e-5 for T2T-ViT's "lnorm").
            policy_norm = norm_policy and decides and (ada_head or ada_layer)
            block.norm_policy = nn.LayerNorm(dim, eps=self.norm.eps) if policy_norm else None
        for module in self.modules():  # trunc_normal(0.02) weights and zero biases, as every official Linear
            if isinstance(module, DecisionHead):
                module.apply(_init_linear_and_norm)
        if decision_init_keep:
            self._bias_decisions_to_keep(decision_init_keep)
        # The official model's pos_embed is a fixed sinusoid table, frozen (DeiT's learned one is loaded into it).
        with torch.no_grad():
            self.pos_embed.copy_(sinusoid_table(self.pos_embed.shape[1], self.embed_dim))
        self.pos_embed.requires_grad_(train_pos_embed)
        # Parity replays recorded Gumbel draws: noise_source(module name, logits) -> (g1, g2).
        self.noise_source: Optional[Callable[[str, Tensor], Tuple[Tensor, Tensor]]] = None
        self.usage_weights, self.official_base_gflops = usage_weights, official_base_gflops
        self._table: Optional[Tensor] = None
        # Packed attention with head decisions per image, q, k, v per group of images keeping the same heads (True),
        # or over all (image, head) pairs at once (False); None: per image on a CPU.
        self.per_image_attention: Optional[bool] = None

    def _bias_decisions_to_keep(self, p: float) -> None:
        """Biases under which every new decision keeps its head, branch or token with probability p in training
        (logit + Gumbel noise > tau * logit(threshold)), instead of the official zero biases' sigmoid(-tau *
        logit(threshold)), about 0.12 for tokens: fine-tuning a trained backbone then starts from (nearly) all of
        them, and the usage losses take them away gradually."""
        logit = lambda q: math.log(q / (1 - q))  # noqa: E731
        for kind, head in self.decision_heads():
            nn.init.constant_(head.mlp_head.bias, logit(p) + self.tau * logit(self.thresholds[kind]))

    def decision_heads(self):
        """(kind, DecisionHead) of every block, kind "heads", "layer" or "tokens" (the keys of `thresholds`)."""
        for block in self.blocks:
            for kind, head in (("heads", block.head_select), ("layer", block.layer_select),
                               ("tokens", block.attn.token_select)):
                if head is not None:
                    yield kind, head

    @classmethod
    def from_config(cls, cfg) -> "AdaViTVisionTransformer":
        return cls(**adavit_kwargs(cfg), **vit_kwargs(cfg))

    # ------------------------------------------------------------------ decisions
    def _decide(self, kind: str, name: str, logits: Tensor) -> Tensor:
        noise = self.noise_source(name, logits) if self.training and self.noise_source is not None else None
        return gumbel_sigmoid(logits, self.thresholds[kind], self.tau, self.training, noise)

    def decisions(self, i: int, block: Block, x: Tensor, h: Tensor) -> Decisions:
        """Block i's decisions from its input x [B, N, C] and norm1(x) h, in the official call order."""
        d = Decisions()
        policy = x[:, 0] if block.norm_policy is None else block.norm_policy(x)[:, 0]
        if block.layer_select is not None:
            d.layer_logits = block.layer_select(policy)
            d.layer = self._decide("layer", f"blocks.{i}.layer_select", d.layer_logits)
        if block.head_select is not None:
            d.head_logits = block.head_select(policy)
            d.heads = self._decide("heads", f"blocks.{i}.head_select", d.head_logits)
        if block.attn.token_select is not None:
            d.token_logits = block.attn.token_select(h).squeeze(-1)[:, 1:]  # h contiguous: no copy of h[:, 1:]
            patches = self._decide("tokens", f"blocks.{i}.attn.token_select", d.token_logits)
            d.tokens = torch.cat([patches.new_ones(patches.shape[0], 1), patches], dim=1)
        return d

    # ------------------------------------------------------------------ masked: the official computation
    def masked_block(self, block: Block, x: Tensor, h: Tensor, d: Decisions) -> Tensor:
        b, n, c = x.shape
        attn = block.attn
        heads, dh = attn.num_heads, c // attn.num_heads
        width = None  # [B, C] channel mask of the kept heads (None: every channel)
        if d.heads is not None and not self.head_attn:
            width = d.heads.repeat_interleave(dh, dim=1)
        qkv = F.linear(h, attn.qkv.weight, attn.qkv.bias)
        if width is not None:  # masked weights and biases of q, k, v: a dropped head's q, k, v are zero
            qkv = qkv * width.repeat(1, 3)[:, None, :]
        q, k, v = qkv.reshape(b, n, 3, heads, dh).permute(2, 0, 3, 1, 4)
        if attn.kv_mixing is not None:  # XViT's shift: see shifted_keys_values
            k, v = self.shifted_keys_values(attn, k, v, d)
        eye = torch.eye(n, device=x.device, dtype=x.dtype)
        if self.fused_masked_attention(attn, d):
            out = self.fused_attention(attn, q, k, v, d, eye)
        else:
            out = self.explicit_attention(attn, q, k, v, d, eye)
        out = out.transpose(1, 2).reshape(b, n, c)
        if width is not None:
            out = out * width[:, None, :]
        out = attn.proj_drop(attn.proj(out))
        if d.tokens is not None:
            out = out * d.tokens[:, :, None]
        if d.layer is None:
            x = x + drop_path(out, block.drop_path, self.training)
        else:
            x = x + d.layer[:, 0, None, None] * out
        hidden = block.norm2(x)
        mlp = block.mlp
        if width is not None and not self.head_v2:
            hidden = hidden * width[:, None, :]  # fc1 sees only the kept heads' channels
        hidden = mlp.fc1(hidden)
        if width is not None and self.head_v2:  # fc1 hidden units grouped by input channel, bias masked too
            hidden = hidden * width.repeat_interleave(hidden.shape[-1] // c, dim=1)[:, None, :]
        out = mlp.fc2(mlp.drop1(mlp.norm(mlp.act(hidden))))
        out = mlp.drop2(out)
        if d.tokens is not None and self.token_with_mlp:
            gate = d.tokens.detach() if self.token_detach_attn_at_mlp else d.tokens
            out = out * gate[:, :, None]
        if d.layer is None:
            return x + drop_path(out, block.drop_path, self.training)
        return x + d.layer[:, 1, None, None] * out

    def fused_masked_attention(self, attn, d: Decisions) -> bool:
        """Whether the official masked attention is one fused call: the token policy enters only as a mask (it is
        detached and applied before the softmax), no head attends to itself in place of its heads' output, no
        attention dropout in training (its draws would differ), and VIT.FUSED_ATTENTION is on."""
        if not attn.fused or self.head_attn or (self.training and attn.attn_drop > 0):
            return False
        return d.tokens is None or (self.token_detach_attn and (self.token_pre_softmax or not self.training))

    def fused_attention(self, attn, q: Tensor, k: Tensor, v: Tensor, d: Decisions, eye: Tensor) -> Tensor:
        """softmax(logits * policy + blocked) V with the official policy and block mask, as one fused call: where
        the detached policy keeps a pair it is 1 (up to a rounding of the straight-through value, far below the
        tolerances), elsewhere the pair is blocked; a dropped token's row keeps only its own entry, the one-hot
        row the official code gets from its logit times 0. The same values and gradients, without the [B, H, N, N]
        intermediates of the explicit computation (AdaViT trains masked: twice the speed on a CPU)."""
        mask = None
        if d.tokens is not None:
            policy = (d.tokens[:, :, None] * d.tokens[:, None, :])[:, None].detach()
            mask = torch.zeros_like(policy).masked_fill((1 - policy - eye) > 0, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scale)

    def explicit_attention(self, attn, q: Tensor, k: Tensor, v: Tensor, d: Decisions, eye: Tensor) -> Tensor:
        """The official masked attention [B, H, N, D] in its order of operations."""
        logits = (q @ k.transpose(-2, -1)) * attn.scale
        probs = logits.softmax(dim=-1)
        head_gate = None if d.heads is None else d.heads[:, :, None, None]
        if self.head_attn and head_gate is not None:
            probs = probs * head_gate + eye * (1 - head_gate)  # a dropped head attends to itself only
        if d.tokens is not None:
            policy = (d.tokens[:, :, None] * d.tokens[:, None, :])[:, None]
            if self.token_detach_attn:
                policy = policy.detach()
            if self.token_pre_softmax or not self.training:
                blocked = torch.zeros_like(logits).masked_fill((1 - policy - eye) > 0, float("-inf"))
                probs = (logits * policy + blocked).softmax(dim=-1)
            else:
                probs = F.normalize(probs * policy, p=1, dim=-1)
            if self.head_attn and head_gate is not None and not self.training:  # again, in evaluation only
                probs = probs * head_gate + eye * (1 - head_gate)
        return F.dropout(probs, attn.attn_drop, self.training) @ v

    def shifted_keys_values(self, attn, k: Tensor, v: Tensor, d: Decisions):
        """Keys and values [B, H, N, D] after the backbone's kv_mixing (XViT's shift across frames), from the tokens
        the block computes only: a token it drops, or every token of a frame whose attention branch is off, gives
        its neighbours in the other frames zeros, as in packed execution, where they are never computed."""
        gate = None
        if d.tokens is not None:
            gate = d.tokens.detach() if self.token_detach_attn else d.tokens
        if d.layer is not None:
            on = d.layer[:, :1]
            gate = on if gate is None else gate * on
        if gate is not None:
            k, v = k * gate[:, None, :, None], v * gate[:, None, :, None]
        return attn.kv_mixing(k), attn.kv_mixing(v)

    # ------------------------------------------------------------------ packed: real skipping (inference)
    @torch.no_grad()
    def packed_block(self, block: Block, x: Tensor, h: Tensor, d: Decisions) -> Tensor:
        """The same block computing only what is kept, per image; x is updated in place (no autograd here).

        Per-token layers run on the rows of the kept tokens only (flattened over the batch); q, k, v and attention
        only for the kept (image, head) pairs (see _packed_attention); proj and fc1 see the dropped heads' channels
        as zeros, as in the official computation (their bias is kept, so a block without a kept head still adds the
        biases' effect)."""
        b, n, c = x.shape
        flat = x.view(b * n, c)
        tokens = None if d.tokens is None else d.tokens > 0.5  # [B, N]
        layer = None if d.layer is None else d.layer > 0.5  # [B, 2]: attention, MLP branch on
        heads = None if d.heads is None else d.heads > 0.5  # [B, H]
        for branch in ("attn", "mlp"):
            rows = tokens if branch == "attn" or self.token_with_mlp else None  # [B, N] the tokens it updates
            if layer is not None:
                on = layer[:, 0 if branch == "attn" else 1, None]
                rows = on.expand(b, n) if rows is None else rows & on
            index = None if rows is None else torch.nonzero(rows.reshape(-1)).squeeze(1)  # None: every row
            if index is not None and not index.numel():
                continue
            if branch == "attn":
                out, index = self._packed_attention(block, h, index, rows, heads)
            else:
                hidden = block.norm2(flat if index is None else flat.index_select(0, index))
                out = self._packed_mlp(block, hidden, heads, index, n)
            out = out if out.dtype == flat.dtype else out.to(flat.dtype)  # autocast: fp32 residual stream
            if index is None:
                flat.add_(out)
            else:
                flat.index_add_(0, index, out)
        return x

    def _packed_attention(self, block: Block, h: Tensor, index: Optional[Tensor], rows: Optional[Tensor],
                          heads_kept: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """Attention output [R, C] of the R kept tokens of h [B, N, C], at flat rows `index` (rows [B, N] their
        mask; both None: every token), and the flat rows of the output (`index`, or the same rows in another
        order): each image attends over its own kept tokens, each kept (image, head) pair once; heads_kept [B, H]
        (None: all)."""
        attn = block.attn
        b, n, c = h.shape
        heads, dh = attn.num_heads, c // attn.num_heads
        scale = attn.fused_scale
        per_image = h.device.type == "cpu" if self.per_image_attention is None else self.per_image_attention
        if per_image and not self.head_attn and attn.kv_mixing is None:
            return self._grouped_attention(attn, h, index, rows, heads_kept)
        x = h.view(b * n, c) if index is None else h.view(b * n, c).index_select(0, index)  # [R, C]
        lengths = torch.full((b,), n, device=h.device) if rows is None else rows.sum(dim=1)
        if heads_kept is None or self.head_attn or attn.kv_mixing is not None:
            ids = torch.arange(b * n, device=h.device) if index is None else index
            # ids: each kept token's place in its image (frame), where XViT's shift finds its neighbours.
            tokens = TokenBatch.packed_rows(x, lengths).replace(ids=ids % n, num_initial=n)
            # Every head runs (HEAD_ATTN: a dropped head attends to itself only, its output is its value; with a
            # key/value shift, which mixes heads' channels across frames, a dropped head's q, k, v are zeros).
            qkv = tokens.padded(F.linear(x, attn.qkv.weight, attn.qkv.bias))
            qkv = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, heads, dh)
            zeroed = heads_kept is not None and not self.head_attn
            if zeroed:
                qkv = qkv * heads_kept.to(qkv.dtype)[:, None, None, :, None]
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            if attn.kv_mixing is not None:
                k, v = attn.kv_mixing(k, tokens), attn.kv_mixing(v, tokens)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens.key_mask(), **scale)
            if zeroed:
                out = out * heads_kept.to(out.dtype)[:, :, None, None]
            elif heads_kept is not None:
                out = torch.where(heads_kept[:, :, None, None], out, v)
            out = tokens.unpadded(out.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], c))
            return F.linear(out, attn.proj.weight, attn.proj.bias), index
        out = x.new_zeros(x.shape[0], heads, dh)
        self._pair_attention(x, lengths, heads_kept, *head_major_qkv(attn.qkv, heads), out, scale)
        return F.linear(out.view(x.shape[0], c), attn.proj.weight, attn.proj.bias), index

    @staticmethod
    def _grouped_attention(attn, h: Tensor, index: Optional[Tensor], rows: Optional[Tensor],
                           heads_kept: Optional[Tensor]) -> Tuple[Tensor, Optional[Tensor]]:
        """_packed_attention image by image, without padding or gathered q, k, v: the images that keep the same
        heads are taken next to each other (their rows reordered, the returned index says where they go), so that
        each group of images costs one q, k, v product, and each image one call of the backbone's per-sequence
        attention. On a CPU faster than the pairs path at batch 1 to 64."""
        b, n, c = h.shape
        heads = attn.num_heads
        kept = [(True,) * heads] * b if heads_kept is None else [tuple(k) for k in heads_kept.tolist()]
        lengths = [n] * b if rows is None else [int(index.numel())] if b == 1 else rows.sum(dim=1).tolist()
        first = {}
        for i, pattern in enumerate(kept):
            first.setdefault(pattern, i)
        order = sorted(range(b), key=lambda i: first[kept[i]])  # groups by first image, images in order within
        if order != list(range(b)):  # the same rows, each group's together (a stable sort keeps the image order)
            flat_rows = torch.arange(b * n, device=h.device) if index is None else index
            group_of = torch.tensor([first[pattern] for pattern in kept], device=h.device)  # per image
            index = flat_rows[torch.argsort(group_of[torch.div(flat_rows, n, rounding_mode="floor")], stable=True)]
            kept, lengths = [kept[i] for i in order], [lengths[i] for i in order]
        x = h.view(b * n, c) if index is None else h.view(b * n, c).index_select(0, index)  # [R, C]
        weight, bias = head_major_qkv(attn.qkv, heads)
        out, start = x.new_zeros(x.shape[0], heads, c // heads), 0  # the dropped heads' channels stay 0
        for pattern, group in itertools.groupby(zip(kept, lengths), key=lambda image: image[0]):
            group_lengths = [length for _, length in group]
            size = sum(group_lengths)
            if size:
                AdaViTVisionTransformer._group_attention(attn, x[start:start + size], group_lengths, pattern,
                                                         weight, bias, out[start:start + size])
                start += size
        return F.linear(out.view(x.shape[0], c), attn.proj.weight, attn.proj.bias), index

    @staticmethod
    def _group_attention(attn, x: Tensor, lengths: List[int], kept: Tuple[bool, ...], weight: Tensor,
                         bias: Optional[Tensor], out: Tensor) -> None:
        """The attention of a group of images that keep the same heads, their rows x [R, C] (lengths[i] of image i,
        in order), for those heads, written into out [R, H, dh]: q, k, v of the kept heads in one product (the kept
        heads' rows of the head-major weights: a view for one run of consecutive heads, else gathered, which costs
        less than a product per run joined afterwards: 1.5% of a forward at batch 16, 3% at batch 1), then one
        attention call per image over all its kept heads."""
        rows, c = x.shape
        on = [j for j, keep in enumerate(kept) if keep]
        if not on:
            return
        if on[-1] - on[0] + 1 == len(on):  # consecutive heads
            heads = slice(on[0], on[-1] + 1)
            w, b = weight[heads], None if bias is None else bias[heads]
        else:
            heads = torch.tensor(on, device=x.device)
            w, b = weight.index_select(0, heads), None if bias is None else bias.index_select(0, heads)
        qkv = F.linear(x, w.reshape(-1, c), None if b is None else b.reshape(-1))
        qkv = qkv.view(rows, -1, 3, out.shape[2]).transpose(1, 2)
        start = 0
        for length in lengths:
            if length:
                image = attn.attend_rows(qkv[start:start + length]).to(out.dtype)  # autocast: bf16 attention
                if isinstance(heads, slice):
                    out[start:start + length, heads] = image
                else:
                    out[start:start + length].index_copy_(1, heads, image)
                start += length

    @staticmethod
    def _pair_attention(x: Tensor, lengths: Tensor, kept: Tensor, weight: Tensor, bias: Optional[Tensor],
                        out: Tensor, scale: dict) -> None:
        """Attention of every kept (image, head) pair, written into out [R, H, dh], x [R, C] the kept tokens
        (lengths[b] of image b, in order), kept [B, H]: q, k, v per head for the rows of the images that keep it
        (head-major, images and tokens in order), then one attention call over every pair, each padded to the
        longest."""
        rows, heads, dh = out.shape
        image_of_row = torch.repeat_interleave(torch.arange(lengths.numel(), device=x.device), lengths)
        kept = kept & (lengths > 0)[:, None]  # [B, H]
        # The rows of every head, head-major; each head's q, k, v one product, joined. A head every image keeps
        # reads the kept tokens as they are, a head some images drop its images' rows.
        head_of, row_of = torch.nonzero(kept[image_of_row].t(), as_tuple=True)
        counts = torch.bincount(head_of, minlength=heads).tolist()
        if not sum(counts):
            return
        products, start = [], 0
        for j, count in enumerate(counts):
            if count:
                rows_j = x if count == rows else x.index_select(0, row_of[start:start + count])
                products.append(F.linear(rows_j, weight[j], None if bias is None else bias[j]))
                start += count
        qkv = torch.cat(products)  # [sum(counts), 3 * dh], in autocast's precision like every other product
        pair_head, pair_image = torch.nonzero(kept.t(), as_tuple=True)  # head-major, as the rows of qkv
        pair_len = lengths[pair_image]
        slots = torch.arange(int(pair_len.max()), device=x.device)
        valid = slots < pair_len[:, None]  # [P, W]
        source = ((pair_len.cumsum(0) - pair_len)[:, None] + slots).clamp(max=qkv.shape[0] - 1)
        # Gathered as [3, P * W, dh]: q, k and v come out contiguous.
        q, k, v = qkv.view(-1, 3, dh).transpose(0, 1).index_select(1, source.view(-1)).view(3, *valid.shape, dh)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, :], **scale)
        row = (lengths.cumsum(0) - lengths)[pair_image][:, None] + slots
        out.view(-1, dh).index_copy_(0, (row * heads + pair_head[:, None])[valid], o[valid].to(out.dtype))

    def _packed_mlp(self, block: Block, hidden: Tensor, heads: Optional[Tensor], index: Optional[Tensor],
                    n: int) -> Tensor:
        """MLP output [R, C] of the normed tokens `hidden` [R, C] at rows `index` (None: every row, n per image);
        `heads` [B, H] the kept heads."""
        mlp = block.mlp
        if heads is None or self.head_attn:
            return mlp(hidden)
        if heads.shape[0] > 1:  # each row's image's heads
            heads = heads.repeat_interleave(n, dim=0) if index is None else \
                heads.index_select(0, torch.div(index, n, rounding_mode="floor"))
        heads = heads.to(hidden.dtype)
        if self.head_v2:  # fc1's hidden units of the dropped heads' channels are 0 (bias included)
            z = mlp.fc1(hidden)
            z = (z.view(z.shape[0], heads.shape[1], -1) * heads[:, :, None]).view_as(z)
        else:  # fc1 sees only the kept heads' channels
            z = mlp.fc1((hidden.view(hidden.shape[0], heads.shape[1], -1) * heads[:, :, None]).view_as(hidden))
        return mlp.fc2(mlp.act(z))

    # ------------------------------------------------------------------ the model
    def forward_features(self, images: Tensor) -> TokenBatch:
        x = self.embed(images).x
        self.last_num_tokens = x.shape[1]  # CLS included, at this input size
        packed = self.token_execution == "packed" and not self.training and not torch.is_grad_enabled()
        self.last_decisions: List[Decisions] = []
        # With `trace_hidden` set, every block's output [B, N, C] (for parity and inspection).
        self.last_hidden = [] if getattr(self, "trace_hidden", False) else None
        for i, block in enumerate(self.blocks):
            h = block.norm1(x)
            d = self.decisions(i, block, x, h)
            self.last_decisions.append(d)
            x = self.packed_block(block, x, h, d) if packed else self.masked_block(block, x, h, d)
            if self.last_hidden is not None:
                self.last_hidden.append(x.detach().clone())
        tokens = TokenBatch.dense(self.norm(x), self.token_execution)
        tokens.token_counts = self._token_counts(x.shape[:2])
        return tokens

    def _token_counts(self, shape) -> List[Tensor]:
        """Per block [B, 2] the tokens its token decision kept, in both columns (the kept-token statistics; whether
        a branch ran, and whether dropped tokens skip the MLP, are in `usage_per_block` and `macs_per_image`),
        counted for all blocks at once."""
        b, n = shape
        counts = torch.full((b, len(self.last_decisions)), n, device=self.pos_embed.device)
        decided = [i for i, d in enumerate(self.last_decisions) if d.tokens is not None]
        if decided:
            tokens = torch.stack([self.last_decisions[i].tokens for i in decided], dim=1)
            counts[:, decided] = (tokens > 0.5).sum(dim=2)
        return list(counts[:, :, None].expand(-1, -1, 2).unbind(1))

    # ------------------------------------------------------------------ what the decisions cost and use
    def stacked_decisions(self) -> Dict[str, Optional[Tensor]]:
        """The official outputs: head_select [B, Lh, H], layer_select [B, Ll, 2], token_select [B, Lt, N] and the
        decision logits, stacked over the blocks that have each decision (None if none has)."""
        out = {}
        for name, field in (("head_select", "heads"), ("layer_select", "layer"), ("token_select", "tokens"),
                            ("head_select_logits", "head_logits"), ("layer_select_logits", "layer_logits"),
                            ("token_select_logits", "token_logits")):
            values = [getattr(d, field) for d in self.last_decisions if getattr(d, field) is not None]
            out[name] = torch.stack(values, dim=1) if values else None
        return out

    def _kept(self, d: Decisions):
        """(heads, attention on, MLP on, tokens) each image kept in a block, [B] float64 each."""
        b, n = self.last_token_counts.shape[0], self.last_num_tokens
        ones = torch.ones(b, dtype=torch.float64, device=self.pos_embed.device)
        heads = (d.heads > 0.5).sum(1).double() if d.heads is not None else ones * self.blocks[0].attn.num_heads
        attn_on = (d.layer[:, 0] > 0.5).double() if d.layer is not None else ones
        mlp_on = (d.layer[:, 1] > 0.5).double() if d.layer is not None else ones
        tokens = (d.tokens > 0.5).sum(1).double() if d.tokens is not None else ones * n
        return heads, attn_on, mlp_on, tokens

    def usage_per_block(self) -> Dict[str, Tensor]:
        """[B, depth] fraction of heads, attention branch, MLP branch and tokens (CLS included) each image kept, each
        decision on its own (a block's heads count as kept even where its attention branch is off)."""
        heads, n = self.blocks[0].attn.num_heads, self.last_num_tokens
        kept = [self._kept(d) for d in self.last_decisions]
        return {name: torch.stack([k[i] / scale for k in kept], dim=1).float()
                for i, (name, scale) in enumerate((("head_usage", heads), ("attn_usage", 1), ("mlp_usage", 1),
                                                   ("token_usage", n)))}

    def macs_per_image(self) -> Tensor:
        """[B] multiply-accumulates packed execution computes for each image of the last forward: the decision
        heads; q, k, v and attention of the kept heads on the kept tokens; proj, fc1 and fc2 on the kept tokens.
        Blocks, branches and tokens that are off cost nothing."""
        c, heads = self.embed_dim, self.blocks[0].attn.num_heads
        hidden = self.blocks[0].mlp.fc1.out_features
        n = self.last_num_tokens
        total = 0
        for block, d in zip(self.blocks, self.last_decisions):
            h, a, m, t = self._kept(d)
            t_mlp = t if self.token_with_mlp else torch.full_like(t, n)
            w = h * (c // heads)  # channels of the kept heads
            decide = sum(head.mlp_head.in_features * head.mlp_head.out_features
                         for head in (block.head_select, block.layer_select) if head is not None)
            if block.attn.token_select is not None:  # it reads every token; CLS's decision is then replaced
                decide += n * c
            if self.head_attn or block.attn.kv_mixing is not None:  # every head runs (see _packed_attention)
                attn = 4 * t * c * c + 2 * t * t * c
            else:  # q, k, v and attention of the kept heads; proj over all channels (the dropped ones are 0)
                attn = 3 * t * c * w + 2 * t * t * w + t * c * c
            mlp = 2 * t_mlp * c * hidden  # fc1 on the masked channels, fc2
            total = total + decide + a * attn + m * mlp
        return total + self._embedding_macs() + c * self.num_classes

    def _embedding_macs(self) -> int:
        """MACs per image before the blocks, at the last forward's input size: the patch embedding."""
        proj = self.patch_embed.proj
        return ((self.last_num_tokens - 1) * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1]
                * self.embed_dim)

    def official_gflops(self) -> Tensor:
        """[B] GFLOPs of the last forward by the official flops table (its quirks: see adavit_costs)."""
        c, heads, n = self.embed_dim, self.blocks[0].attn.num_heads, self.last_num_tokens
        hidden = self.blocks[0].mlp.fc1.out_features
        if self._table is None or self._table.shape[:2] != (heads + 1, n + 1):
            self._table = official_flops_table(heads, n, c, hidden / c, device=self.pos_embed.device)
        d = self.stacked_decisions()
        return official_gflops(self._table, d["head_select"], d["layer_select"], d["token_select"],
                               depth=len(self.blocks), base=self.official_base_gflops,
                               batch_size=self.last_token_counts.shape[0])

    def image_statistics(self) -> Dict[str, Tensor]:
        """Per-image statistics of the last forward that evaluation logs ([B] or [B, depth] each)."""
        return {"gflops_official": self.official_gflops(), **self.usage_per_block()}

    def auxiliary_losses(self) -> Dict[str, Tensor]:
        """The usage losses of the last (training) forward, weighted: {"head": ..., "layer": ..., "token": ...}."""
        d = self.stacked_decisions()
        return usage_loss(d["head_select"], d["layer_select"], d["token_select"], d["head_select_logits"],
                          d["layer_select_logits"], self.usage_weights)

    # ------------------------------------------------------------------ checkpoints
    def adapt_official_state_dict(self, sd: dict, report) -> dict:
        """Official AdaViT files keep q, k and v apart (blocks.i.attn.{query,key,value}.*): they are joined into
        the backbone's qkv. A DeiT file has no decision heads: when fine-tuning they start from this model's
        initialisation, and the report says so; for evaluation they are missing keys (random decisions)."""
        sd = dict(sd)
        joined = []
        for i in range(len(self.blocks)):
            prefix = f"blocks.{i}.attn."
            for kind in ("weight", "bias"):
                parts = [sd.get(f"{prefix}{name}.{kind}") for name in ("query", "key", "value")]
                if all(p is not None for p in parts):
                    sd[f"{prefix}qkv.{kind}"] = torch.cat(parts, dim=0)
                    for name in ("query", "key", "value"):
                        del sd[f"{prefix}{name}.{kind}"]
                    joined.append(i)
        if joined:
            report.converted.append(f"joined attn.query/key/value into attn.qkv in {len(set(joined))} block(s)")
        own = self.state_dict()
        new_heads = [k for k in own if _is_decision_key(k) and k not in sd]
        # Only a file without any decision head (DeiT) starts them new; an AdaViT file of another layout is refused.
        if new_heads and getattr(report, "fine_tuning", False) and not any(_is_decision_key(k) for k in sd):
            sd.update({k: own[k] for k in new_heads})
            report.converted.append(f"decision heads newly initialised (not in the file): {len(new_heads)} tensors")
        return sd


@MODEL_REGISTRY.register()
class AdaViTT2TViT(AdaViTVisionTransformer, T2TViT):
    """AdaViT on T2T-ViT: official `ada_step_t2t_vit_{14,19}_lnorm` (AdaStepT2T_ViT with use_t2t True).

    The decision heads, the masked and packed block computation, costs, losses and checkpoint conversion are
    AdaViTVisionTransformer's; the embedding (Tokens-to-Token tokenizer, CLS, fixed sinusoid pos_embed buffer),
    initialisation, LayerNorm eps 1e-5, no qkv bias and the optional qk_scale are T2TViT's (MRO: AdaViT's
    __init__ builds the backbone through T2TViT.__init__). The official T2T variant differs from the DeiT one
    only there: the decisions read the same block inputs (CLS of x for heads / layer, norm1(x)[:, 1:] for
    tokens) in blocks i >= keep_layers / i >= token_start_layer, and "lnorm" is plain nn.LayerNorm (eps 1e-5)
    for norm1, norm2, the final norm and norm_policy.

    Official files (timm saver: state_dict / state_dict_ema, EMA preferred) have the T2T-ViT tokenizer keys
    (tokens_to_token.attention{1,2}.{w, kqv, proj, norm1, norm2, mlp.0, mlp.2}.*, tokens_to_token.project.*),
    pos_embed, and AdaViT's blocks (blocks.i.attn.{query,key,value}.weight without bias, decision heads).
    Official FLOPs: the t2t-19 table plus ADAVIT.OFFICIAL_BASE_GFLOPS 0.33 (see adavit_costs).
    """

    def __init__(self, official_base_gflops: float = OFFICIAL_BASE_GFLOPS_OTHER, train_pos_embed: bool = False,
                 **kwargs):
        if train_pos_embed:  # T2T-ViT's pos_embed is a fixed sinusoid buffer (official: a frozen Parameter)
            raise ValueError("AdaViT on T2T-ViT has a fixed sinusoid pos_embed; train_pos_embed is not supported")
        super().__init__(official_base_gflops=official_base_gflops, train_pos_embed=False, **kwargs)

    @classmethod
    def from_config(cls, cfg) -> "AdaViTT2TViT":
        return cls(**adavit_kwargs(cfg), **t2t_kwargs(cfg))

    def _embedding_macs(self) -> int:
        """The T2T tokenizer at the last forward's input size."""
        return self.tokens_to_token.macs(getattr(self, "last_img_size", self.img_size))

    def adapt_official_state_dict(self, sd: dict, report) -> dict:
        """AdaViT's conversion (q/k/v joined, decision heads for fine-tuning), then T2T-ViT's (a sinusoid
        pos_embed of another length is regenerated)."""
        sd = AdaViTVisionTransformer.adapt_official_state_dict(self, sd, report)
        return T2TViT.adapt_official_state_dict(self, sd, report)


@MODEL_REGISTRY.register()
class AdaViTTimeSformer(AdaViTVisionTransformer, TimeSformer):
    """AdaViT on TimeSformer with joint space-time attention: its decision heads read the clip's CLS (heads, blocks)
    and every token of the clip (tokens), so a clip keeps the heads, blocks and space-time tokens it needs, as an
    image does. Space-only and divided attention are not supported: AdaViT runs its own masked / packed attention,
    which would have to learn their frame layouts (XViT's per-frame layout is AdaViTXViT)."""

    def __init__(self, **kwargs):
        if kwargs.get("attention_type") != "joint_space_time":
            raise ValueError("AdaViT on TimeSformer runs with TIMESFORMER.ATTENTION_TYPE joint_space_time; "
                             f"{kwargs.get('attention_type')} is not supported")
        super().__init__(**kwargs)

    @classmethod
    def from_config(cls, cfg) -> "AdaViTTimeSformer":
        return cls(**adavit_kwargs(cfg), **TimeSformer.config_kwargs(cfg))

    def adapt_official_state_dict(self, sd: dict, report) -> dict:
        """TimeSformer's conversions (prefix), then AdaViT's (q/k/v joined, decision heads when fine-tuning)."""
        return AdaViTVisionTransformer.adapt_official_state_dict(self, TimeSformer.adapt_official_state_dict(
            self, sd, report), report)


class AdaViTFrameViT(AdaViTVisionTransformer, FrameViT):
    """XViT's per-frame backbone with AdaViT: every frame is an AdaViT image, its decision heads reading its own CLS
    (heads, blocks) and tokens. The key/value shift takes from the neighbouring frames only what their blocks
    compute (kept tokens of frames whose attention branch runs; zeros otherwise), and because it mixes heads'
    channels across frames, a dropped head is zeroed rather than skipped in a shifted block (its MACs are counted)."""


@MODEL_REGISTRY.register()
class AdaViTXViT(XViT):
    """AdaViT on XViT (AdaViTFrameViT as the backbone, the temporal head unchanged), with AdaViT's usage losses;
    loads XViT checkpoints (decision heads newly initialised when fine-tuning, reported)."""

    frame_model = AdaViTFrameViT

    @staticmethod
    def frame_model_kwargs(cfg) -> dict:
        return adavit_kwargs(cfg)

    def auxiliary_losses(self) -> Dict[str, Tensor]:
        return self.base_model.auxiliary_losses()

    def image_statistics(self) -> Dict[str, Tensor]:
        """Per clip: the usage of heads, branches and tokens averaged over its frames ([B, depth] each). The
        official GFLOPs table describes a DeiT image and is left out."""
        b, _, t = self.last_clip_shape[:3]
        return {k: v.reshape(b, t, -1).mean(dim=1) for k, v in self.base_model.usage_per_block().items()}

    def adapt_official_state_dict(self, sd: dict, report) -> dict:
        """XViT's conversions, then AdaViT's on the backbone's keys (q/k/v joined, decision heads when
        fine-tuning)."""
        sd = XViT.adapt_official_state_dict(self, sd, report)
        prefix = "base_model."
        inner = self.base_model.adapt_official_state_dict(
            {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}, report)
        return {**{k: v for k, v in sd.items() if not k.startswith(prefix)},
                **{prefix + k: v for k, v in inner.items()}}


def adavit_kwargs(cfg) -> dict:
    """AdaViT's constructor arguments from the ADAVIT node (the backbone's come from vit_kwargs / t2t_kwargs)."""
    a = cfg.ADAVIT
    return dict(ada_head=a.HEAD, ada_layer=a.LAYER, ada_token=a.TOKEN, token_with_mlp=a.TOKEN_WITH_MLP,
                keep_layers=a.KEEP_LAYERS, token_start_layer=a.TOKEN_START_LAYER,
                head_threshold=a.HEAD_THRESHOLD, layer_threshold=a.LAYER_THRESHOLD,
                token_threshold=a.TOKEN_THRESHOLD, tau=a.TAU, token_pre_softmax=a.TOKEN_PRE_SOFTMAX,
                token_detach_attn=a.TOKEN_DETACH_ATTN, token_detach_attn_at_mlp=a.TOKEN_DETACH_ATTN_AT_MLP,
                head_v2=a.HEAD_V2, head_attn=a.HEAD_ATTN, norm_policy=a.NORM_POLICY,
                train_pos_embed=a.TRAIN_POS_EMBED, usage_weights=usage_weights_from_config(a),
                official_base_gflops=a.OFFICIAL_BASE_GFLOPS, decision_init_keep=a.DECISION_INIT_KEEP)


def usage_weights_from_config(a) -> UsageLossWeights:
    """The ADAVIT node's loss keys (the official option names, upper case) as the official AdaLoss weights."""
    return UsageLossWeights(**{name: a[name.upper()] for name in UsageLossWeights().as_dict()})


def official_to_config_opts(config: dict) -> List[str]:
    """KEY VALUE overrides for the official AdaStepT2T_ViT constructor arguments (a golden file's `config`)."""
    ctor, hard = config["constructor"], config.get("hardcoded", {})
    t2t = bool(ctor.get("use_t2t"))
    if ctor.get("qk_scale") is not None and not t2t:
        raise ValueError(f"official AdaViT qk_scale {ctor['qk_scale']} is not supported on DeiT (vitadapt uses "
                         "head_dim**-0.5 there; T2T.QK_SCALE sets it for the T2T-ViT variants)")
    size = ctor["img_size"][0] if isinstance(ctor["img_size"], (list, tuple)) else ctor["img_size"]
    if t2t:
        # ada_step_t2t_vit_*_lnorm: T2T tokenizer, nn.LayerNorm (eps 1e-5). VIT.PATCH_SIZE is unused by the model
        # (it only has to divide the crop), so the official patch_size is not passed.
        backbone = {"MODEL.NAME": "AdaViTT2TViT", "T2T.TOKENS_TYPE": ctor.get("tokens_type", "performer"),
                    "T2T.TOKEN_DIM": ctor.get("token_dim", 64), "T2T.QK_SCALE": float(ctor.get("qk_scale") or 0.0),
                    "T2T.NORM_EPS": float(ctor.get("norm_eps", 1e-5))}
    else:
        backbone = {"MODEL.NAME": "AdaViTVisionTransformer", "VIT.PATCH_SIZE": ctor["patch_size"]}
    default_base = OFFICIAL_BASE_GFLOPS_OTHER if t2t else OFFICIAL_BASE_GFLOPS_DEIT
    pairs = {**backbone, "MODEL.NUM_CLASSES": ctor["num_classes"],
             "DATA.TRAIN_CROP_SIZE": size, "DATA.TEST_CROP_SIZE": size,
             "VIT.IN_CHANS": ctor.get("in_chans", 3), "VIT.EMBED_DIM": ctor["embed_dim"], "VIT.DEPTH": ctor["depth"],
             "VIT.NUM_HEADS": ctor["num_heads"], "VIT.MLP_RATIO": float(ctor["mlp_ratio"]),
             "VIT.QKV_BIAS": bool(ctor["qkv_bias"]), "VIT.DROP_RATE": float(ctor.get("drop_rate", 0.0)),
             "VIT.ATTN_DROP_RATE": float(ctor.get("attn_drop_rate", 0.0)),
             "VIT.DROP_PATH_RATE": float(ctor.get("drop_path_rate", 0.0)),
             "ADAVIT.HEAD": bool(ctor["ada_head"]), "ADAVIT.LAYER": bool(ctor["ada_layer"]),
             "ADAVIT.TOKEN": bool(ctor["ada_token"]), "ADAVIT.TOKEN_WITH_MLP": bool(ctor["ada_token_with_mlp"]),
             "ADAVIT.KEEP_LAYERS": ctor["keep_layers"], "ADAVIT.TOKEN_START_LAYER": ctor["ada_token_start_layer"],
             "ADAVIT.TOKEN_PRE_SOFTMAX": bool(ctor["ada_token_pre_softmax"]),
             "ADAVIT.TOKEN_DETACH_ATTN": bool(ctor["ada_token_detach_attn"]),
             "ADAVIT.TOKEN_DETACH_ATTN_AT_MLP": bool(ctor["ada_token_detach_attn_at_mlp"]),
             "ADAVIT.HEAD_V2": bool(ctor.get("ada_head_v2", False)), "ADAVIT.HEAD_ATTN": bool(ctor.get("ada_head_attn", False)),
             "ADAVIT.NORM_POLICY": bool(ctor.get("norm_policy", False)),
             "ADAVIT.TAU": float(hard.get("gumbel_tau", 5.0)),
             "ADAVIT.HEAD_THRESHOLD": float(hard.get("head_threshold", 0.5)),
             "ADAVIT.LAYER_THRESHOLD": float(hard.get("layer_threshold", 0.5)),
             "ADAVIT.TOKEN_THRESHOLD": float(hard.get("token_threshold", 0.6)),
             "ADAVIT.OFFICIAL_BASE_GFLOPS": float(config.get("flops_base", default_base))}
    return [str(x) for kv in pairs.items() for x in kv]


def _is_decision_key(key: str) -> bool:
    return any(part in key for part in ("head_select.", "layer_select.", "token_select.", "norm_policy."))


def add_adavit_config(cfg) -> None:
    from fvcore.common.config import CfgNode

    cfg.ADAVIT = CfgNode()
    # Which decisions exist (official --ada-head, --ada-layer, --ada-token; the README models use all three).
    cfg.ADAVIT.HEAD = True
    cfg.ADAVIT.LAYER = True
    cfg.ADAVIT.TOKEN = True
    # Dropped tokens skip the MLP too (official --ada-token-with-mlp), not only the attention.
    cfg.ADAVIT.TOKEN_WITH_MLP = True
    # Head and layer decisions start at this block (official keep_layers, >= 1); token decisions at TOKEN_START_LAYER.
    cfg.ADAVIT.KEEP_LAYERS = 1
    cfg.ADAVIT.TOKEN_START_LAYER = 0
    # Decision thresholds on sigmoid(logit); the official token threshold 0.6 is hard-coded there.
    cfg.ADAVIT.HEAD_THRESHOLD = 0.5
    cfg.ADAVIT.LAYER_THRESHOLD = 0.5
    cfg.ADAVIT.TOKEN_THRESHOLD = 0.6
    # Gumbel-sigmoid temperature in training (official: 5 for every decision; its *_select_tau arguments are ignored).
    cfg.ADAVIT.TAU = 5.0
    # Dropped tokens are masked before the softmax (official default, and always in evaluation); False: in
    # training the softmax is renormalised over the kept tokens after it (the same values).
    cfg.ADAVIT.TOKEN_PRE_SOFTMAX = True
    # No gradient from the attention mask into the token decisions (official ada_token_detach_attn).
    cfg.ADAVIT.TOKEN_DETACH_ATTN = True
    # No gradient from the MLP output's token gate into the token decisions (official ada_token_detach_attn_at_mlp).
    cfg.ADAVIT.TOKEN_DETACH_ATTN_AT_MLP = False
    # Head decisions gate MLP fc1's hidden units instead of its input channels (official --ada-head-v2).
    cfg.ADAVIT.HEAD_V2 = False
    # A dropped head attends to itself only instead of being zeroed; q, k, v, proj and fc1 are not masked
    # (official --ada-head-attn, the paper's Eq. 8).
    cfg.ADAVIT.HEAD_ATTN = False
    # A LayerNorm on the CLS token before the head and layer decisions (official norm_policy; keys blocks.i.norm_policy.*).
    cfg.ADAVIT.NORM_POLICY = False
    # The official model freezes pos_embed (DeiT's is loaded into it); True trains it.
    cfg.ADAVIT.TRAIN_POS_EMBED = False
    # Usage losses, one key per official ada_main.py option (--head-ratio -> HEAD_RATIO, --head-target-ratio ->
    # HEAD_TARGET_RATIO, ...), with its defaults: *_RATIO x |usage - *_TARGET_RATIO| for heads and layers,
    # TOKEN_RATIO x (usage - TOKEN_TARGET_RATIO)^2 for tokens, and the diverse / entropy / minimal terms (0 by
    # default). See vitadapt.models.adavit_costs.UsageLossWeights.
    for name, default in UsageLossWeights().as_dict().items():
        cfg.ADAVIT[name.upper()] = float(default)
    # Base GFLOPs the official table adds per image for everything outside the blocks (ada_main.py hard-codes
    # it): 0.06 for every DeiT (DeiT-S's patch embedding), 0.33 for T2T-ViT (its Tokens-to-Token tokenizer;
    # vitadapt.models.adavit_costs.exact_t2t_base_gflops counts 0.313 for T2T-ViT-19).
    cfg.ADAVIT.OFFICIAL_BASE_GFLOPS = 0.06
    # New decision heads (training from scratch, or fine-tuning a backbone file): 0.0 = the official zero biases;
    # p in (0, 1): biases under which each keeps its head, branch or token with probability p in training at first.
    cfg.ADAVIT.DECISION_INIT_KEEP = 0.0


ADAVIT_MODELS = ("AdaViTVisionTransformer", "AdaViTT2TViT", "AdaViTTimeSformer", "AdaViTXViT")


def validate_adavit_config(cfg) -> None:
    if cfg.MODEL.NAME not in ADAVIT_MODELS:
        return
    a, depth = cfg.ADAVIT, cfg.VIT.DEPTH
    if cfg.MODEL.NAME == "AdaViTTimeSformer" and cfg.TIMESFORMER.ATTENTION_TYPE != "joint_space_time":
        raise ConfigError(f"MODEL.NAME AdaViTTimeSformer needs TIMESFORMER.ATTENTION_TYPE joint_space_time, got "
                          f"{cfg.TIMESFORMER.ATTENTION_TYPE}")
    if cfg.MODEL.NAME == "AdaViTT2TViT":
        # The T2T node's own checks (tokens type, token dim, qk scale, crops), which key on MODEL.NAME T2TViT.
        t2t = cfg.clone()
        t2t.defrost()
        t2t.MODEL.NAME = "T2TViT"
        validate_t2t_config(t2t)
        if a.TRAIN_POS_EMBED:
            raise ConfigError("ADAVIT.TRAIN_POS_EMBED: T2T-ViT's pos_embed is a fixed sinusoid table (a buffer); "
                              "it cannot be trained with MODEL.NAME AdaViTT2TViT")
        if a.OFFICIAL_BASE_GFLOPS == OFFICIAL_BASE_GFLOPS_DEIT:
            logger.warning("ADAVIT.OFFICIAL_BASE_GFLOPS is %s, the official DeiT constant; the official T2T-ViT "
                           "evaluation adds %s (configs/ImageNet/AdaViT/AdaViT_T2T_ViT_19.yaml)",
                           OFFICIAL_BASE_GFLOPS_DEIT, OFFICIAL_BASE_GFLOPS_OTHER)
    if not 1 <= a.KEEP_LAYERS <= depth:
        raise ConfigError(f"ADAVIT.KEEP_LAYERS must be in [1, VIT.DEPTH={depth}], got {a.KEEP_LAYERS}")
    if not 0 <= a.TOKEN_START_LAYER <= depth:
        raise ConfigError(f"ADAVIT.TOKEN_START_LAYER must be in [0, VIT.DEPTH={depth}], got {a.TOKEN_START_LAYER}")
    if a.DECISION_INIT_KEEP and not 0 < a.DECISION_INIT_KEEP < 1:
        raise ConfigError(f"ADAVIT.DECISION_INIT_KEEP must be 0 (official initialisation) or in (0, 1), got "
                          f"{a.DECISION_INIT_KEEP}")
    for key in ("HEAD_THRESHOLD", "LAYER_THRESHOLD", "TOKEN_THRESHOLD"):
        if not 0 < a[key] < 1:
            raise ConfigError(f"ADAVIT.{key} must be in (0, 1), got {a[key]}")
    if a.TAU <= 0:
        raise ConfigError(f"ADAVIT.TAU must be > 0, got {a.TAU}")
    if a.HEAD_V2 and a.HEAD_ATTN:
        raise ConfigError("ADAVIT.HEAD_V2 and ADAVIT.HEAD_ATTN are two ways of applying head decisions; choose one")
    if a.HEAD_V2 and not float(cfg.VIT.MLP_RATIO).is_integer():
        raise ConfigError(f"ADAVIT.HEAD_V2 groups fc1's hidden units per input channel: VIT.MLP_RATIO must be a whole "
                          f"number, got {cfg.VIT.MLP_RATIO}")
    if (a.HEAD_V2 or a.HEAD_ATTN) and not a.HEAD:
        raise ConfigError("ADAVIT.HEAD_V2 / ADAVIT.HEAD_ATTN change how head decisions apply, but ADAVIT.HEAD is False")
    if not (a.HEAD or a.LAYER or a.TOKEN):
        logger.warning("ADAVIT.HEAD, LAYER and TOKEN are all False: the model is a plain %s",
                       "T2T-ViT" if cfg.MODEL.NAME == "AdaViTT2TViT" else "DeiT")


register_config("ADAVIT", add_adavit_config, validate_adavit_config)
