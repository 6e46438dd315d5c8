"""Optimizer with the DeiT parameter groups: no weight decay on norms, biases, pos_embed and cls_token."""

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float, zero_wd_1d: bool):
    skip = set(getattr(model, "no_weight_decay", lambda: ())())
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name in skip or (zero_wd_1d and (p.ndim <= 1 or name.endswith(".bias"))):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, solver) -> torch.optim.Optimizer:
    """SOLVER.OPTIMIZING_METHOD over `model` (unwrapped); the LR is set every iteration by the engine."""
    groups = param_groups(model, solver.WEIGHT_DECAY, solver.ZERO_WD_1D_PARAM)
    if solver.OPTIMIZING_METHOD == "sgd":
        return torch.optim.SGD(groups, lr=solver.BASE_LR, momentum=solver.MOMENTUM, nesterov=solver.NESTEROV)
    return torch.optim.AdamW(groups, lr=solver.BASE_LR, betas=tuple(solver.BETAS))
