from .build import MODEL_REGISTRY, build_model
from .tokens import TokenAdapter, TokenBatch
from .vit import VisionTransformer

__all__ = ["MODEL_REGISTRY", "build_model", "TokenAdapter", "TokenBatch", "VisionTransformer"]
