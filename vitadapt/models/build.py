"""Model registry: configs name a registered class by MODEL.NAME; each class builds itself from cfg."""

from fvcore.common.registry import Registry
from torch import nn

MODEL_REGISTRY = Registry("MODEL")
MODEL_REGISTRY.__doc__ = "Models, keyed by class name; each has a `from_config(cfg)` classmethod."


def build_model(cfg) -> nn.Module:
    """The model named by MODEL.NAME, on the CPU, in train mode. Device placement and DDP are the engine's."""
    from .vit import Attention

    model = MODEL_REGISTRY.get(cfg.MODEL.NAME).from_config(cfg)
    for module in model.modules():
        if isinstance(module, Attention):
            module.fused, module.varlen = cfg.VIT.FUSED_ATTENTION, cfg.VIT.VARLEN_ATTENTION
    return model


def input_shape(cfg, batch: int = 1) -> tuple:
    """The shape of a test batch for MODEL.NAME: images [B, C, H, W], or clips [B, C, T, H, W] for a video model
    (its class sets `takes_video`), at DATA.TEST_CROP_SIZE and DATA.NUM_FRAMES."""
    size = cfg.DATA.TEST_CROP_SIZE
    if getattr(MODEL_REGISTRY.get(cfg.MODEL.NAME), "takes_video", False):
        return (batch, cfg.VIT.IN_CHANS, cfg.DATA.NUM_FRAMES, size, size)
    return (batch, cfg.VIT.IN_CHANS, size, size)
