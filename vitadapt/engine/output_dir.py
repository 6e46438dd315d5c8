"""OUTPUT_DIR belongs to one run: checked before anything in it changes, never shared by two runs.

A training job either starts a new run in a folder that holds no checkpoint, or continues the run whose
checkpoints are there (auto-resume, same config up to RESUMABLE_CHANGES). Everything else is refused at
start-up, so that a new run can never overwrite, prune or be mistaken for another run's files.
"""

import os
import tempfile
from typing import Optional, Tuple

from iopath.common.file_io import g_pathmgr

from vitadapt.config import RESUMABLE_CHANGES, CfgNode, ConfigError, config_differences
from vitadapt.utils import checkpoint as cu


def ensure_writable_dir(folder: str, what: str) -> None:
    """Creates `folder` if needed and proves it writable (a probe file), or names `what` and the reason."""
    try:
        g_pathmgr.mkdirs(folder)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ConfigError(f"{what} cannot be created or written: {folder} ({e.strerror or e})") from None


def ensure_writable_file(path: str, what: str) -> None:
    """The folder of `path` exists (created if needed) and is writable, and `path` is not a folder."""
    if os.path.isdir(path):
        raise ConfigError(f"{what} is a folder, not a file: {path}")
    ensure_writable_dir(os.path.dirname(path) or ".", what + " (its folder)")


def claim_for_training(cfg) -> Optional[Tuple[str, dict]]:
    """(path, content) of the checkpoint this training job continues from, or None for a new run; refuses, before
    anything in OUTPUT_DIR changes, a run that would overwrite or mix with the run whose checkpoints are there."""
    last = cu.last_checkpoint(cfg.OUTPUT_DIR)
    if last is None:
        return None
    epochs = [epoch for epoch, _ in cu.list_checkpoints(cfg.OUTPUT_DIR)]
    held = f"OUTPUT_DIR {cfg.OUTPUT_DIR} holds the checkpoints of a run (epochs {epochs[0]}..{epochs[-1]})"
    if not cfg.TRAIN.AUTO_RESUME:
        raise ConfigError(f"{held} and TRAIN.AUTO_RESUME is False: a new run there would overwrite them. Use "
                          f"another OUTPUT_DIR, or delete {cfg.OUTPUT_DIR} to start over")
    state = cu.load_file(last)
    saved = state.get("cfg") if isinstance(state, dict) else None
    if saved:
        changed = [k for k in config_differences(CfgNode.load_cfg(saved), cfg) if not k.startswith(RESUMABLE_CHANGES)]
        if changed:
            raise ConfigError(f"{held} with a different config ({', '.join(changed)}); resuming it would mix two "
                              f"runs. Use another OUTPUT_DIR, or delete {cfg.OUTPUT_DIR} to start over")
    return last, state
