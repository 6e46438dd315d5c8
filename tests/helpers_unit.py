"""Small shared helpers of the unit tests (test_config, test_models, test_checkpoint)."""

import contextlib
from pathlib import Path
from typing import Dict, Mapping

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
CONFIG_FILES = sorted((REPO / "configs").rglob("*.yaml"))

# A ViT small enough that every unit test stays well under a second.
TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=48, depth=2, num_heads=3)
NUM_TOKENS = (32 // 8) ** 2 + 1  # patches + CLS

# The same model through the config system.
TINY_OPTS = ["MODEL.NUM_CLASSES", "10", "VIT.PATCH_SIZE", "8", "VIT.EMBED_DIM", "48", "VIT.DEPTH", "2",
             "VIT.NUM_HEADS", "3", "DATA.TRAIN_CROP_SIZE", "32", "DATA.TEST_CROP_SIZE", "32"]


def tiny_vit(seed: int = 0, **overrides):
    from vitadapt.models import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(**{**TINY, **overrides})


def tiny_cfg(*opts):
    from vitadapt.config import load_config

    return load_config("", TINY_OPTS + list(opts))


def clone_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_state_equal(actual: Mapping[str, torch.Tensor], expected: Mapping[str, torch.Tensor], skip=()) -> None:
    assert set(actual) == set(expected)
    for key in expected:
        if key in skip:
            continue
        assert torch.equal(actual[key], expected[key]), f"{key} differs"


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


@contextlib.contextmanager
def raises_naming(*needles, one_line: bool = False):
    """pytest.raises(ConfigError) whose message contains every needle (and, with one_line, no line break)."""
    from vitadapt.config import ConfigError

    with pytest.raises(ConfigError) as info:
        yield info
    message = str(info.value)
    assert not one_line or "\n" not in message, message
    for needle in needles:
        assert needle in message, f"{needle!r} not in error message {message!r}"
