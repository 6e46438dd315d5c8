"""Model registry: configs name a registered class by MODEL.NAME; each class builds itself from cfg."""

from fvcore.common.registry import Registry
from torch import nn

MODEL_REGISTRY = Registry("MODEL")
MODEL_REGISTRY.__doc__ = "Models, keyed by class name; each has a `from_config(cfg)` classmethod."


def build_model(cfg) -> nn.Module:
    """The model named by MODEL.NAME, on the CPU, in train mode. Device placement and DDP are the engine's."""
    return MODEL_REGISTRY.get(cfg.MODEL.NAME).from_config(cfg)
