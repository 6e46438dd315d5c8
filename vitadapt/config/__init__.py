"""Config: defaults + method nodes + YAML (with _BASE_) + command-line KEY VALUE overrides, then checks.

    cfg = load_config("configs/demo/DeiT_Ti_digits.yaml", ["SOLVER.BASE_LR", "1e-3"])

Every error names the key or file at fault and is raised as ConfigError, which tools/ turn into a
one-line message and a non-zero exit.
"""

import argparse
import os
from typing import Callable, Dict, Iterable, List, Optional, Sequence

from fvcore.common.config import CfgNode
from iopath.common.file_io import g_pathmgr

from vitadapt.errors import VitadaptError

from .defaults import get_defaults

__all__ = ["CfgNode", "ConfigError", "config_differences", "RESUMABLE_CHANGES", "get_cfg", "load_config", "register_config", "validate",
           "check_paths", "parse_args", "world_size"]


class ConfigError(VitadaptError, ValueError):
    """A config value is unknown, of the wrong type, inconsistent or points to a missing file."""


_NODE_BUILDERS: Dict[str, Callable[[CfgNode], None]] = {}
_VALIDATORS: List[Callable[[CfgNode], None]] = []


def register_config(name: str, add_node: Callable[[CfgNode], None],
                    validator: Optional[Callable[[CfgNode], None]] = None) -> None:
    """Lets a method module add its own node (e.g. "EVIT") and checks, instead of editing defaults.py."""
    _NODE_BUILDERS[name] = add_node
    if validator is not None:
        _VALIDATORS.append(validator)


def get_cfg() -> CfgNode:
    """A fresh copy of every default, method nodes included."""
    # Importing the models registers their config nodes.
    import vitadapt.models  # noqa: F401

    cfg = get_defaults().clone()
    for add_node in _NODE_BUILDERS.values():
        add_node(cfg)
    return cfg


def _coerce(default, value):
    """yacs refuses `BASE_LR 3` for a float key; accept ints there, and name the key on any mismatch."""
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)) and default:
        if all(isinstance(d, float) for d in default):
            return type(value)(float(v) if isinstance(v, int) and not isinstance(v, bool) else v for v in value)
    return value


def _coerce_tree(default: CfgNode, loaded: dict, prefix: str = "") -> None:
    for key, value in list(loaded.items()):
        full = prefix + key
        if key not in default:
            raise ConfigError(f"unknown config key '{full}'")
        if isinstance(value, dict):
            if not isinstance(default[key], CfgNode):
                raise ConfigError(f"config key '{full}' is a value, not a node")
            _coerce_tree(default[key], value, full + ".")
        else:
            loaded[key] = _coerce(default[key], value)


def _merge(cfg: CfgNode, other: CfgNode) -> None:
    try:
        cfg.merge_from_other_cfg(other)
    except (KeyError, ValueError, AssertionError) as e:
        raise ConfigError(str(e).strip('"')) from None


def merge_file(cfg: CfgNode, path: str) -> None:
    if not g_pathmgr.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        loaded = cfg.load_yaml_with_base(path, allow_unsafe=False)
    except Exception as e:  # YAML syntax errors, missing _BASE_ files
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    _coerce_tree(cfg, loaded)
    _merge(cfg, CfgNode(loaded))


def merge_opts(cfg: CfgNode, opts: Sequence[str]) -> None:
    if len(opts) % 2:
        raise ConfigError(f"overrides must be KEY VALUE pairs; '{opts[-1]}' has no value")
    for key, raw in zip(opts[0::2], opts[1::2]):
        target = cfg
        for part in key.split(".")[:-1]:
            if part not in target or not isinstance(target[part], CfgNode):
                raise ConfigError(f"unknown config key '{key}'")
            target = target[part]
        leaf = key.split(".")[-1]
        if leaf not in target:
            raise ConfigError(f"unknown config key '{key}'")
        value = _coerce(target[leaf], CfgNode._decode_cfg_value(raw))
        tree: dict = {leaf: value}
        for part in reversed(key.split(".")[:-1]):
            tree = {part: tree}
        _merge(cfg, CfgNode(tree))


