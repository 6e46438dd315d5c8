"""vitadapt: adaptive-token Vision Transformers on one backbone."""

from .api import adapt, cost, create_model, list_models

__version__ = "0.1.0"
__all__ = ["adapt", "cost", "create_model", "list_models"]
