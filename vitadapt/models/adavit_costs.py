"""AdaViT (Meng et al., CVPR 2022) usage losses and FLOPs accounting, as the official code computes them.

Pure functions on plain tensors (no model class, torch only, on the inputs' device and dtype), written from
specs/avit_adavit.md §2.3-2.4 and checked against the official code's outputs (shared/golden/adavit).

Decision tensors, as the AdaViT model returns them (1 = kept / on), stacked over the blocks that decide:
* ``head_select``  [B, Lh, H]  heads kept, blocks i >= keep_layers;
* ``layer_select`` [B, Ll, 2]  [..., 0] attention branch on, [..., 1] MLP branch on, blocks i >= keep_layers;
* ``token_select`` [B, Lt, N]  tokens kept, CLS (column 0, always 1) included, blocks i >= token_start_layer;
* ``head_logits`` [B, Lh, H], ``layer_logits`` [B, Ll, 2]: the pre-sigmoid decision logits.
In training the decisions are the straight-through hard values (forward 0/1, gradient of the soft sigmoid).

Usage losses (official ``models/losses.py::AdaLoss``)
-----------------------------------------------------
``loss = task + head_ratio * L_head + layer_ratio * L_layer + token_ratio * L_token``; ``usage_loss`` returns the
three weighted terms. The official trainer logs the unweighted ``head_loss``/``layer_loss``/``token_loss``; they
are ``head_usage_loss`` & co. here. Details the spec leaves implicit but the official code does:
* The masked head mean divides by ``mask.sum() + 1e-6`` (also per (block, head) for the diverse/minimal terms).
* The diverse, entropy and minimal terms are computed only when their weight is > 0; a negative weight would be
  silently ignored there, so `UsageLossWeights` rejects negative weights.
* Entropies are of sigmoid(logits) with probabilities clamped at 1e-7 inside the logs, averaged over all
  decided (block, head) entries and the batch, not masked by the layer decisions.
* A missing decision (None) gives a zero loss for its term.
* Of the minimal-usage terms only the token one grows with the batch size (a sum over images x blocks); the head
  and layer ones sum over (block, head) / (block, branch) of batch means.

FLOPs (official ``block_flops_dict.py``, ``ada_main.py:1055-1072``)
----------------------------------------------------------------
A per-block table ``[kept_heads, kept_tokens, attn_on, mlp_on]`` in GFLOPs (fvcore convention: one
multiply-add = one flop), summed over the blocks plus a constant base. See `official_flops_table` for the
closed form that reproduces the shipped tables exactly, and its quirks. The numbers assume real pruning; the
official model only masks, so they are theoretical for it.
"""

from dataclasses import asdict, dataclass, fields
from typing import Dict, Mapping, Optional

import torch
from torch import Tensor

# ------------------------------------------------------------------------------------------------ usage losses

_HEAD_MEAN_EPS = 1e-6  # AdaLoss._get_head_loss: denominators of the masked head means
_ENTROPY_EPS = 1e-7  # losses.py binaray_entropy: probabilities clamped before the logs


