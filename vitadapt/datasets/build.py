"""Data set registry: TRAIN.DATASET / TEST.DATASET name a registered class (lower-case key)."""

from fvcore.common.registry import Registry

DATASET_REGISTRY = Registry("DATASET")
DATASET_REGISTRY.__doc__ = ("Data sets, keyed by name; each is constructed as Cls(cfg, split) and returns "
                            "(image tensor, label) items, or None for an image that cannot be decoded.")


def register_dataset(name: str):
    """Registers a class under a lower-case name, as configs spell it ("imagenet", "digits")."""

    def deco(cls):
        DATASET_REGISTRY._do_register(name, cls)
        return cls

    return deco


def build_dataset(name: str, cfg, split: str):
    return DATASET_REGISTRY.get(name)(cfg, split)
