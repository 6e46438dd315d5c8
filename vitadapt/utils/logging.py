"""Logging: human lines on stdout and OUTPUT_DIR/stdout.log, machine-readable `json_stats:` lines.

Only global rank 0 logs below WARNING; other ranks keep their warnings and errors (nothing is patched
into builtins). Every json_stats record is also appended, as one JSON object per line, to
OUTPUT_DIR/json_stats.log.
"""

import decimal
import logging
import os
import sys

import simplejson
from iopath.common.file_io import g_pathmgr

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
        return decimal.Decimal(f"{value:.6g}")
    return value


def log_json_stats(stats: dict) -> None:
    """Logs `json_stats: {...}` (floats to 6 significant digits) and appends it to json_stats.log."""
    line = simplejson.dumps({k: _rounded(v) for k, v in stats.items()}, sort_keys=True, use_decimal=True)
    logging.getLogger("vitadapt").info("json_stats: %s", line)
    if _json_log_path is not None:
        with g_pathmgr.open(_json_log_path, "a") as f:
            f.write(line + "\n")


def read_json_stats(output_dir: str):
    with g_pathmgr.open(os.path.join(output_dir, "json_stats.log")) as f:
        return [simplejson.loads(line) for line in f if line.strip()]
