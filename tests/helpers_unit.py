"""Small shared helpers of the unit tests (test_config, test_models, test_checkpoint)."""

import contextlib
from pathlib import Path
from typing import Dict, Mapping

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# Every run config (configs/model_zoo.yaml, the model zoo manifest, and configs/compare/, the plans of
# tools/compare_methods.py, are lists of runs: tests/test_model_zoo.py, tests/test_compare_methods.py).
RUN_CONFIG_FOLDERS = ("ImageNet", "Kinetics", "demo")
CONFIG_FILES = sorted(p for folder in RUN_CONFIG_FOLDERS for p in (REPO / "configs" / folder).rglob("*.yaml"))

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


def max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def random_images(batch: int, size: int, seed: int = 0):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def official_eval_model(to_config_opts, config, sd, execution="packed", extra=()):
    """vitadapt's model for a golden `config` holding the official-layout `sd`, built as vitadapt.parity does
    (`to_config_opts`: the method's official_to_config_opts)."""
    from vitadapt.parity import _official_model

    return _official_model(to_config_opts(config), sd, execution, list(extra))


def write_goldens(root, make_golden, settings: dict) -> dict:
    """{name: (golden, path)} for every setting: make_golden(**kwargs) saved as root/golden_<name>.pt."""
    out = {}
    for name, kwargs in settings.items():
        golden = make_golden(**kwargs)
        path = root / f"golden_{name}.pt"
        torch.save(golden, path)
        out[name] = (golden, path)
    return out
