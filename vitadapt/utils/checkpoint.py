"""Checkpoint files: OUTPUT_DIR/checkpoints/checkpoint_epoch_XXXXX.pyth, written atomically.

A checkpoint holds everything an interrupted run needs to continue exactly as if it had not stopped:
model, optimizer, AMP scaler, EMA, the epoch, the config, and every RNG state.
"""

import argparse
import contextlib
import errno
import logging
import os
import pickle
import random
import re
from typing import Optional, Tuple

import numpy as np
import torch
import yaml
from iopath.common.file_io import g_pathmgr

from vitadapt.errors import VitadaptError
from vitadapt.models.convert import CheckpointMismatchError, LoadReport, extract_state_dict, load_into_model

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^checkpoint_epoch_(\d{5})\.pyth$")


class CheckpointError(VitadaptError, RuntimeError):
    """A checkpoint file cannot be read."""


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def checkpoint_path(output_dir: str, epoch: int) -> str:
    """Path of the checkpoint written after `epoch` epochs (1-based, as in PySlowFast)."""
    return os.path.join(checkpoint_dir(output_dir), f"checkpoint_epoch_{epoch:05d}.pyth")


def list_checkpoints(output_dir: str):
    folder = checkpoint_dir(output_dir)
    if not g_pathmgr.isdir(folder):
        return []
    found = [(int(m.group(1)), os.path.join(folder, name))
             for name in g_pathmgr.ls(folder) if (m := _NAME.match(name))]
    return sorted(found)


def last_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint of the highest epoch in OUTPUT_DIR, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


class CheckpointWriteError(CheckpointError, OSError):
    """A checkpoint file cannot be written (disk full, ...); the previous checkpoints are left as they were."""


# How a file starts: torch.save's zip format, its legacy pickle format (the magic number torch writes first, as a
# pickled int), and safetensors (an 8-byte header length, then the JSON header).
_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = b"\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
_UNSAFE_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global|Unsupported global: GLOBAL (\S+)")


def _newest_in(folder: str) -> str:
    """' (its newest checkpoint is X)' when `folder` is an OUTPUT_DIR or its checkpoints/ folder, else ''."""
    folder = os.path.normpath(folder)
    newest = last_checkpoint(folder)
    if newest is None and os.path.basename(folder) == "checkpoints":
        newest = last_checkpoint(os.path.dirname(folder))
    return f" (its newest checkpoint is {newest})" if newest else ""


def load_file(path: str) -> dict:
    """torch.load with weights_only=True (DeiT-family files also carry an argparse.Namespace of their args), or a
    .safetensors file (timm's hub format). Every failure is a CheckpointError that names the file and says what
    is wrong with it: torch's own messages advise weights_only=False even for a file that is merely corrupt."""
    if g_pathmgr.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file{_newest_in(path)}")
    if not g_pathmgr.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        f = g_pathmgr.open(path, "rb")
        head = f.read(32)
    except OSError as e:  # permissions, I/O errors: the file is fine as far as we know, reading it is not
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None
    with f:
        if not head:
            raise CheckpointError(f"checkpoint file is empty (0 bytes): {path}")
        if head[8:9] == b"{" and int.from_bytes(head[:8], "little") < f.seek(0, os.SEEK_END):
            return _load_safetensors(path)
        if not head.startswith(_ZIP_MAGIC) and _LEGACY_MAGIC not in head:
            raise CheckpointError(f"{path} is not a PyTorch checkpoint (neither torch.save's zip format nor its "
                                  "legacy format)")
        f.seek(0)
        try:
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            unsafe = _UNSAFE_GLOBAL.search(str(e))
            if unsafe:
                raise CheckpointError(
                    f"{path} holds a Python object ({unsafe.group(1) or unsafe.group(2)}) whose loading could run "
                    "code; vitadapt loads checkpoints with torch.load(weights_only=True) and refuses it. If you trust "
                    "the file, save its weights alone: torch.save(torch.load(f, weights_only=False)['model'], "
                    "'weights.pth')") from None
            raise CheckpointError(f"{path} is corrupt: its pickled data cannot be read ({_first_line(e)})") from None
        except Exception as e:  # torch's zip reader and legacy loader raise RuntimeError / OSError / EOFError
            raise CheckpointError(f"{path} is truncated or corrupt, not a readable checkpoint "
                                  f"({_first_line(e)})") from None


