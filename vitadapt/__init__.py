"""vitadapt: adaptive-token Vision Transformers on one backbone."""

__version__ = "0.1.0"
