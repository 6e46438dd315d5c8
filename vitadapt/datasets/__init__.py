from . import digits, imagenet, kinetics  # noqa: F401  (register the data sets)
from .build import DATASET_REGISTRY, build_dataset, register_dataset
from .imagenet import DataError
from .loader import construct_loader

__all__ = ["DATASET_REGISTRY", "build_dataset", "register_dataset", "construct_loader", "DataError"]
