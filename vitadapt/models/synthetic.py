"""Synthetic weights with peaked attention, for measuring adaptive-token savings without a trained checkpoint.

With the usual ViT initialisation every attention row is nearly uniform, so a token-sampling method keeps
almost every token and its savings cannot be seen. `sharpen_` re-draws every parameter so that the CLS
attention concentrates on a few tokens, the way a trained model's does (the recipe of the ATS goldens:
fan-in scaled linear weights, a gain on the query/key rows, large cls/pos embeddings, LayerNorm weights
near 1). The model is then no classifier; it is a workload.
"""

import math

import torch
from torch import nn


@torch.no_grad()
def sharpen_(model: nn.Module, seed: int = 1, qk_gain: float = 1.25, token_std: float = 0.5) -> nn.Module:
    g = torch.Generator().manual_seed(seed)

    def normal(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g) * std)

    for name, p in model.named_parameters():
        # Embeddings also under a prefix (XViT's base_model., its head's consensus.cls_token) and the video ones.
        if name.rsplit(".", 1)[-1] in ("cls_token", "pos_embed", "time_embed", "temp_embed"):
            normal(p, token_std)
        elif p.ndim >= 2:  # linear and patch-embedding weights: unit-variance outputs
            normal(p, p[0].numel() ** -0.5)
            if name.endswith("attn.qkv.weight"):
                p[: 2 * p.shape[1]] *= qk_gain  # sharper q.k logits
        elif name.endswith((".norm1.weight", ".norm2.weight", "norm.weight", "mlp_head.0.weight")):
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
    A-ViT-S reaches. A dense model with these weights is the same workload without halting. A video model with a
    per-frame backbone (XViT) gets it on that backbone."""
    model = getattr(model, "base_model", model)
    model.patch_embed.proj.weight[0] *= spread
    if model.patch_embed.proj.bias is not None:
        model.patch_embed.proj.bias[0] *= spread
    for block in model.blocks:
        block.mlp.fc2.bias[0] += drift
    return model


@torch.no_grad()
def calibrate_decisions_(model: nn.Module, images: torch.Tensor, usage=0.75, spread: float = 2.0) -> nn.Module:
    """AdaViT decisions that differ between images and tokens on synthetic weights (after `sharpen_`).

    Untrained decision logits hardly depend on the image: the CLS token that head and layer decisions read is
    nearly the same for every image. Like the AdaViT goldens' perturbation (decision-head weights x15-20 and
    biases) this rescales each decision head, but measured on `images`: one forward, in which every decision head,
    just before it runs (so after the blocks before it are calibrated), gets each output's weights scaled so that
    its logits spread with standard deviation `spread` over the images (over all patch tokens for token decisions)
    and a bias under which the share `usage` of them (a number, or {"tokens", "heads", "layer": share}) pass the
    decision threshold. Needs 2 images or more. A model without decision heads is left as it is; a video model's
    (AdaViT on XViT) are those of its per-frame backbone, calibrated through the video model's forward."""
    # The module that holds the decision heads: the model, or its per-frame backbone.
    deciding = next((m for m in model.modules() if hasattr(m, "decision_heads")), None)
    if deciding is None:
        return model
    shares = usage if isinstance(usage, dict) else {kind: usage for kind in deciding.thresholds}
    threshold = {kind: math.log(t / (1 - t)) for kind, t in deciding.thresholds.items()}

    def calibrate(kind):
        @torch.no_grad()
        def hook(module, inputs):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            logits = x @ module.weight.t()  # [R, outputs], no bias
            scale = spread / logits.std(dim=0).clamp_min(1e-12)
            cut = torch.quantile(logits.double() * scale.double(), 1 - shares[kind], dim=0).to(logits.dtype)
            module.weight.mul_(scale[:, None])
            module.bias.copy_(threshold[kind] - cut + 1e-4)  # just above the cut: no decision sits on a threshold
        return hook

    handles = [head.mlp_head.register_forward_pre_hook(calibrate(kind)) for kind, head in deciding.decision_heads()]
    was_training = model.training
    try:
        model.eval()(images)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return model