# Keys that may change when a run resumes: where and how it runs and logs, not what it trains.
RESUMABLE_CHANGES = ("OUTPUT_DIR", "NUM_GPUS", "NUM_PROCS", "NUM_SHARDS", "SHARD_ID", "DIST_BACKEND", "LOG_PERIOD",
                     "LOG_MODEL_INFO", "SOLVER.MAX_EPOCH", "TRAIN.EVAL_PERIOD", "TRAIN.CHECKPOINT_PERIOD",
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


def world_size(cfg: CfgNode) -> int:
    per_machine = cfg.NUM_GPUS if cfg.NUM_GPUS > 0 else cfg.NUM_PROCS
    return per_machine * cfg.NUM_SHARDS


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def validate(cfg: CfgNode) -> None:
    """Checks that need no file system or hardware: ranges, choices and cross-key consistency."""
    from vitadapt.datasets import DATASET_REGISTRY
    from vitadapt.losses import LOSS_REGISTRY
    from vitadapt.models import MODEL_REGISTRY

    _require(cfg.NUM_GPUS >= 0, f"NUM_GPUS must be >= 0, got {cfg.NUM_GPUS}")
    _require(cfg.NUM_PROCS >= 1, f"NUM_PROCS must be >= 1, got {cfg.NUM_PROCS}")
    _require(cfg.NUM_SHARDS >= 1, f"NUM_SHARDS must be >= 1, got {cfg.NUM_SHARDS}")
    _require(0 <= cfg.SHARD_ID < cfg.NUM_SHARDS,
             f"SHARD_ID ({cfg.SHARD_ID}) must be in [0, NUM_SHARDS={cfg.NUM_SHARDS})")
    _require(cfg.DIST_BACKEND in ("auto", "nccl", "gloo"),
             f"DIST_BACKEND must be auto, nccl or gloo, got '{cfg.DIST_BACKEND}'")
    _require(not (cfg.NUM_GPUS == 0 and cfg.DIST_BACKEND == "nccl"), "DIST_BACKEND nccl needs NUM_GPUS > 0")
    world = world_size(cfg)
    for node in ("TRAIN", "TEST"):
        key, batch = f"{node}.BATCH_SIZE", cfg[node].BATCH_SIZE
        _require(batch >= 1, f"{key} must be >= 1, got {batch}")
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
    _require(cfg.MODEL.NUM_CLASSES >= 1, f"MODEL.NUM_CLASSES must be >= 1, got {cfg.MODEL.NUM_CLASSES}")

    _require(cfg.LOG_PERIOD >= 1, f"LOG_PERIOD must be >= 1, got {cfg.LOG_PERIOD}")
    v = cfg.VIT
    for key in ("PATCH_SIZE", "EMBED_DIM", "DEPTH", "NUM_HEADS", "IN_CHANS"):
        _require(v[key] >= 1, f"VIT.{key} must be >= 1, got {v[key]}")
    _require(v.MLP_RATIO > 0, f"VIT.MLP_RATIO must be > 0, got {v.MLP_RATIO}")
    for key in ("DROP_RATE", "ATTN_DROP_RATE", "DROP_PATH_RATE", "HEAD_DROP_RATE"):
        _require(0 <= v[key] < 1, f"VIT.{key} must be in [0, 1), got {v[key]}")
    _require(v.TOKEN_EXECUTION in ("packed", "masked"),
             f"VIT.TOKEN_EXECUTION must be packed or masked, got '{v.TOKEN_EXECUTION}'")
    _require(v.EMBED_DIM % v.NUM_HEADS == 0,
             f"VIT.EMBED_DIM ({v.EMBED_DIM}) must be divisible by VIT.NUM_HEADS ({v.NUM_HEADS})")
    for key in ("TRAIN_CROP_SIZE", "TEST_CROP_SIZE"):
        size = cfg.DATA[key]
        _require(size > 0 and size % v.PATCH_SIZE == 0,
                 f"DATA.{key} ({size}) must be a positive multiple of VIT.PATCH_SIZE ({v.PATCH_SIZE})")
    _require(len(cfg.DATA.MEAN) == v.IN_CHANS and len(cfg.DATA.STD) == v.IN_CHANS,
             f"DATA.MEAN and DATA.STD need VIT.IN_CHANS={v.IN_CHANS} values")
    _require(0 < cfg.DATA.IN_VAL_CROP_RATIO <= 1, "DATA.IN_VAL_CROP_RATIO must be in (0, 1]")
    _require(cfg.DATA.INTERPOLATION in ("bilinear", "bicubic", "nearest"),
             f"DATA.INTERPOLATION must be bilinear, bicubic or nearest, got '{cfg.DATA.INTERPOLATION}'")

    s = cfg.SOLVER
    _require(s.LR_POLICY in ("cosine", "steps_with_relative_lrs", "constant"),
             f"SOLVER.LR_POLICY must be cosine, steps_with_relative_lrs or constant, got '{s.LR_POLICY}'")
    if s.LR_POLICY == "steps_with_relative_lrs":
        _require(len(s.STEPS) == len(s.LRS) and len(s.STEPS) > 0 and s.STEPS[0] == 0
                 and list(s.STEPS) == sorted(s.STEPS),
                 "SOLVER.STEPS and SOLVER.LRS must have the same length and STEPS must rise from 0")
    _require(s.OPTIMIZING_METHOD in ("sgd", "adamw"),
             f"SOLVER.OPTIMIZING_METHOD must be sgd or adamw, got '{s.OPTIMIZING_METHOD}'")
    _require(s.MAX_EPOCH >= 1, f"SOLVER.MAX_EPOCH must be >= 1, got {s.MAX_EPOCH}")
    _require(0 <= s.WARMUP_EPOCHS <= s.MAX_EPOCH, "SOLVER.WARMUP_EPOCHS must be in [0, SOLVER.MAX_EPOCH]")
    _require(s.BASE_LR > 0, f"SOLVER.BASE_LR must be > 0, got {s.BASE_LR}")
    _require(len(s.BETAS) == 2, "SOLVER.BETAS needs two values")

    _require(cfg.TRAIN.AMP in ("off", "fp16", "bf16"), f"TRAIN.AMP must be off, fp16 or bf16, got '{cfg.TRAIN.AMP}'")
    _require(cfg.TRAIN.EVAL_PERIOD >= 1, "TRAIN.EVAL_PERIOD must be >= 1")
    _require(cfg.TRAIN.CHECKPOINT_PERIOD >= 1, "TRAIN.CHECKPOINT_PERIOD must be >= 1")
    _require(cfg.TRAIN.KEEP_LAST_K >= 0, "TRAIN.KEEP_LAST_K must be >= 0")
    _require(0 <= cfg.TRAIN.LABEL_SMOOTHING < 1, "TRAIN.LABEL_SMOOTHING must be in [0, 1)")
    _require(cfg.DATA_LOADER.NUM_WORKERS >= 0, "DATA_LOADER.NUM_WORKERS must be >= 0")
    _require(not (cfg.MIXUP.ENABLE and cfg.MODEL.NUM_CLASSES < 2), "MIXUP.ENABLE needs MODEL.NUM_CLASSES >= 2")
    _require(not cfg.MIXUP.ENABLE or (cfg.TRAIN.BATCH_SIZE // world) % 2 == 0,
             f"MIXUP.ENABLE pairs images: TRAIN.BATCH_SIZE per process ({cfg.TRAIN.BATCH_SIZE // world}) must be even")
    _require(0 <= cfg.MIXUP.PROB <= 1 and 0 <= cfg.MIXUP.SWITCH_PROB <= 1,
             "MIXUP.PROB and MIXUP.SWITCH_PROB must be in [0, 1]")
    _require(len(cfg.AUG.SCALE) == 2 and 0 < cfg.AUG.SCALE[0] <= cfg.AUG.SCALE[1] <= 1,
             f"AUG.SCALE must be [min, max] with 0 < min <= max <= 1, got {list(cfg.AUG.SCALE)}")
    _require(0 <= cfg.AUG.HFLIP <= 1 and 0 <= cfg.AUG.RE_PROB <= 1, "AUG.HFLIP and AUG.RE_PROB must be in [0, 1]")
    _require(cfg.TEST.SPLIT in ("val", "test"), f"TEST.SPLIT must be val or test, got '{cfg.TEST.SPLIT}'")
    _require(0 < cfg.MODEL_EMA.DECAY < 1, "MODEL_EMA.DECAY must be in (0, 1)")
    b = cfg.BENCHMARK
    _require(len(b.BATCH_SIZES) > 0 and all(x >= 1 for x in b.BATCH_SIZES), "BENCHMARK.BATCH_SIZES must be >= 1")
    _require(b.NUM_REPEATS >= 1 and b.ITERS_PER_REPEAT >= 1 and b.WARMUP_ITERS >= 0,
             "BENCHMARK.NUM_REPEATS and ITERS_PER_REPEAT must be >= 1, WARMUP_ITERS >= 0")

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
        _require(g_pathmgr.isdir(path), f"DATA.PATH_TO_DATA_DIR does not exist: {path}")
    for key in ("TRAIN.CHECKPOINT_FILE_PATH", "TEST.CHECKPOINT_FILE_PATH"):
        node, leaf = key.split(".")
        path = cfg[node][leaf]
        if path and (cfg[node].ENABLE or node == "TRAIN" and cfg.TEST.ENABLE):
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
