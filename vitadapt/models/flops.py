"""Multiply-accumulates per image: analytic, from the tokens each block actually saw, and by fvcore.

The analytic count is what adaptive methods report per image (an image that keeps fewer tokens costs
fewer MACs); fvcore traces the real graph and serves as its check. Both count one multiply-add as one
"flop", the convention of fvcore and of the DeiT/ATS/EViT papers' GFLOPs.

Convention of the analytic counts: every matrix product that runs (linear layers, attention, the patch
embedding, a method's decision heads and side products such as the CLS attention row), nothing else:
LayerNorm, softmax, GELU and elementwise operations are left out. fvcore adds LayerNorm at 5 per normalised
element (about 0.2% of DeiT-S: 4.608 against 4.599 GMACs); `fvcore_macs(..., layer_norms=False)` leaves it
out and then equals the analytic count of one image exactly (tests/test_flops_convention.py).
"""

import warnings
from typing import Any, List

import torch
from torch import Tensor, nn

with warnings.catch_warnings():
    # fvcore.nn imports its focal loss, which calls torch.jit.script at import time: a FutureWarning on every
    # run that is about fvcore's code, not ours.
    warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis
    from fvcore.nn.jit_handles import bmm_flop_jit


# Matrix products fvcore's default handles may lack (aten::mm, addmm, bmm, matmul, linear, einsum and
# _convolution it counts; baddbmm and scaled_dot_product_attention get handles in fvcore_macs).
UNCOUNTED_PRODUCTS = {"aten::" + name for name in (
    "addbmm", "addmv", "mv", "dot", "vdot", "outer", "ger", "inner", "tensordot", "kron", "linalg_multi_dot",
    "chain_matmul", "bilinear", "baddbmm", "convolution", "conv1d", "conv2d", "conv3d", "conv_transpose1d",
    "conv_transpose2d", "conv_transpose3d")}


def block_macs(n_attn: Tensor, n_mlp: Tensor, dim: int, mlp_hidden: int) -> Tensor:
    """One block: qkv and proj on n_attn tokens, QK^T and AV over n_attn x n_attn, the MLP on n_mlp."""
    n_attn, n_mlp = n_attn.double(), n_mlp.double()
    return 4 * n_attn * dim * dim + 2 * n_attn * n_attn * dim + 2 * n_mlp * dim * mlp_hidden


def vit_macs(model: nn.Module, token_counts: Tensor) -> Tensor:
    """[B] MACs per image of a VisionTransformer from `token_counts` [B, depth, 2] (model.last_token_counts)."""
    dim = model.embed_dim
    mlp_hidden = model.blocks[0].mlp.fc1.out_features
    proj = model.patch_embed.proj
    num_patches = token_counts[:, 0, 0] - 1  # every patch enters the first block, plus CLS
    patch_macs = num_patches.double() * proj.in_channels * proj.kernel_size[0] * proj.kernel_size[1] * dim
    blocks = block_macs(token_counts[..., 0], token_counts[..., 1], dim, mlp_hidden).sum(dim=1)
    # A method reading the CLS attention row (ATS, EViT) where attention hid it computed it on the side: q_cls K^T,
    # N MACs per channel (where attention ran explicitly the row was read from its matrix: nothing extra).
    side = [i for i, block in enumerate(model.blocks) if getattr(block.attn, "cls_row_on_side", False)]
    if side:
        blocks = blocks + token_counts[:, side, 0].double().sum(dim=1) * dim
    head = dim * model.num_classes if model.num_classes > 0 else 0
    return patch_macs + blocks + head


def _sdpa_macs(inputs: List[Any], outputs: List[Any]) -> int:
    # q [.., N, D], k [.., M, D], v [.., M, Dv]: QK^T costs N*M*D, AV costs N*M*Dv.
    q, k, v = (i.type().sizes() for i in inputs[:3])
    batch = 1
    for s in q[:-2]:
        batch *= s
    return batch * q[-2] * k[-2] * (q[-1] + v[-1])


def fvcore_macs(model: nn.Module, images: Tensor, layer_norms: bool = True) -> float:
    """Total MACs fvcore traces for `images` (with fused attention counted), divided by the batch size.

    layer_norms: count LayerNorm as fvcore does, 5 per normalised element (its default, the convention of the
    published fvcore numbers); False counts the matrix products only, the convention of the analytic per-image
    counts (`macs_per_image`), which then equal this count on one image exactly."""
    analysis = FlopCountAnalysis(model, images)
    analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_macs)
    # beta * input + alpha * batch1 @ batch2 (attention logits with the scale applied by the product): the bmm.
    analysis.set_op_handle("aten::baddbmm", lambda inputs, outputs: bmm_flop_jit(inputs[1:3], outputs))
    if not layer_norms:  # a handle of None only silences the warning: the op must count 0
        analysis.set_op_handle("aten::layer_norm", lambda inputs, outputs: 0)
    analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    with torch.no_grad():
        total = analysis.total()
    # fvcore counts an operator it has no handle for as 0: a matrix product among them would make the count wrong.
    products = sorted(op for op in analysis.unsupported_ops() if op in UNCOUNTED_PRODUCTS or op.endswith("attention"))
    if products:
        raise RuntimeError(f"fvcore has no count for {', '.join(products)}; add a handle in vitadapt.models.flops")
    return total / images.shape[0]
