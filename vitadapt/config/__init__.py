"""Config: defaults + method nodes + YAML (with _BASE_) + command-line KEY VALUE overrides, then checks.

    cfg = load_config("configs/demo/DeiT_Ti_digits.yaml", ["SOLVER.BASE_LR", "1e-3"])

Every error names the key or file at fault, shows the offending value(s), and is raised as ConfigError, which
tools/ turn into a one-line message and exit code 2. Values from YAML and from the command line go through one
type check: a key takes the type of its default (ints are accepted for floats; floats must be finite and fit in
float32; lists take their default's element type, or the one declared in defaults.DECLARED_TYPES), and None only
where the default is None. Valid configs that make a method degenerate are logged as warnings by its validator.
"""

import argparse
import difflib
import logging
import math
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import yaml
from fvcore.common.config import CfgNode
from iopath.common.file_io import g_pathmgr

from vitadapt.errors import VitadaptError

from .defaults import DECLARED_TYPES, get_defaults

__all__ = ["CfgNode", "ConfigError", "config_differences", "RESUMABLE_CHANGES", "get_cfg", "load_config", "register_config",
           "register_validator", "validate",
           "check_paths", "parse_args", "world_size", "num_workers"]

logger = logging.getLogger(__name__)
BASE_KEY = "_BASE_"


class ConfigError(VitadaptError, ValueError):
    """A config value is unknown, of the wrong type, inconsistent or points to a missing file."""


_NODE_BUILDERS: Dict[str, Callable[[CfgNode], None]] = {}
_VALIDATORS: List[Callable[[CfgNode], None]] = []
_DECLARED_TYPES: Dict[str, object] = dict(DECLARED_TYPES)


def register_config(name: str, add_node: Callable[[CfgNode], None],
                    validator: Optional[Callable[[CfgNode], None]] = None, types: Optional[dict] = None) -> None:
    """Lets a method module add its own node (e.g. "EVIT") and checks, instead of editing defaults.py.
    `types`: the declarations defaults.DECLARED_TYPES describes, for the node's empty-list and optional keys."""
    _NODE_BUILDERS[name] = add_node
    _DECLARED_TYPES.update(types or {})
    if validator is not None:
        register_validator(validator)


def register_validator(validator: Callable[[CfgNode], None]) -> None:
    """Checks run on every config, for keys a module uses but defaults.py holds (e.g. the video DATA keys)."""
    if validator not in _VALIDATORS:
        _VALIDATORS.append(validator)


def get_cfg() -> CfgNode:
    """A fresh copy of every default, method nodes included."""
    # Importing the models and data sets registers their config nodes and checks.
    import vitadapt.datasets  # noqa: F401
    import vitadapt.models  # noqa: F401

    cfg = get_defaults().clone()
    for add_node in _NODE_BUILDERS.values():
        add_node(cfg)
    return cfg


# ------------------------------------------------------------------ reading values: one type check for YAML and CLI

_FLOAT32_MAX = 3.4028234663852886e38  # models and optimizers run in float32: a larger value becomes inf there
_INT64_MAX = 2**63 - 1
_TYPE_NAMES = {bool: ("True or False", "bools"), int: ("an integer", "integers"), float: ("a number", "numbers"),
               str: ("a string", "strings"), None: ("a plain value", "plain values")}


class _Mismatch(Exception):
    """An internal signal: a value is not of the expected type (the caller builds the message)."""


def _expected_type(key: str, default):
    """bool, int, float or str; [element type] for a list; None (any plain value) for an undeclared optional key."""
    if key in _DECLARED_TYPES:
        return _DECLARED_TYPES[key]
    if isinstance(default, (list, tuple)):
        kinds = {type(v) for v in default}
        # An undeclared empty default cannot say (tests/test_reliability_config.py requires a declaration).
        return [float if kinds == {int, float} else kinds.pop() if len(kinds) == 1 else None]
    return None if default is None else type(default)


def _scalar(kind, value):
    if kind is float and isinstance(value, str):
        try:  # YAML "1e-3" (no dot) and "nan"/"inf" reach here as text; non-finite values are refused below
            value = float(value)
        except ValueError:
            raise _Mismatch from None
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            value = float(value)
        except OverflowError:  # a huge int
            value = math.inf
        if not math.isfinite(value) or abs(value) > _FLOAT32_MAX:
            raise OverflowError
        return value
    if kind is int and type(value) is int and abs(value) > _INT64_MAX:
        raise OverflowError
    if type(value) is kind or kind is None and isinstance(value, (bool, int, float, str)):
        return value
    raise _Mismatch