@dataclass(frozen=True)
class UsageLossWeights:
    """The AdaLoss weights under ``ada_main.py``'s CLI names (``--head-ratio`` -> ``head_ratio``, ...).

    Defaults are ada_main's (ratios 2/2/2, targets 0.5, every other term 0), which are what the official
    training runs with. They differ from the defaults of the ``AdaLoss`` class itself, which ada_main always
    overrides: the class has head/layer diverse 0.1, head/layer entropy 0.1, token_minimal 0.1 with
    token_minimal_weight 1. Use `from_adaloss_kwargs` for AdaLoss constructor names (``head_loss_ratio``, ...).
    """

    head_ratio: float = 2.0
    layer_ratio: float = 2.0
    token_ratio: float = 2.0
    head_target_ratio: float = 0.5
    layer_target_ratio: float = 0.5
    token_target_ratio: float = 0.5
    head_diverse_ratio: float = 0.0
    layer_diverse_ratio: float = 0.0
    head_entropy_weight: float = 0.0
    layer_entropy_weight: float = 0.0
    head_minimal_weight: float = 0.0
    head_minimal: float = 0.0
    layer_minimal_weight: float = 0.0
    layer_minimal: float = 0.0
    token_minimal_weight: float = 0.0
    token_minimal: float = 0.0

    # AdaLoss constructor name -> ada_main CLI name, for the three that differ.
    _ADALOSS_RENAMES = {"head_loss_ratio": "head_ratio", "layer_loss_ratio": "layer_ratio",
                        "token_loss_ratio": "token_ratio"}

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"UsageLossWeights.{f.name} must be a number, got {value!r}")
            # The official code only adds the optional terms when their weight is > 0 (a negative weight is
            # silently dropped); a negative ratio would reward moving away from the target. Neither is meaningful.
            if value < 0:
                raise ValueError(f"UsageLossWeights.{f.name} must be >= 0, got {value}")

    @classmethod
    def from_adaloss_kwargs(cls, kwargs: Mapping[str, float]) -> "UsageLossWeights":
        """From ``AdaLoss(...)`` keyword names (as recorded in the golden ``config['losses'][setting]``)."""
        known = {f.name for f in fields(cls)}
        renamed = {cls._ADALOSS_RENAMES.get(k, k): v for k, v in kwargs.items()}
        unknown = sorted(set(renamed) - known)
        if unknown:
            raise KeyError(f"unknown AdaLoss argument(s) {unknown}")
        return cls(**renamed)

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def _zero_like(*tensors: Optional[Tensor]) -> Tensor:
    """The official missing-decision loss, ``x.new_zeros(1).mean()``, on the first given tensor's device/dtype."""
    like = next((t for t in tensors if t is not None), None)
    return torch.zeros((), device=None if like is None else like.device,
                       dtype=None if like is None else (like.dtype if like.is_floating_point() else None))


def _binary_entropy(prob: Tensor) -> Tensor:
    return -(prob * prob.clamp(min=_ENTROPY_EPS).log() + (1 - prob) * (1 - prob).clamp(min=_ENTROPY_EPS).log())


def _require_logits(logits: Optional[Tensor], name: str) -> Tensor:
    if logits is None:
        raise ValueError(f"{name}_entropy_weight > 0 needs {name}_logits")
    return logits


def head_usage_loss(head_select: Optional[Tensor], layer_select: Optional[Tensor] = None,
                    head_logits: Optional[Tensor] = None,
                    weights: UsageLossWeights = UsageLossWeights()) -> Tensor:
    """Unweighted L_head (official ``head_loss``). Head decisions count only in blocks where at least one branch
    runs (``layer_select.sum(-1) > 0``; all blocks when layer_select is None); the mask carries no gradient.

    |m - t| + diverse * mean_{l,h}|m_lh - t| - entropy * mean(H(sigmoid(logits))) + minimal_w * sum relu(min - m_lh)
    with m the masked mean over everything and m_lh the masked batch mean per (block, head).
    """
    if head_select is None:
        return _zero_like(layer_select, head_logits)
    w = weights
    if layer_select is not None:
        mask = (layer_select.sum(-1, keepdim=True) > 0).to(head_select.dtype).expand_as(head_select)
    else:
        mask = torch.ones_like(head_select)
    kept = head_select * mask
    loss = (kept.sum() / (mask.sum() + _HEAD_MEAN_EPS) - w.head_target_ratio).abs()
    if w.head_diverse_ratio > 0 or w.head_minimal_weight > 0:
        per_block_head = kept.sum(0) / (mask.sum(0) + _HEAD_MEAN_EPS)  # [Lh, H]
    if w.head_diverse_ratio > 0:
        loss = loss + w.head_diverse_ratio * (per_block_head - w.head_target_ratio).abs().mean()
    if w.head_entropy_weight > 0:
        entropy = _binary_entropy(_require_logits(head_logits, "head").sigmoid()).mean()
        loss = loss - w.head_entropy_weight * entropy
    if w.head_minimal_weight > 0:
        loss = loss + w.head_minimal_weight * (w.head_minimal - per_block_head).clamp(min=0).sum()
    return loss


