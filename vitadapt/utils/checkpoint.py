"""Checkpoint files: OUTPUT_DIR/checkpoints/checkpoint_epoch_XXXXX.pyth, written atomically.

A checkpoint holds everything an interrupted run needs to continue exactly as if it had not stopped:
model, optimizer, AMP scaler, EMA, the epoch, the config, and every RNG state.
"""

import argparse
import logging
import os
import random
import re
from typing import Optional

import numpy as np
import torch
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


def load_file(path: str) -> dict:
    """torch.load with weights_only=True; DeiT-family files also carry an argparse.Namespace of their args."""
    if not g_pathmgr.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path}")
    try:
        with g_pathmgr.open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from None


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
    g_pathmgr.mkdirs(os.path.dirname(path))
    state = {"epoch": epoch, "model_state": unwrap(model).state_dict(), "optimizer_state": optimizer.state_dict(),
             "rng_states": rng_states or [rng_state()], "cfg": cfg.dump() if cfg is not None else ""}
    if scaler is not None:
        state["scaler_state"] = scaler.state_dict()
    if ema is not None:
        state["ema_state"] = ema.module.state_dict()
    tmp = path + ".tmp"
    with g_pathmgr.open(tmp, "wb") as f:
        torch.save(state, f)
    os.replace(tmp, path)  # atomic, and replaces a file of the same epoch (iopath's mv refuses to)
    if keep_last_k > 0:
        for _, old in list_checkpoints(output_dir)[:-keep_last_k]:
            g_pathmgr.rm(old)
    return path


def resume(path: str, model, optimizer, scaler=None, ema=None, rank: int = 0, world: int = 1) -> int:
    """Restores a vitadapt training checkpoint completely; returns the number of epochs it had finished.

    Each rank continues its own RNG stream; a run resumed with another number of processes cannot, and
    says so (its weights are still restored exactly)."""
    state = load_file(path)
    if "optimizer_state" not in state or "epoch" not in state:
        raise CheckpointError(f"{path} is not a vitadapt training checkpoint (no optimizer state / epoch)")
    load_into_model(unwrap(model), state["model_state"], LoadReport(path, "'model_state'"))
    optimizer.load_state_dict(state["optimizer_state"])
    if scaler is not None and state.get("scaler_state"):  # empty when the run had no fp16 scaling
        scaler.load_state_dict(state["scaler_state"])
    if ema is not None:
        if "ema_state" not in state:
            raise CheckpointError(f"{path} has no EMA weights but MODEL_EMA.ENABLE is on")
        ema.module.load_state_dict(state["ema_state"])
    states = state["rng_states"]
    if len(states) == world:
        set_rng_state(states[rank])
    else:
        logger.warning("%s was written by %d process(es), this run has %d: RNG streams restart from the seed, so "
                       "the run will not repeat an uninterrupted one exactly", path, len(states), world)
    return int(state["epoch"])


def load_weights(model, path: str, reset_head_on_mismatch: bool = False, prefer_ema: bool = False) -> LoadReport:
    """Loads only the model weights of any supported layout (vitadapt, DeiT, timm, ...) and logs what happened."""
    check = getattr(unwrap(model), "check_checkpoint_source", None)  # e.g. A-ViT's gate in official file names
    if check is not None:
        check(path)
    obj = load_file(path)
    if prefer_ema and isinstance(obj, dict):
        if isinstance(obj.get("ema_state"), dict):
            obj = {"model_state": obj["ema_state"]}
        else:
            logger.warning("%s has no EMA weights; evaluating its model weights", path)
    try:
        sd, where = extract_state_dict(obj, path)
    except CheckpointMismatchError as e:
        raise CheckpointError(str(e)) from None
    report = load_into_model(unwrap(model), sd, LoadReport(path, where), reset_head_on_mismatch)
    for line in report.lines():
        logger.info(line)
    return report


def unwrap(model):
    return model.module if hasattr(model, "module") else model
