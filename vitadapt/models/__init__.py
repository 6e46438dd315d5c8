from .build import MODEL_REGISTRY, build_model, input_shape
from .tokens import TokenAdapter, TokenBatch
from .vit import VisionTransformer
from .ats import ATSVisionTransformer  # noqa: E402  (registers the model and the ATS config node)
from .evit import EViTVisionTransformer  # noqa: E402  (registers the model and the EVIT config node)
from .avit import AViTVisionTransformer  # noqa: E402  (registers the model and the AVIT config node)
from .adavit import AdaViTVisionTransformer  # noqa: E402  (registers the model and the ADAVIT config node)
from .t2t import T2TViT  # noqa: E402  (registers the model and the T2T config node)
from .dvt import DVT  # noqa: E402  (registers the model and the DVT config node)
from .video import TimeSformer, XViT  # noqa: E402  (registers the models and the TIMESFORMER / XVIT nodes)

__all__ = ["MODEL_REGISTRY", "build_model", "input_shape", "TokenAdapter", "TokenBatch", "VisionTransformer",
           "ATSVisionTransformer", "EViTVisionTransformer",
           "AViTVisionTransformer", "AdaViTVisionTransformer", "T2TViT", "DVT",
           "TimeSformer", "XViT"]