def _first_line(e: Exception) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _load_safetensors(path: str) -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file as load_safetensors

    try:
        return load_safetensors(g_pathmgr.get_local_path(path), device="cpu")
    except SafetensorError as e:
        raise CheckpointError(f"{path} is a truncated or corrupt safetensors file ({_first_line(e)})") from None


def rng_state() -> dict:
    """Every RNG state as plain bytes and numbers (safe for weights_only loading and for object collectives)."""
    name, keys, *rest = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state().numpy().tobytes(),
             "numpy": (name, keys.astype(np.uint32).tobytes(), *rest)}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.numpy().tobytes() for s in torch.cuda.get_rng_state_all()]
    return state


def _byte_tensor(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(_byte_tensor(state["torch"]))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.frombuffer(keys, dtype=np.uint32).copy(), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in state["cuda"]])


def save_checkpoint(output_dir: str, epoch: int, model, optimizer, scaler=None, ema=None, cfg=None,
                    keep_last_k: int = 0, rng_states: Optional[list] = None) -> str:
    """Writes checkpoint_epoch_{epoch:05d}.pyth through a temporary file, so a crash never leaves half a file.

    `rng_states` holds every rank's RNG state, in rank order (default: this process's only)."""
    path = checkpoint_path(output_dir, epoch)
    state = {"epoch": epoch, "model_state": unwrap(model).state_dict(), "optimizer_state": optimizer.state_dict(),
             "rng_states": rng_states or [rng_state()], "cfg": cfg.dump() if cfg is not None else ""}
    if scaler is not None:
        state["scaler_state"] = scaler.state_dict()
    if ema is not None:
        state["ema_state"] = ema.module.state_dict()
    tmp = path + ".tmp"
    try:
        g_pathmgr.mkdirs(os.path.dirname(path))
        with g_pathmgr.open(tmp, "wb") as f:  # closing flushes: a full disk may only show here
            torch.save(state, f)
        os.replace(tmp, path)  # atomic, and replaces a file of the same epoch (iopath's mv refuses to)
    except BaseException as e:
        with contextlib.suppress(OSError):  # half a file would fill the disk further and confuse whoever looks
            os.remove(tmp)
        if not isinstance(e, OSError):
            raise
        reason = "disk full" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "write failed"
        error = CheckpointWriteError(f"cannot write checkpoint {path}: {reason} ({e}); no partial file was left "
                                     "and the previous checkpoints are untouched")
        error.errno = e.errno
        raise error from None
    if keep_last_k > 0:
        for _, old in list_checkpoints(output_dir)[:-keep_last_k]:
            g_pathmgr.rm(old)
    return path


def resume(path: str, model, optimizer, scaler=None, ema=None, rank: int = 0, world: int = 1,
           state: Optional[dict] = None) -> int:
    """Restores a vitadapt training checkpoint completely; returns the number of epochs it had finished.
    `state`: the file's content when the caller has read it already.

    Each rank continues its own RNG stream; a run resumed with another number of processes cannot, and
    says so (its weights are still restored exactly)."""
    state = load_file(path) if state is None else state
    if not isinstance(state, dict) or not {"model_state", "optimizer_state", "epoch"} <= set(state):
        raise CheckpointError(f"{path} is not a vitadapt training checkpoint (no model state / optimizer state / "
                              "epoch); to start from its weights, use TRAIN.CHECKPOINT_FILE_PATH")
    load_into_model(unwrap(model), state["model_state"], LoadReport(path, "'model_state'"))
    try:  # torch raises ValueError when the parameter groups differ (another model or optimizer config)
        optimizer.load_state_dict(state["optimizer_state"])
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer ({e})") from None
    if scaler is not None and state.get("scaler_state"):  # empty when the run had no fp16 scaling
        scaler.load_state_dict(state["scaler_state"])
    if ema is not None:
        if "ema_state" not in state:
            raise CheckpointError(f"{path} has no EMA weights but MODEL_EMA.ENABLE is on")
        load_into_model(ema.module, state["ema_state"], LoadReport(path, "'ema_state'"))
    states = state.get("rng_states") or []
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        logger.warning("%s holds the RNG states of %d process(es), this run has %d: RNG streams restart from the "
                       "seed, so the run will not repeat an uninterrupted one exactly", path, len(states), world)
    return int(state["epoch"])


