"""Logging: human lines on stdout and OUTPUT_DIR/stdout.log, machine-readable `json_stats:` lines.

Only global rank 0 logs below WARNING; other ranks keep their warnings and errors (nothing is patched
into builtins). Every json_stats record is also appended, as one JSON object per line, to
OUTPUT_DIR/json_stats.log. Records are strict JSON: a NaN or infinite value is written as null and named,
with its value, under "nonfinite" (e.g. {"loss": null, "nonfinite": {"loss": "nan"}}).
"""

import decimal
import logging
import math
import os
import sys
from typing import List, Optional

import simplejson
from iopath.common.file_io import g_pathmgr

from vitadapt.errors import VitadaptError

_FORMAT = "[%(asctime)s %(levelname)s %(name)s] %(message)s"
_json_log_path = None


def setup_logging(output_dir: str = "", rank: int = 0) -> None:
    global _json_log_path
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_vitadapt", False):
            root.removeHandler(handler)
            if getattr(handler, "_owns_stream", False):
                handler.stream.close()
    root.setLevel(logging.INFO)
    handlers = [logging.StreamHandler(sys.stdout)]
    if rank == 0 and output_dir:
        g_pathmgr.mkdirs(output_dir)
        log_file = logging.StreamHandler(g_pathmgr.open(os.path.join(output_dir, "stdout.log"), "a"))
        log_file._owns_stream = True
        handlers.append(log_file)
        _json_log_path = os.path.join(output_dir, "json_stats.log")
    else:
        _json_log_path = None
    for handler in handlers:
        handler._vitadapt = True
        handler.setFormatter(logging.Formatter(_FORMAT, datefmt="%H:%M:%S"))
        handler.setLevel(logging.INFO if rank == 0 else logging.WARNING)
        root.addHandler(handler)
    for noisy in ("PIL", "fvcore", "iopath", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _rounded(value):
    if isinstance(value, float):
        return decimal.Decimal(f"{value:.6g}") if math.isfinite(value) else None
    if isinstance(value, (list, tuple)):
        return [_rounded(v) for v in value]
    return value


def _nonfinite(value):
    """'nan' / 'inf' / '-inf' for a non-finite float (a list: its elements' names, or None where finite)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, float) and not math.isfinite(v) for v in value):
        return [_nonfinite(v) for v in value]
    return None


def json_record(stats: dict) -> dict:
    """`stats` as strict JSON values: floats to 6 significant digits, NaN/inf as null, flagged in "nonfinite"."""
    record = {k: _rounded(v) for k, v in stats.items()}
    flagged = {k: _nonfinite(v) for k, v in stats.items() if _nonfinite(v) is not None}
    if flagged:
        record["nonfinite"] = flagged
    return record


def log_json_stats(stats: dict) -> None:
    """Logs `json_stats: {...}` and appends it to json_stats.log (see json_record)."""
    line = simplejson.dumps(json_record(stats), sort_keys=True, use_decimal=True, allow_nan=False)
    logging.getLogger("vitadapt").info("json_stats: %s", line)
    if _json_log_path is not None:
        with g_pathmgr.open(_json_log_path, "a") as f:
            f.write(line + "\n")


class JsonStatsError(VitadaptError, ValueError):
    """A line of json_stats.log is not a JSON record (a run killed mid-write, an edited file); the message names
    the file and the line."""


def read_json_stats(output_dir: str) -> List[dict]:
    """The records of OUTPUT_DIR/json_stats.log, in order; a line that is not a JSON object raises JsonStatsError."""
    path = os.path.join(output_dir, "json_stats.log")
    records = []
    with g_pathmgr.open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = simplejson.loads(line)
            except simplejson.JSONDecodeError as e:
                raise JsonStatsError(f"{path}, line {number}: not a JSON record ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise JsonStatsError(f"{path}, line {number}: not a JSON record (an object): {line.strip()[:40]}")
            records.append(record)
    return records


def last_record(output_dir: str, record_type: str) -> Optional[dict]:
    """The last record of `record_type` ("test_final", "val", ...) in OUTPUT_DIR/json_stats.log; None when there is
    none or no log yet. Raises JsonStatsError on a line that is not a JSON record."""
    if not g_pathmgr.isfile(os.path.join(output_dir, "json_stats.log")):
        return None
    return next((r for r in reversed(read_json_stats(output_dir)) if r.get("_type") == record_type), None)


# Records of one training epoch; a resumed or restarted run writes them again for the epochs it repeats.
EPOCH_RECORDS = ("train_epoch", "val")


def supersede_epoch_records(output_dir: str, done_epochs: int) -> int:
    """Moves json_stats.log's epoch records for epochs after `done_epochs` (left by a run that stopped before its
    next checkpoint) to json_stats.superseded.log, so that the epochs run again appear once; returns how many."""
    path = os.path.join(output_dir, "json_stats.log")
    if not g_pathmgr.isfile(path):
        return 0
    with g_pathmgr.open(path) as f:
        lines = [line for line in f if line.strip()]

    def superseded(line: str) -> bool:
        try:
            record = simplejson.loads(line)
        except ValueError:
            return False  # not ours to judge: kept as it is
        return isinstance(record, dict) and record.get("_type") in EPOCH_RECORDS and record.get("epoch", 0) > done_epochs

    moved = [line for line in lines if superseded(line)]
    if moved:
        with g_pathmgr.open(os.path.join(output_dir, "json_stats.superseded.log"), "a") as f:
            f.writelines(moved)
        tmp = path + ".tmp"
        with g_pathmgr.open(tmp, "w") as f:
            f.writelines(line for line in lines if not superseded(line))
        os.replace(tmp, path)
    return len(moved)


def log_to_file_only(message: str, level: int = logging.ERROR) -> None:
    """Writes `message` to OUTPUT_DIR/stdout.log (if logging is set up) but not to the console, for errors
    that the tools print to stderr themselves: the user sees each error once, the log file still has it."""
    record = logging.getLogger("vitadapt").makeRecord("vitadapt", level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if getattr(handler, "_vitadapt", False) and getattr(handler, "_owns_stream", False):
            handler.handle(record)
