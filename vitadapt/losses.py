"""Task losses by name (MODEL.LOSS_FUNC). Methods register their auxiliary losses here too."""

import torch.nn.functional as F
from fvcore.common.registry import Registry
from torch import Tensor, nn

LOSS_REGISTRY = Registry("LOSS")
LOSS_REGISTRY.__doc__ = "Losses, keyed by name; each is built as Cls(cfg) and called as loss(logits, targets)."


@LOSS_REGISTRY.register()
class cross_entropy(nn.Module):  # noqa: N801  (configs spell loss names in snake case, as PySlowFast does)
    """Cross-entropy for class indices (with TRAIN.LABEL_SMOOTHING) or for soft targets (mixup/cutmix)."""

    def __init__(self, cfg):
        super().__init__()
        self.smoothing = cfg.TRAIN.LABEL_SMOOTHING

    def forward(self, logits: Tensor, targets: Tensor) -> Tensor:
        if targets.dtype.is_floating_point:  # mixup already smoothed its soft targets
            return F.cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets, label_smoothing=self.smoothing)


def build_loss(cfg) -> nn.Module:
    return LOSS_REGISTRY.get(cfg.MODEL.LOSS_FUNC)(cfg)