def _shown(value) -> str:
    if value == "":
        return "'' (an empty value)"
    return repr(list(value) if isinstance(value, tuple) else value)


def _checked(key: str, default, value):
    """`value` (from a YAML file, or decoded from the command line) as the type of `default`, else ConfigError."""
    if isinstance(default, CfgNode):
        if value is None:  # "NODE:" with every key below it commented out
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} is a group of keys (e.g. {key}.{next(iter(default), 'KEY')}), not a value; "
                              f"got {_shown(value)}")
        return _checked_tree(default, value, key + ".")
    if isinstance(value, dict):
        raise ConfigError(f"config key '{key}' is a value, not a node; got {value!r}")
    kind = _expected_type(key, default)
    if value is None and default is None:  # an optional key (see DECLARED_TYPES)
        return None
    try:
        if isinstance(kind, list):
            if not isinstance(value, (list, tuple)):
                raise _Mismatch
            return [_scalar(kind[0], v) for v in value]
        return _scalar(kind, value)
    except OverflowError:
        wanted = "an integer that fits in int64" if kind in (int, [int]) else \
            f"a finite number that fits in float32 (|x| <= {_FLOAT32_MAX:.4g})"
        raise ConfigError(f"{key} must be {'a list of ' if isinstance(kind, list) else ''}{wanted}, "
                          f"got {_shown(value)}") from None
    except _Mismatch:
        wanted = f"a list of {_TYPE_NAMES[kind[0]][1]}" if isinstance(kind, list) else _TYPE_NAMES[kind][0]
        hint = ""
        if kind is str and isinstance(value, bool):
            hint = " (YAML reads unquoted yes/no/on/off/true/false as booleans: quote the value)"
        elif value is None:
            hint = " (None is not a value for this key)"
        raise ConfigError(f"{key} must be {wanted}, got {_shown(value)}{hint}") from None


def _unknown(full_key: str, node, prefix: str, part) -> ConfigError:
    """Names the whole key as given, and the closest existing key of that node if there is one."""
    if not isinstance(node, CfgNode):
        return ConfigError(f"unknown config key '{full_key}' ({prefix[:-1]} is a value, not a group of keys)")
    close = difflib.get_close_matches(str(part), [str(k) for k in node], n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else ""
    return ConfigError(f"unknown config key '{full_key}'{hint}")


def _checked_tree(node: CfgNode, values: dict, prefix: str = "") -> dict:
    """A checked copy of a (nested) dict of settings, with every key known to `node` and every value of its type."""
    out = {}
    for key, value in values.items():
        if key not in node:
            raise _unknown(f"{prefix}{key}", node, prefix, key)
        out[key] = _checked(prefix + key, node[key], value)
    return out


def _apply(node: CfgNode, values: dict) -> None:
    """Sets checked settings (from _checked_tree) into the config; nested dicts go into their nodes."""
    if node.is_frozen():  # item assignment would bypass CfgNode's own check
        raise AttributeError(f"cannot merge {sorted(values)} into a frozen config")
    for key, value in values.items():
        if isinstance(value, dict):
            _apply(node[key], value)
        else:
            node[key] = value


def _decode(raw: str, default):
    """Command-line text as a Python value, as yacs does (literal_eval), except that text meant for a string key
    stays text when it merely looks like a number (OUTPUT_DIR 2024)."""
    value = CfgNode._decode_cfg_value(raw)
    if isinstance(default, str) and isinstance(value, (int, float)) and not isinstance(value, bool):
        return raw
    return value


def _decode_yaml(values: dict, node: CfgNode) -> dict:
    """YAML strings are decoded like command-line text ("5e-4" is a string to PyYAML); other values stay."""
    out = {}
    for key, value in values.items():
        default = node.get(key) if isinstance(key, str) else None
        if isinstance(value, dict) and isinstance(default, CfgNode):
            out[key] = _decode_yaml(value, default)
        elif isinstance(value, str):
            out[key] = _decode(value, default)
        else:
            out[key] = value
    return out


# ------------------------------------------------------------------ YAML files with _BASE_


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _read_yaml(cfg: CfgNode, path: str, chain: Sequence[str] = ()) -> dict:
    """The checked settings of config file `path`, its _BASE_ files (one or a list, relative to it) merged below
    them. `chain` holds the files that (transitively) name this one as their base, to report cycles."""
    try:
        with g_pathmgr.open(path, "r") as f:
            data = yaml.safe_load(f)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config file {path}: {_one_line(e)}") from None
    if data is None:
        raise ConfigError(f"config file {path} is empty (or only comments); it must map config keys to values "
                          f"(e.g. 'SOLVER: ...')")
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must map config keys to values (e.g. 'SOLVER: ...'), "
                          f"but holds a {type(data).__name__}: {repr(data)[:80]}")
    given = data.pop(BASE_KEY, [])
    bases = [given] if isinstance(given, str) else given
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise ConfigError(f"{path}: {BASE_KEY} must be a file name or a list of file names, got {given!r}")
    try:
        settings = _checked_tree(cfg, _decode_yaml(data, cfg))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    merged: dict = {}
    for base in bases:
        base_path = os.path.expanduser(base)
        if not base_path.startswith(("/", "https://", "http://")):
            base_path = os.path.join(os.path.dirname(path), base_path)
        here = list(chain) + [path]
        if os.path.realpath(base_path) in {os.path.realpath(p) for p in here}:
            raise ConfigError(f"{BASE_KEY} cycle: {' -> '.join(here + [base_path])}")
        if not g_pathmgr.isfile(base_path):
            raise ConfigError(f"{path}: {BASE_KEY} file '{base}' not found (looked for {base_path})")
        _deep_update(merged, _read_yaml(cfg, base_path, here))
    _deep_update(merged, settings)
    return merged


