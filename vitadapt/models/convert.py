"""Official checkpoint layouts -> the state_dict of a vitadapt model.

A checkpoint file may hold the weights at the top level (timm), under "model" (DeiT, EViT, A-ViT),
"state_dict_ema" / "state_dict", or "model_state" (vitadapt, PySlowFast), with or without DDP's
"module." prefix. Nothing is dropped silently: every key that does not fit is reported, and a load
that would leave the model partly random fails unless the only difference is a classifier the
caller asked to re-initialise.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from vitadapt.errors import VitadaptError

WEIGHT_CONTAINERS = ("model_state", "model", "state_dict", "state_dict_ema", "model_ema")
HEAD_KEYS = ("head.weight", "head.bias")


class CheckpointMismatchError(VitadaptError, RuntimeError):
    """The checkpoint's weights do not fit the model."""


@dataclass
class LoadReport:
    source: str = ""
    container: str = ""
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    head_reset: bool = False

    def lines(self) -> List[str]:
        out = [f"loaded {self.source} ({self.container})"]
        if self.resized:
            out.append("  interpolated to the model's size: " + ", ".join(self.resized))
        if self.head_reset:
            out.append("  classifier re-initialised: the checkpoint has a different number of classes")
        if self.missing:
            out.append("  missing keys (left at their initial values): " + ", ".join(self.missing))
        if self.unexpected:
            out.append("  unexpected keys (ignored): " + ", ".join(self.unexpected))
        return out


def extract_state_dict(obj, source: str = "checkpoint") -> Tuple[Dict[str, Tensor], str]:
    """The model weights inside a loaded checkpoint object, and where they were found."""
    if isinstance(obj, Mapping):
        for key in WEIGHT_CONTAINERS:
            if isinstance(obj.get(key), Mapping):
                sd, where = dict(obj[key]), f"'{key}'"
                break
        else:
            sd, where = dict(obj), "top level"
        tensors = {k: v for k, v in sd.items() if isinstance(v, Tensor)}
        if tensors:
            if any(k.startswith("module.") for k in tensors):
                tensors = {k[len("module."):] if k.startswith("module.") else k: v for k, v in tensors.items()}
            return tensors, where
    keys = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
    raise CheckpointMismatchError(f"{source}: no model weights found (top-level keys: {keys}); expected a state "
                                  f"dict or one under {', '.join(WEIGHT_CONTAINERS)}")


def adapt_vit_state_dict(model: nn.Module, sd: Dict[str, Tensor], report: LoadReport) -> Dict[str, Tensor]:
    """Resamples pos_embed to the model's patch grid (checkpoints trained at another resolution)."""
    target = model.state_dict()
    pos = sd.get("pos_embed")
    if pos is not None and "pos_embed" in target and pos.shape != target["pos_embed"].shape:
        old = int(round((pos.shape[1] - 1) ** 0.5))
        if old * old + 1 == pos.shape[1] and pos.shape[2] == target["pos_embed"].shape[2]:
            sd = dict(sd)
            sd["pos_embed"] = resample_abs_pos_embed(pos, list(model.patch_grid), [old, old], num_prefix_tokens=1)
            report.resized.append(f"pos_embed {tuple(pos.shape)} -> {tuple(target['pos_embed'].shape)}")
    return sd


def load_into_model(model: nn.Module, sd: Dict[str, Tensor], report: LoadReport,
                    reset_head_on_mismatch: bool = False) -> LoadReport:
    """Loads `sd` strictly, except for a classifier of another size when `reset_head_on_mismatch`."""
    sd = adapt_vit_state_dict(model, sd, report)
    target = model.state_dict()
    bad = [k for k, v in sd.items() if k in target and v.shape != target[k].shape]
    if bad and reset_head_on_mismatch and set(bad) <= set(HEAD_KEYS):
        sd = {k: v for k, v in sd.items() if k not in HEAD_KEYS}
        report.head_reset = True
        bad = []
    if bad:
        shapes = "; ".join(f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}" for k in bad)
        raise CheckpointMismatchError(f"{report.source}: shapes do not match the model: {shapes}")
    result = model.load_state_dict(sd, strict=False)
    missing = [k for k in result.missing_keys if not (report.head_reset and k in HEAD_KEYS)]
    report.missing, report.unexpected = missing, list(result.unexpected_keys)
    if missing or report.unexpected:
        raise CheckpointMismatchError("\n".join(report.lines()) + "\nthe checkpoint does not match the model "
                                      "(is MODEL.NAME / VIT.* the architecture it was trained with?)")
    return report
