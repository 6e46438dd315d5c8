"""Synthetic weights with peaked attention, for measuring adaptive-token savings without a trained checkpoint.

With the usual ViT initialisation every attention row is nearly uniform, so a token-sampling method keeps
almost every token and its savings cannot be seen. `sharpen_` re-draws every parameter so that the CLS
attention concentrates on a few tokens, the way a trained model's does (the recipe of the ATS goldens:
fan-in scaled linear weights, a gain on the query/key rows, large cls/pos embeddings, LayerNorm weights
near 1). The model is then no classifier; it is a workload.
"""

import torch
from torch import nn


@torch.no_grad()
def sharpen_(model: nn.Module, seed: int = 1, qk_gain: float = 1.25, token_std: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std)

    for name, p in model.named_parameters():
        if name in ("cls_token", "pos_embed"):
            normal(p, token_std)
        elif p.ndim >= 2:  # linear and patch-embedding weights: unit-variance outputs
            normal(p, p[0].numel() ** -0.5)
            if name.endswith("attn.qkv.weight"):
                p[: 2 * p.shape[1]] *= qk_gain  # sharper q.k logits
        elif name.endswith((".norm1.weight", ".norm2.weight", "norm.weight")):
            p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
        else:
            normal(p, 0.02)
    return model


@torch.no_grad()
def add_halting_drift_(model: nn.Module, drift: float = 0.85, spread: float = 5.0) -> nn.Module:
    """Makes A-ViT tokens halt at different depths, as with trained weights (the A-ViT goldens' recipe).

    A-ViT halts on channel 0 of the residual stream, which random weights leave near 0. Every MLP adds `drift`
    to it, and the patch embedding's channel 0 is scaled by `spread`, so tokens start apart. On `sharpen_`
    weights at DeiT-S size with gate 10 / 75 (A-ViT-S) the mean depth is about 8 of 12, as the official
    A-ViT-S reaches. A dense model with these weights is the same workload without halting."""
    model.patch_embed.proj.weight[0] *= spread
    if model.patch_embed.proj.bias is not None:
        model.patch_embed.proj.bias[0] *= spread
    for block in model.blocks:
        block.mlp.fc2.bias[0] += drift
    return model