def _deep_update(into: dict, values: dict) -> None:
    for key, value in values.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _deep_update(into[key], value)
        else:
            into[key] = value


def merge_file(cfg: CfgNode, path: str) -> None:
    if not g_pathmgr.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    _apply(cfg, _read_yaml(cfg, path))


def merge_opts(cfg: CfgNode, opts: Sequence[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; '{opts[-1]}' has no value")
    for key, raw in zip(opts[0::2], opts[1::2]):
        node, parts = cfg, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, CfgNode) or part not in node:
                raise _unknown(key, node, ".".join(parts[:i]) + "." if i else "", part)
            parent, node = node, node[part]
        value = _decode(raw, node) if isinstance(raw, str) else raw
        _apply(parent, {parts[-1]: _checked(key, node, value)})


# Keys that may change when a run resumes: where and how it runs and logs, not what it trains (a run saved before a
# key existed lacks it, which counts as a change).
RESUMABLE_CHANGES = ("OUTPUT_DIR", "NUM_GPUS", "NUM_PROCS", "NUM_SHARDS", "SHARD_ID", "DIST_BACKEND", "LOG_PERIOD",
                     "LOG_MODEL_INFO", "KEEP_FREED_CPU_MEMORY", "FLUSH_DENORMAL", "SOLVER.MAX_EPOCH",
                     "TRAIN.EVAL_PERIOD", "TRAIN.CHECKPOINT_PERIOD",
                     "TRAIN.KEEP_LAST_K", "TRAIN.AUTO_RESUME", "TRAIN.CHECKPOINT_FILE_PATH", "TEST.", "DATA_LOADER.",
                     "TENSORBOARD.", "BENCHMARK.", "DATA.PATH_TO_DATA_DIR")


def config_differences(old: CfgNode, new: CfgNode, prefix: str = "") -> List[str]:
    """Dotted keys whose values differ between two configs (keys present in only one count too)."""
    keys = sorted(set(old) | set(new))
    out = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{key}.")
        elif a != b and not (isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and list(a) == list(b)):
            out.append(prefix + key)
    return out


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _get(cfg: CfgNode, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _require_range(cfg: CfgNode, key: str, low=None, high=None, low_open: bool = False,
                   high_open: bool = False) -> None:
    """`key` (a number, or each number of a list) must lie in the interval; the message shows the value."""
    value = _get(cfg, key)
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    ok = all((low is None or (v > low if low_open else v >= low))
             and (high is None or (v < high if high_open else v <= high)) for v in values)
    if ok:
        return
    if low is not None and high is not None:
        wanted = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        wanted = f"{'>' if low_open else '>='} {low}"
    else:
        wanted = f"{'<' if high_open else '<='} {high}"
    if isinstance(value, (list, tuple)):
        raise ConfigError(f"{key} values must each be {wanted}, got {values}")
    raise ConfigError(f"{key} must be {wanted}, got {value}")


def _require_choice(cfg: CfgNode, key: str, choices: Sequence[str]) -> None:
    value = _get(cfg, key)
    _require(value in choices, f"{key} must be {', '.join(choices[:-1])} or {choices[-1]}, got '{value}'")


def processes_per_machine(cfg: CfgNode) -> int:
    return cfg.NUM_GPUS if cfg.NUM_GPUS > 0 else cfg.NUM_PROCS


def world_size(cfg: CfgNode) -> int:
    return processes_per_machine(cfg) * cfg.NUM_SHARDS


def _machine_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))  # the CPUs this process may use (containers, taskset)
    except AttributeError:
        return os.cpu_count() or 1