EMA_CONTAINERS = ("ema_state", "model_ema", "state_dict_ema")  # vitadapt, DeiT-family, timm's train.py


def written_by(obj) -> Tuple[Optional[str], Optional[int]]:
    """(MODEL.NAME, epoch) a checkpoint says it was saved with: the name from a vitadapt file's `cfg` YAML, the
    epoch as stored (vitadapt: epochs done; DeiT-family files: the 0-based index of the last epoch)."""
    if not isinstance(obj, dict):
        return None, None
    epoch = obj.get("epoch") if isinstance(obj.get("epoch"), int) else None
    try:
        name = (yaml.safe_load(obj["cfg"]).get("MODEL") or {}).get("NAME")
    except Exception:  # no cfg, or a foreign one (PySlowFast's MODEL.MODEL_NAME, not YAML, ...): nothing to say
        name = None
    return (name if isinstance(name, str) else None), epoch


def load_weights(model, path: str, reset_head_on_mismatch: bool = False, prefer_ema: bool = False) -> LoadReport:
    """Loads only the model weights of any supported layout (vitadapt, DeiT, timm, ...) and logs what happened:
    which weights, of which method and epoch (warning when the file was trained as another MODEL.NAME)."""
    target = unwrap(model)
    check = getattr(target, "check_checkpoint_source", None)  # e.g. A-ViT's gate in official file names
    if check is not None:
        check(path)
    obj = load_file(path)
    ema_key = None
    # Official AdaViT evaluation reads the EMA weights of its training files when they hold them.
    official_ema = getattr(target, "official_files_prefer_ema", False) and not (isinstance(obj, dict) and "cfg" in obj)
    if official_ema and not (isinstance(obj, dict) and isinstance(obj.get("state_dict_ema"), dict)):
        official_ema = False  # no timm-saver EMA weights: the file's model weights, without a warning
    if official_ema and not prefer_ema:
        ema_key = "state_dict_ema"  # the official order: state_dict_ema, then state_dict, then model
    elif prefer_ema:
        ema_key = next((k for k in EMA_CONTAINERS if isinstance(obj, dict) and isinstance(obj.get(k), dict)), None)
        if ema_key is None:
            logger.warning("%s has no EMA weights; evaluating its model weights", path)
    try:
        sd, where = extract_state_dict(obj[ema_key] if ema_key else obj, path)
    except CheckpointMismatchError as e:
        raise CheckpointError(str(e)) from None
    report = LoadReport(path, f"'{ema_key}'" if ema_key else where)
    method, epoch = written_by(obj)
    if method:
        report.notes.append(f"a vitadapt checkpoint of MODEL.NAME {method}"
                            + (f", {epoch} epoch(s) trained" if epoch is not None else ""))
    elif epoch is not None:
        report.notes.append(f"epoch {epoch} (as stored in the file)")
    report = load_into_model(target, sd, report, reset_head_on_mismatch)  # the notes also go into its errors
    for line in report.lines():
        logger.info(line)
    if method and method != type(target).__name__:  # the methods share the backbone, so nothing else would tell
        logger.warning("%s was trained as MODEL.NAME %s, but the model built here is %s: the weights fit (the "
                       "methods share the backbone's parameters), the token handling is this model's",
                       path, method, type(target).__name__)
    return report


def unwrap(model):
    return model.module if hasattr(model, "module") else model