def layer_usage_loss(layer_select: Optional[Tensor], layer_logits: Optional[Tensor] = None,
                     weights: UsageLossWeights = UsageLossWeights()) -> Tensor:
    """Unweighted L_layer (official ``layer_loss``):
    |mean - t| + diverse * mean_l|mean_{b,branch} - t| - entropy * mean(H(sigmoid(logits)))
    + minimal_w * sum_{l,branch} relu(min - mean_b)."""
    if layer_select is None:
        return _zero_like(layer_logits)
    w = weights
    loss = (layer_select.mean() - w.layer_target_ratio).abs()
    if w.layer_diverse_ratio > 0:
        loss = loss + w.layer_diverse_ratio * (layer_select.mean((0, -1)) - w.layer_target_ratio).abs().mean()
    if w.layer_entropy_weight > 0:
        entropy = _binary_entropy(_require_logits(layer_logits, "layer").sigmoid()).mean()
        loss = loss - w.layer_entropy_weight * entropy
    if w.layer_minimal_weight > 0:
        loss = loss + w.layer_minimal_weight * (w.layer_minimal - layer_select.mean(0)).clamp(min=0).sum()
    return loss


def token_usage_loss(token_select: Optional[Tensor], weights: UsageLossWeights = UsageLossWeights()) -> Tensor:
    """Unweighted L_token (official ``token_loss``): (mean - t)^2 -- squared, unlike the head and layer terms --
    + minimal_w * sum_{b,l} relu(min - mean_n), a sum over the batch (it grows with the batch size). The CLS
    column, always 1, is part of every mean."""
    if token_select is None:
        return _zero_like()
    w = weights
    loss = (token_select.mean() - w.token_target_ratio) ** 2
    if w.token_minimal_weight > 0:
        loss = loss + w.token_minimal_weight * (w.token_minimal - token_select.mean(-1)).clamp(min=0).sum()
    return loss


def usage_loss(head_select: Optional[Tensor], layer_select: Optional[Tensor], token_select: Optional[Tensor],
               head_logits: Optional[Tensor] = None, layer_logits: Optional[Tensor] = None,
               weights: UsageLossWeights = UsageLossWeights()) -> Dict[str, Tensor]:
    """The weighted AdaViT usage terms ``{"head": head_ratio * L_head, "layer": ..., "token": ...}``: the caller
    adds them to the task loss (the official total is task + head + layer + token, in that order) and logs each.
    Any decision may be None (zero term). Logits are needed only for entropy weights > 0."""
    like = next((t for t in (head_select, layer_select, token_select, head_logits, layer_logits) if t is not None),
                None)
    head = head_usage_loss(head_select, layer_select, head_logits, weights) if head_select is not None else None
    layer = layer_usage_loss(layer_select, layer_logits, weights) if layer_select is not None else None
    token = token_usage_loss(token_select, weights) if token_select is not None else None
    return {
        "head": weights.head_ratio * (_zero_like(like) if head is None else head),
        "layer": weights.layer_ratio * (_zero_like(like) if layer is None else layer),
        "token": weights.token_ratio * (_zero_like(like) if token is None else token),
    }


# ------------------------------------------------------------------------------------------------------- FLOPs

# ada_main.py:1058-1061: base_flops = 0.06 for every model whose name contains 'deit', else 0.33 (the T2T-ViT
# models; README's Ada-T2T-ViT-19 3.9 G is measured with it and the shipped t2t-19 table).
OFFICIAL_BASE_GFLOPS_DEIT = 0.06
OFFICIAL_BASE_GFLOPS_OTHER = 0.33
OFFICIAL_BASE_GFLOPS_T2T = OFFICIAL_BASE_GFLOPS_OTHER
# T2T-ViT's performer tokenizer at 224 px (official T2T_module 'performer'): (kernel, stride, padding) per soft split.
T2T_PERFORMER_SPLITS = ((7, 4, 2), (3, 2, 1), (3, 2, 1))

TOKEN_ROUNDINGS = ("float32", "float64", "exact")


