"""Learning rate as a pure function of the fractional epoch: resume needs no scheduler state."""

import math


def base_lr(cfg) -> float:
    """SOLVER.BASE_LR, scaled linearly by TRAIN.BATCH_SIZE / SOLVER.LR_SCALE_REF_BATCH when that is set (DeiT)."""
    ref = cfg.SOLVER.LR_SCALE_REF_BATCH
    return cfg.SOLVER.BASE_LR * (cfg.TRAIN.BATCH_SIZE / ref if ref > 0 else 1.0)


def lr_at_epoch(cfg, epoch: float) -> float:
    """The SOLVER.LR_POLICY value at `epoch` (fractional: set every iteration), after a linear warm-up."""
    solver = cfg.SOLVER
    if epoch < solver.WARMUP_EPOCHS:
        end = _policy(cfg, solver.WARMUP_EPOCHS)
        return solver.WARMUP_START_LR + (end - solver.WARMUP_START_LR) * epoch / solver.WARMUP_EPOCHS
    return _policy(cfg, epoch)


def _policy(cfg, epoch: float) -> float:
    solver, base = cfg.SOLVER, base_lr(cfg)
    if solver.LR_POLICY == "constant":
        return base
    if solver.LR_POLICY == "steps_with_relative_lrs":
        index = max(i for i, start in enumerate(solver.STEPS) if start <= epoch)
        return base * solver.LRS[index]
    offset = solver.WARMUP_EPOCHS if solver.COSINE_AFTER_WARMUP else 0.0
    progress = (epoch - offset) / max(solver.MAX_EPOCH - offset, 1e-8)
    return solver.COSINE_END_LR + (base - solver.COSINE_END_LR) * (math.cos(math.pi * progress) + 1) / 2
