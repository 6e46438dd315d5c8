"""Official checkpoint layouts -> the state_dict of a vitadapt model.

A checkpoint file may hold the weights at the top level (timm), under "model" (DeiT, EViT, A-ViT),
"state_dict_ema" / "state_dict" (timm's train.py, AdaViT), "model_state_dict" (DVT) or "model_state"
(vitadapt, PySlowFast), with or without DDP's "module." / torch.compile's "_orig_mod." prefix. A model
whose official files differ from its state_dict converts them in `adapt_official_state_dict` (ATS).
Nothing is dropped silently: every key that does not fit is reported, and a load that would leave the
model partly random fails, loading nothing, unless the only difference is a classifier the caller
asked to re-initialise.
"""

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Tuple

from timm.layers import resample_abs_pos_embed
from torch import Tensor, nn

from vitadapt.errors import VitadaptError

WEIGHT_CONTAINERS = ("model_state", "model", "state_dict", "model_state_dict", "state_dict_ema", "model_ema")
HEAD_KEYS = ("head.weight", "head.bias")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class CheckpointMismatchError(VitadaptError, RuntimeError):
    """The checkpoint's weights do not fit the model."""


@dataclass
class LoadReport:
    source: str = ""
    container: str = ""
    missing: List[str] = field(default_factory=list)
    unexpected: List[str] = field(default_factory=list)
    resized: List[str] = field(default_factory=list)
    converted: List[str] = field(default_factory=list)  # what a model's adapt_official_state_dict changed
    notes: List[str] = field(default_factory=list)  # what the file says about itself (method, epoch)
    head_reset: bool = False
    # Set by load_into_model: the weights initialise a model that will be trained (fine-tuning), so a model may
    # start the parts a file does not have (AdaViT's decision heads in a DeiT file) from its own initialisation.
    fine_tuning: bool = False

    def lines(self) -> List[str]:
        out = [f"loaded {self.source} ({self.container})"]
        out += ["  " + note for note in self.notes]
        if self.converted:
            out.append("  converted from the official layout: " + "; ".join(self.converted))
        if self.resized:
            out.append("  interpolated to the model's size: " + ", ".join(self.resized))
        if self.head_reset:
            out.append("  classifier re-initialised: the checkpoint has a different number of classes")
        if self.missing:
            out.append("  missing keys (not in the checkpoint): " + ", ".join(self.missing))
        if self.unexpected:
            out.append("  unexpected keys (not in the model): " + ", ".join(self.unexpected))
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
            # DDP's "module." and torch.compile's "_orig_mod." wrap the same weights (in either order).
            for prefix in WRAPPER_PREFIXES * 2:
                if all(k.startswith(prefix) for k in tensors):
                    tensors = {k[len(prefix):]: v for k, v in tensors.items()}
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
    """Loads `sd` strictly, except for a classifier of another size when `reset_head_on_mismatch`.

    A model whose official checkpoints differ from its own state_dict defines
    `adapt_official_state_dict(sd, report) -> sd` (e.g. ATS drops its all-zero `out_zero_mask`): every caller
    (run_net's test and fine-tuning, resume, benchmark, visualize, parity) then loads official files the same way."""
    report.fine_tuning = reset_head_on_mismatch
    adapt = getattr(model, "adapt_official_state_dict", None)
    if adapt is not None:
        sd = adapt(sd, report)
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
    # Checked before anything is copied, so that a refused file leaves the model as it was.
    missing = [k for k in target if k not in sd and not (report.head_reset and k in HEAD_KEYS)]
    report.missing, report.unexpected = missing, [k for k in sd if k not in target]
    if missing or report.unexpected:
        hint = "is MODEL.NAME / VIT.* the architecture it was trained with?"
        if any(k.endswith("attn.out_zero_mask") for k in report.unexpected):
            hint = "attn.out_zero_mask is a parameter of official ATS checkpoints: use MODEL.NAME ATSVisionTransformer"
        # Nothing was loaded: the message starts with that, not with the report's "loaded ..." line.
        raise CheckpointMismatchError(f"{report.source} ({report.container}) does not match the model, nothing was "
                                      f"loaded ({hint}):\n" + "\n".join(report.lines()[1:]))
    # A diverged run's NaN / inf weights would evaluate or fine-tune to garbage without any other sign.
    params = {name for name, _ in model.named_parameters()}
    broken = [k for k, v in sd.items() if k in params and v.is_floating_point() and not bool(v.isfinite().all())]
    if broken:
        raise CheckpointMismatchError(f"{report.source}: weights are NaN or infinite in {', '.join(broken)} "
                                      "(saved from a run that diverged?)")
    model.load_state_dict(sd, strict=False)  # keys checked above; only a re-initialised head is left out
    return report