def official_base_gflops(model_name: str) -> float:
    """The constant the official evaluation adds to the per-block sum for everything outside the blocks.

    ``ada_main.py`` hard-codes 0.06 when 'deit' is in the model name and 0.33 otherwise (the T2T-ViT models,
    whose T2T module is expensive). 0.06 is about DeiT-S's patch embedding (196*768*384 = 0.058 G) + final
    LayerNorm + head, but it is used for DeiT-T and DeiT-B as well. `exact_base_gflops` gives the real number.
    0.33 is about T2T-ViT-19's tokenizer + final LayerNorm + head (0.313 G by `exact_t2t_base_gflops`), also used
    for T2T-ViT-14 (0.306 G).
    """
    return OFFICIAL_BASE_GFLOPS_DEIT if "deit" in model_name.lower() else OFFICIAL_BASE_GFLOPS_OTHER


def exact_base_gflops(num_patches: int, patch_size: int, in_chans: int, embed_dim: int, num_classes: int) -> float:
    """GFLOPs outside the blocks of a DeiT-style AdaViT, as fvcore counts them: the patch-embedding conv, the final
    LayerNorm (5 flops per element, on all 1 + num_patches tokens) and the classifier on the CLS token (no bias)."""
    patch = num_patches * in_chans * patch_size * patch_size * embed_dim
    final_norm = 5 * (num_patches + 1) * embed_dim
    head = embed_dim * num_classes
    return (patch + final_norm + head) / 1e9


def exact_t2t_base_gflops(img_size: int = 224, embed_dim: int = 448, num_classes: int = 1000, token_dim: int = 64,
                          in_chans: int = 3, splits=T2T_PERFORMER_SPLITS, kernel_ratio: float = 0.5) -> float:
    """GFLOPs outside the blocks of an AdaViT on T2T-ViT (official `ada_step_t2t_vit_*_lnorm`), counted with the
    convention of the official tables (fvcore: one multiply-add = 1 flop, LayerNorm = 5 per element, elementwise
    ops free): the Tokens-to-Token tokenizer, the final LayerNorm on all tokens and the classifier on CLS.

    Per one-head Performer token transformer on T tokens of width d -> e (m = e * kernel_ratio random features):
    norm1 5*T*d, kqv T*d*3e, the random features of k and q 2*T*e*m, the normaliser T*m, k'^T v T*e*m, q'(k'^T v)
    T*m*e, proj T*e*e, norm2 5*T*e, MLP 2*T*e*e. Then the projection of the third soft split to embed_dim.

    T2T-ViT-19 at 224 (56^2 and 28^2 tokens in the performers, 14^2 after the last split, C 448):
    attention1 0.156145 + attention2 0.105294 + project 0.050577 = tokenizer 0.312016, final norm 0.000441, head
    0.000448: 0.312906 G. The official code adds 0.33 instead (`official_base_gflops`), 0.017 G more (0.2% of
    the dense 8.5 G; where it comes from is not in the released code, which has no count of its own). fvcore on
    the tokenizer agrees with this count to 1e-4 (its einsum counts go through numpy's rounded estimate)."""
    size, tokens = img_size, []
    for kernel, stride, padding in splits:
        size = (size + 2 * padding - kernel) // stride + 1
        tokens.append(size * size)
    flops = 0
    for t, d in ((tokens[0], in_chans * splits[0][0] ** 2), (tokens[1], token_dim * splits[1][0] ** 2)):
        e, m = token_dim, int(token_dim * kernel_ratio)
        flops += 5 * t * d + 3 * t * d * e + 4 * t * e * m + t * m + t * e * e + 5 * t * e + 2 * t * e * e
    flops += tokens[2] * token_dim * splits[2][0] ** 2 * embed_dim  # project
    flops += 5 * (tokens[2] + 1) * embed_dim + embed_dim * num_classes  # final norm, head
    return flops / 1e9