AUTO_MAX_WORKERS = 4


def num_workers(cfg: CfgNode) -> int:
    """Loader workers per process: DATA_LOADER.NUM_WORKERS, or for -1 (auto) min(4, CPUs / processes on this
    machine), so that a small machine gets no more workers than it has CPUs (torch warns otherwise)."""
    requested = cfg.DATA_LOADER.NUM_WORKERS
    if requested >= 0:
        return requested
    return min(AUTO_MAX_WORKERS, _machine_cpus() // max(processes_per_machine(cfg), 1))


def validate(cfg: CfgNode) -> None:
    """Checks that need no file system or hardware: ranges, choices and cross-key consistency. Every message
    names the key(s) and shows the value(s). Configs that are valid but make a method degenerate are logged as
    warnings by the method validators (once per call)."""
    from vitadapt.datasets import DATASET_REGISTRY
    from vitadapt.losses import LOSS_REGISTRY
    from vitadapt.models import MODEL_REGISTRY

    _require_range(cfg, "NUM_GPUS", 0)
    _require_range(cfg, "NUM_PROCS", 1)
    _require_range(cfg, "NUM_SHARDS", 1)
    _require(0 <= cfg.SHARD_ID < cfg.NUM_SHARDS,
             f"SHARD_ID ({cfg.SHARD_ID}) must be in [0, NUM_SHARDS={cfg.NUM_SHARDS})")
    _require_choice(cfg, "DIST_BACKEND", ("auto", "nccl", "gloo"))
    _require(not (cfg.NUM_GPUS == 0 and cfg.DIST_BACKEND == "nccl"),
             f"DIST_BACKEND nccl needs NUM_GPUS > 0, got NUM_GPUS {cfg.NUM_GPUS}")
    _require_range(cfg, "RNG_SEED", 0)
    world = world_size(cfg)
    for node in ("TRAIN", "TEST"):
        key, batch = f"{node}.BATCH_SIZE", cfg[node].BATCH_SIZE
        _require_range(cfg, key, 1)
        _require(batch % world == 0,
                 f"{key} ({batch}) is the global batch and must be divisible by the number of processes ({world})")

    _require(cfg.MODEL.NAME in MODEL_REGISTRY, f"MODEL.NAME '{cfg.MODEL.NAME}' is not a registered model; "
             f"choose one of {sorted(k for k, _ in MODEL_REGISTRY)}")
    _require(cfg.MODEL.LOSS_FUNC in LOSS_REGISTRY, f"MODEL.LOSS_FUNC '{cfg.MODEL.LOSS_FUNC}' is not a registered "
             f"loss; choose one of {sorted(k for k, _ in LOSS_REGISTRY)}")
    for node in ("TRAIN", "TEST"):
        key, name = f"{node}.DATASET", cfg[node].DATASET
        _require(name in DATASET_REGISTRY, f"{key} '{name}' is not a registered data set; "
                 f"choose one of {sorted(k for k, _ in DATASET_REGISTRY)}")
    _require_range(cfg, "MODEL.NUM_CLASSES", 1)
    _require_range(cfg, "LOG_PERIOD", 1)

    v = cfg.VIT
    for key in ("PATCH_SIZE", "EMBED_DIM", "DEPTH", "NUM_HEADS", "IN_CHANS"):
        _require_range(cfg, f"VIT.{key}", 1)
    _require_range(cfg, "VIT.MLP_RATIO", 0, low_open=True)
    for key in ("DROP_RATE", "ATTN_DROP_RATE", "DROP_PATH_RATE", "HEAD_DROP_RATE"):
        _require_range(cfg, f"VIT.{key}", 0, 1, high_open=True)
    _require_choice(cfg, "VIT.TOKEN_EXECUTION", ("packed", "masked"))
    _require(v.EMBED_DIM % v.NUM_HEADS == 0,
             f"VIT.EMBED_DIM ({v.EMBED_DIM}) must be divisible by VIT.NUM_HEADS ({v.NUM_HEADS})")

    d = cfg.DATA
    for key in ("TRAIN_CROP_SIZE", "TEST_CROP_SIZE"):
        size = d[key]
        _require(size > 0 and size % v.PATCH_SIZE == 0,
                 f"DATA.{key} ({size}) must be a positive multiple of VIT.PATCH_SIZE ({v.PATCH_SIZE})")
    _require(len(d.MEAN) == v.IN_CHANS and len(d.STD) == v.IN_CHANS,
             f"DATA.MEAN {list(d.MEAN)} and DATA.STD {list(d.STD)} need VIT.IN_CHANS={v.IN_CHANS} values each")
    _require_range(cfg, "DATA.STD", 0, low_open=True)  # images are divided by it
    _require_range(cfg, "DATA.IN_VAL_CROP_RATIO", 0, 1, low_open=True)
    _require_choice(cfg, "DATA.INTERPOLATION", ("bilinear", "bicubic", "nearest"))

    a = cfg.AUG
    _require(len(a.SCALE) == 2 and 0 < a.SCALE[0] <= a.SCALE[1] <= 1,
             f"AUG.SCALE must be [min, max] with 0 < min <= max <= 1, got {list(a.SCALE)}")
    for key in ("AUG.HFLIP", "AUG.RE_PROB"):
        _require_range(cfg, key, 0, 1)
    _require_range(cfg, "AUG.COLOR_JITTER", 0)
    _require_range(cfg, "AUG.RE_COUNT", 1)
    _require_choice(cfg, "AUG.RE_MODE", ("pixel", "rand", "const"))
    if a.ENABLE and a.AA_TYPE:
        # timm parses the policy string only when the first data loader is built; build it now (microseconds) so
        # that a typo fails here with the key's name instead of an AssertionError in a loader.
        from timm.data import create_transform

        try:
            create_transform(input_size=d.TRAIN_CROP_SIZE, is_training=True, auto_augment=a.AA_TYPE)
        except Exception as e:
            reason = _one_line(e) or type(e).__name__
            raise ConfigError(f"AUG.AA_TYPE '{a.AA_TYPE}' is not an auto-augment policy timm knows ({reason}); "
                              f"e.g. rand-m9-mstd0.5-inc1, or '' for none") from None
    m = cfg.MIXUP
    for key in ("MIXUP.PROB", "MIXUP.SWITCH_PROB"):
        _require_range(cfg, key, 0, 1)
    for key in ("MIXUP.ALPHA", "MIXUP.CUTMIX_ALPHA"):
        _require_range(cfg, key, 0)
    if m.ENABLE:
        _require(m.ALPHA > 0 or m.CUTMIX_ALPHA > 0, f"MIXUP.ENABLE needs MIXUP.ALPHA or MIXUP.CUTMIX_ALPHA > 0, "
                 f"got {m.ALPHA} and {m.CUTMIX_ALPHA}")
        _require(cfg.MODEL.NUM_CLASSES >= 2, f"MIXUP.ENABLE needs MODEL.NUM_CLASSES >= 2, got {cfg.MODEL.NUM_CLASSES}")
        _require((cfg.TRAIN.BATCH_SIZE // world) % 2 == 0, f"MIXUP.ENABLE pairs images: TRAIN.BATCH_SIZE per process "
                 f"({cfg.TRAIN.BATCH_SIZE} / {world} = {cfg.TRAIN.BATCH_SIZE // world}) must be even")

    s = cfg.SOLVER
    _require_choice(cfg, "SOLVER.LR_POLICY", ("cosine", "steps_with_relative_lrs", "constant"))
    _require_choice(cfg, "SOLVER.OPTIMIZING_METHOD", ("sgd", "adamw"))
    _require_range(cfg, "SOLVER.MAX_EPOCH", 1)
    _require(0 <= s.WARMUP_EPOCHS <= s.MAX_EPOCH,
             f"SOLVER.WARMUP_EPOCHS must be in [0, SOLVER.MAX_EPOCH={s.MAX_EPOCH}], got {s.WARMUP_EPOCHS}")
    _require_range(cfg, "SOLVER.BASE_LR", 0, low_open=True)
    _require_range(cfg, "SOLVER.LR_SCALE_REF_BATCH", 0)
    # The learning rate the schedule starts from and decays to (vitadapt/utils/lr_policy.py); both ends must be
    # reachable from it: a warm-up that falls or a cosine that rises is a typo, not a schedule.
    scale = cfg.TRAIN.BATCH_SIZE / s.LR_SCALE_REF_BATCH if s.LR_SCALE_REF_BATCH > 0 else 1.0
    base = s.BASE_LR * scale
    shown = f"{base:g}" if scale == 1 else (f"{base:g} = SOLVER.BASE_LR {s.BASE_LR:g} x TRAIN.BATCH_SIZE "
                                           f"{cfg.TRAIN.BATCH_SIZE} / SOLVER.LR_SCALE_REF_BATCH {s.LR_SCALE_REF_BATCH}")
    _require(math.isfinite(base) and base <= _FLOAT32_MAX, f"the scaled learning rate overflows float32: {shown}")
    for key in ("SOLVER.WARMUP_START_LR", "SOLVER.COSINE_END_LR"):
        _require_range(cfg, key, 0)
    if s.WARMUP_EPOCHS > 0:
        _require(s.WARMUP_START_LR <= base,
                 f"SOLVER.WARMUP_START_LR ({s.WARMUP_START_LR:g}) must be <= the base learning rate ({shown})")
    if s.LR_POLICY == "cosine":
        _require(s.COSINE_END_LR <= base,
                 f"SOLVER.COSINE_END_LR ({s.COSINE_END_LR:g}) must be <= the base learning rate ({shown})")
    if s.LR_POLICY == "steps_with_relative_lrs":
        _require(len(s.STEPS) == len(s.LRS) and len(s.STEPS) > 0 and s.STEPS[0] == 0
                 and list(s.STEPS) == sorted(s.STEPS),
                 f"SOLVER.STEPS and SOLVER.LRS must have the same length and STEPS must rise from 0, "
                 f"got SOLVER.STEPS {list(s.STEPS)} and SOLVER.LRS {list(s.LRS)}")
        _require_range(cfg, "SOLVER.LRS", 0)
    _require_range(cfg, "SOLVER.MOMENTUM", 0, 1, high_open=True)
    _require(not (s.OPTIMIZING_METHOD == "sgd" and s.NESTEROV and s.MOMENTUM == 0),
             f"SOLVER.NESTEROV needs SOLVER.MOMENTUM > 0, got {s.MOMENTUM}")
    _require(len(s.BETAS) == 2, f"SOLVER.BETAS needs two values, got {list(s.BETAS)}")
    _require_range(cfg, "SOLVER.BETAS", 0, 1, high_open=True)
    _require_range(cfg, "SOLVER.WEIGHT_DECAY", 0)
    _require_range(cfg, "SOLVER.CLIP_GRAD_L2NORM", 0)

    _require_choice(cfg, "TRAIN.AMP", ("off", "fp16", "bf16"))
    _require_range(cfg, "TRAIN.EVAL_PERIOD", 1)
    _require_range(cfg, "TRAIN.CHECKPOINT_PERIOD", 1)
    _require_range(cfg, "TRAIN.KEEP_LAST_K", 0)
    _require_range(cfg, "TRAIN.LABEL_SMOOTHING", 0, 1, high_open=True)
    _require_choice(cfg, "TEST.SPLIT", ("val", "test"))
    _require_range(cfg, "DATA_LOADER.NUM_WORKERS", -1)  # -1: auto (see num_workers)
    _require_range(cfg, "MODEL_EMA.DECAY", 0, 1, low_open=True, high_open=True)
    b = cfg.BENCHMARK
    _require(len(b.BATCH_SIZES) > 0, f"BENCHMARK.BATCH_SIZES needs at least one batch size, got {list(b.BATCH_SIZES)}")
    for key in ("BENCHMARK.BATCH_SIZES", "BENCHMARK.NUM_REPEATS", "BENCHMARK.ITERS_PER_REPEAT"):
        _require_range(cfg, key, 1)
    for key in ("BENCHMARK.WARMUP_ITERS", "BENCHMARK.NUM_THREADS"):
        _require_range(cfg, key, 0)

    for check in _VALIDATORS:
        check(cfg)


def check_paths(cfg: CfgNode) -> None:
    """Checks that every file and folder the run will read exists, naming the key that points to it."""
    from vitadapt.datasets import DATASET_REGISTRY

    def needs_dir(dataset: str) -> bool:
        return getattr(DATASET_REGISTRY.get(dataset), "NEEDS_DATA_DIR", True)

    if (cfg.TRAIN.ENABLE and needs_dir(cfg.TRAIN.DATASET)) or (cfg.TEST.ENABLE and needs_dir(cfg.TEST.DATASET)):
        path = cfg.DATA.PATH_TO_DATA_DIR
        _require(bool(path), "DATA.PATH_TO_DATA_DIR is empty; point it at the data set folder")
        _require(not g_pathmgr.isfile(path), f"DATA.PATH_TO_DATA_DIR is a file, not a folder: {path}")
        _require(g_pathmgr.isdir(path), f"DATA.PATH_TO_DATA_DIR does not exist: {path}")
    for key in ("TRAIN.CHECKPOINT_FILE_PATH", "TEST.CHECKPOINT_FILE_PATH"):
        node, leaf = key.split(".")
        path = cfg[node][leaf]
        if path and (cfg[node].ENABLE or node == "TRAIN" and cfg.TEST.ENABLE):
            _require(not g_pathmgr.isdir(path), f"{key} is a folder, not a checkpoint file: {path}")
            _require(g_pathmgr.isfile(path), f"{key} does not exist: {path}")


def default_output_dir(cfg_file: str) -> str:
    return os.path.join("runs", os.path.splitext(os.path.basename(cfg_file))[0] if cfg_file else "default")


def load_config(cfg_file: str = "", opts: Iterable[str] = (), check_files: bool = False) -> CfgNode:
    """Defaults <- YAML (with _BASE_) <- overrides, validated. The returned cfg is frozen."""
    cfg = get_cfg()
    if cfg_file:
        merge_file(cfg, cfg_file)
    merge_opts(cfg, list(opts))
    if not cfg.OUTPUT_DIR:
        cfg.OUTPUT_DIR = default_output_dir(cfg_file)
    validate(cfg)
    if cfg.DATA_LOADER.NUM_WORKERS == -1:
        # Resolved here, so that the saved config records the worker count used (it shapes the augmentation streams).
        cfg.DATA_LOADER.NUM_WORKERS = num_workers(cfg)
        if cfg.DATA_LOADER.NUM_WORKERS < AUTO_MAX_WORKERS:
            logger.info("DATA_LOADER.NUM_WORKERS -1 (auto): %d loader workers per process (%d CPUs, %d processes on "
                        "this machine)", cfg.DATA_LOADER.NUM_WORKERS, _machine_cpus(), processes_per_machine(cfg))
    if check_files:
        check_paths(cfg)
    cfg.freeze()
    return cfg


def parse_args(description: str, argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """`--cfg FILE [KEY VALUE ...]`; `--opts KEY VALUE ...` is accepted too, as in PySlowFast."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--cfg", dest="cfg_file", default="", help="YAML config file")
    parser.add_argument("--init_method", default="",
                        help="tcp://HOST:PORT of shard 0 for multi-node runs; env:// under torchrun "
                             "(default: a free local port, or env:// when torchrun set RANK)")
    parser.add_argument("--shard_id", type=int, default=None, help="same as SHARD_ID")
    parser.add_argument("--num_shards", type=int, default=None, help="same as NUM_SHARDS")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], help="KEY VALUE overrides")
    args, rest = parser.parse_known_args(argv)
    flags = [r for r in rest if r.startswith("--")]
    if flags:
        parser.error(f"unknown option {flags[0]}")
    args.opts = list(rest) + list(args.opts)
    if args.shard_id is not None:
        args.opts += ["SHARD_ID", str(args.shard_id)]
    if args.num_shards is not None:
        args.opts += ["NUM_SHARDS", str(args.num_shards)]
    return args