def official_token_counts(num_tokens: int, rounding: str = "float32", device=None) -> Tensor:
    """[N+1] int64: the token count the table charges for t = 0..N kept tokens.

    The shipped tables were counted with the token ratio t/N through float32, t' = int(float32(N) * float32(t/N)),
    which charges one token less for t in {13, 26, 51, 52, 53, 102, 104, 106, 117, 119, 121} at N = 197. The released
    counting code (Python floats) would do int(N * (t/N)) in float64 instead, one less for t in {1, 2, 4, 8, ...}
    ('float64'). 'exact' is t."""
    t = torch.arange(num_tokens + 1, dtype=torch.int64, device=device)
    if rounding == "exact":
        return t
    ratio = t.double() / num_tokens  # correctly rounded, as Python's t / N
    if rounding == "float32":
        return (ratio.float() * torch.tensor(num_tokens, dtype=torch.float32, device=device)).trunc().long()
    if rounding == "float64":
        return (ratio * num_tokens).trunc().long()
    raise ValueError(f"token rounding must be one of {TOKEN_ROUNDINGS}, got {rounding!r}")


def official_flops_table(num_heads: int, num_tokens: int, embed_dim: int, mlp_ratio: float, *,
                         token_rounding: str = "float32", dtype: torch.dtype = torch.float32,
                         device=None) -> Tensor:
    """The official per-block GFLOPs table ``[kept_heads 0..H, kept_tokens 0..N, attn_on, mlp_on]``, shape
    (H+1, N+1, 2, 2); num_tokens N counts CLS. With the defaults it equals the shipped
    ``deit-s-h-l-tmlp_flops_dict.pth`` (H 6, N 197, C 384, mlp 4) and ``t2t-19-h-l-tmlp_flops_dict.pth`` bit for bit
    (float32, as shipped). The released generator cannot produce them (its count is commented out), so this is
    the closed form that does, with fvcore's conventions (one multiply-add = 1 flop, LayerNorm = 5 per element):

        w = C*h/H (kept-head channels), t' = counted tokens (see `official_token_counts`), hid = mlp_ratio*C,
        LN = 5*N*C
        attn = LN + 3*t'*C*w + 2*t'^2*w + t'*w^2        norm1, q/k/v, QK^T and AV, proj
        mlp  = t'*w*hid + t'*hid*C                      fc1 (restricted to the w kept input channels), fc2
        table[h, t, a, m] = (a*attn + LN + m*mlp) / 1e9 for h >= 1 and t >= 1; 0 where h = 0 or t = 0

    Quirks of the official accounting, kept on purpose so that numbers compare with the paper's:
    * proj is counted as w x w instead of w x C (its output has all C channels): an undercount.
    * A block with zero kept heads costs 0, although its MLP does run in the official forward (on an input whose
      channels are all masked; the biases still act).
    * Both LayerNorms are counted on all N tokens, whatever t is; norm2 is charged even with the MLP off, so a
      block with both branches off still costs 5*N*C when h >= 1.
    * t' comes from the float32 ratio t/N (token_rounding 'float32', the shipped tables); 'float64' is what the
      released Python-float code would give, 'exact' uses t.
    * The base (patch embedding, final norm, head) is not in the table: see `official_base_gflops`.
    """
    if num_heads < 1 or num_tokens < 1 or embed_dim % num_heads:
        raise ValueError(f"need num_heads >= 1, num_tokens >= 1 and embed_dim divisible by num_heads, got "
                         f"H={num_heads}, N={num_tokens}, C={embed_dim}")
    C, N = embed_dim, num_tokens
    hid = int(C * mlp_ratio)  # timm's Mlp hidden width
    width = torch.arange(num_heads + 1, dtype=torch.int64, device=device) * (C // num_heads)  # w per h, [H+1]
    tokens = official_token_counts(N, token_rounding, device=device)  # t' per t, [N+1]
    w, t = width[:, None], tokens[None, :]  # [H+1, 1], [1, N+1]
    norm = 5 * N * C
    attn = norm + 3 * t * C * w + 2 * t * t * w + t * w * w  # exact int64 counts, [H+1, N+1]
    mlp = t * w * hid + t * hid * C
    on = torch.tensor([0, 1], dtype=torch.int64, device=device)
    a, m = on[:, None], on[None, :]  # [2, 1], [1, 2]
    flops = a * attn[..., None, None] + norm + m * mlp[..., None, None]  # [H+1, N+1, 2, 2]
    flops[0] = 0
    flops[:, 0] = 0
    return (flops.double() / 1e9).to(dtype)


def _per_block_index(select: Optional[Tensor], depth: int, full: int, batch: int, device, name: str,
                     expected_blocks: Optional[int], trailing: tuple = ()) -> Tensor:
    """[B, depth, *trailing] int64 table index per block: `full` for the leading blocks without a decision, as the
    official ``select_flops`` pads them (the decided blocks are the last ones), else the decided value."""
    if select is None:
        return torch.full((batch, depth) + trailing, full, dtype=torch.int64, device=device)
    decided = select.shape[1]
    if decided > depth or (expected_blocks is not None and decided != expected_blocks):
        expected = f"<= {depth}" if expected_blocks is None else expected_blocks
        raise ValueError(f"{name} decides {decided} blocks; expected {expected}")
    # `.int()` in the official code: truncation toward zero (exact for hard 0/1 decisions).
    values = select.trunc().long() if select.is_floating_point() else select.long()
    pad = torch.full((batch, depth - decided) + tuple(values.shape[2:]), full, dtype=torch.int64, device=device)
    return torch.cat([pad, values], dim=1)


def official_gflops(table: Tensor, head_select: Optional[Tensor], layer_select: Optional[Tensor],
                    token_select: Optional[Tensor], *, depth: int, base: float,
                    keep_layers: Optional[int] = None, token_start_layer: Optional[int] = None,
                    batch_size: Optional[int] = None) -> Tensor:
    """Per-sample GFLOPs [B] as the official ``batch_select_flops`` computes them:
    ``base + sum_i table[heads_i, tokens_i, attn_i, mlp_i]`` with heads_i = head_select.sum(-1) (kept heads),
    tokens_i = token_select.sum(-1) (kept tokens, CLS included), attn_i/mlp_i = layer_select. Blocks without a
    decision count full heads H, all N tokens and both branches on; as officially, the decided blocks are the last
    ones (blocks i >= keep_layers, i >= token_start_layer), which is checked when those are given. Counts are
    truncated to integers (official ``.int()``).

    The sum runs block by block from `base` in the table's dtype, like the official Python loop over float32
    table entries, so a shipped float32 table gives the official numbers exactly; pass a float64 table to
    accumulate in float64. Decisions may be hard 0/1 in any float dtype, on any device (the table is moved there).
    """
    given = [s for s in (head_select, layer_select, token_select) if s is not None]
    if given:
        batch, device = given[0].shape[0], given[0].device
    elif batch_size is not None:
        batch, device = batch_size, table.device
    else:
        raise ValueError("official_gflops needs a decision tensor or batch_size")
    heads, tokens = table.shape[0] - 1, table.shape[1] - 1
    if head_select is not None and head_select.shape[-1] != heads:
        raise ValueError(f"head_select has {head_select.shape[-1]} heads, the table {heads}")
    if token_select is not None and token_select.shape[-1] != tokens:
        raise ValueError(f"token_select has {token_select.shape[-1]} tokens, the table {tokens}")
    expect_hl = None if keep_layers is None else depth - keep_layers
    expect_t = None if token_start_layer is None else depth - token_start_layer
    h = _per_block_index(None if head_select is None else head_select.sum(-1), depth, heads, batch, device,
                         "head_select", expect_hl)
    t = _per_block_index(None if token_select is None else token_select.sum(-1), depth, tokens, batch, device,
                         "token_select", expect_t)
    l = _per_block_index(layer_select, depth, 1, batch, device, "layer_select", expect_hl, trailing=(2,))
    per_block = table.to(device)[h, t, l[..., 0], l[..., 1]]  # [B, depth]
    total = torch.full((batch,), base, dtype=table.dtype, device=device)
    for i in range(depth):
        total = total + per_block[:, i]
    return total
