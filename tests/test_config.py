"""vitadapt.config: defaults, YAML with _BASE_, overrides, validation, path checks."""

import os
import re

import pytest

import vitadapt.config as config_module
from vitadapt.config import ConfigError, check_paths, get_cfg, load_config, parse_args, register_config

try:
    from helpers_unit import CONFIG_FILES, REPO, raises_naming, write
except ImportError:  # tests/ imported as a package
    from tests.helpers_unit import CONFIG_FILES, REPO, raises_naming, write

DEIT_S = str(REPO / "configs" / "ImageNet" / "DeiT_S.yaml")
DEIT_TI = str(REPO / "configs" / "ImageNet" / "DeiT_Ti.yaml")
DIGITS = str(REPO / "configs" / "demo" / "DeiT_Ti_digits.yaml")




# ------------------------------------------------------------------ every shipped config


def test_configs_are_found():
    names = {p.name for p in CONFIG_FILES}
    assert {"DeiT_S.yaml", "DeiT_Ti.yaml", "DeiT_B.yaml", "DeiT_Ti_digits.yaml"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_config_loads_validates_and_dump_round_trips(path, tmp_path):
    cfg = load_config(str(path))
    assert cfg.is_frozen()
    assert cfg.OUTPUT_DIR == os.path.join("runs", path.stem)
    config_module.validate(cfg)  # validating again is a no-op, not an error
    dumped = write(tmp_path / "dumped.yaml", cfg.dump())
    again = load_config(dumped)
    assert again == cfg
    assert again.dump() == cfg.dump()


def test_digits_demo_needs_no_data_dir():
    cfg = load_config(DIGITS, check_files=True)
    assert cfg.TRAIN.DATASET == cfg.TEST.DATASET == "digits"
    assert cfg.DATA.PATH_TO_DATA_DIR == ""
    check_paths(cfg)  # must not raise: the digits data set is bundled


# ------------------------------------------------------------------ _BASE_ inheritance


def test_base_inheritance_deit_ti_changes_only_width():
    small, tiny = load_config(DEIT_S), load_config(DEIT_TI)
    assert (small.VIT.EMBED_DIM, small.VIT.NUM_HEADS) == (384, 6)
    assert (tiny.VIT.EMBED_DIM, tiny.VIT.NUM_HEADS) == (192, 3)
    # Everything else comes from DeiT_S.yaml (not from the defaults, which differ for these keys).
    assert tiny.VIT.DROP_PATH_RATE == small.VIT.DROP_PATH_RATE == 0.1
    assert tiny.TRAIN.BATCH_SIZE == 1024 and tiny.TRAIN.LABEL_SMOOTHING == 0.1
    assert tiny.MIXUP.ENABLE and tiny.AUG.ENABLE and tiny.NUM_GPUS == 8
    assert tiny.SOLVER.LR_SCALE_REF_BATCH == 512 and tiny.SOLVER.COSINE_AFTER_WARMUP is False
    differing = {
        f"{node}.{key}"
        for node in small
        if isinstance(small[node], type(small))
        for key in small[node]
        if small[node][key] != tiny[node][key]
    } | {key for key in small if not isinstance(small[key], type(small)) and small[key] != tiny[key]}
    assert differing == {"VIT.EMBED_DIM", "VIT.NUM_HEADS", "OUTPUT_DIR"}


def test_base_is_resolved_relative_to_the_child_and_child_wins(tmp_path, monkeypatch):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "base.yaml", "VIT:\n  DEPTH: 3\n  EMBED_DIM: 96\nSOLVER:\n  BASE_LR: 0.01\n")
    child = write(tmp_path / "sub" / "child.yaml", "_BASE_: ../base.yaml\nVIT:\n  DEPTH: 5\n")
    monkeypatch.chdir(REPO)  # a cwd that has no base.yaml
    cfg = load_config(child)
    assert cfg.VIT.DEPTH == 5  # child overrides base
    assert cfg.VIT.EMBED_DIM == 96 and cfg.SOLVER.BASE_LR == 0.01  # inherited
    assert cfg.VIT.NUM_HEADS == 6  # default untouched
    assert cfg.OUTPUT_DIR == os.path.join("runs", "child")


# ------------------------------------------------------------------ overrides


def test_trailing_key_value_overrides():
    cfg = load_config(DIGITS, ["VIT.DEPTH", "2", "SOLVER.BASE_LR", "1e-3", "TRAIN.AMP", "bf16",
                               "DATA.MEAN", "[0.1, 0.2, 0.3]"])
    assert cfg.VIT.DEPTH == 2
    assert cfg.SOLVER.BASE_LR == pytest.approx(1e-3)
    assert cfg.TRAIN.AMP == "bf16"
    assert list(cfg.DATA.MEAN) == [0.1, 0.2, 0.3]
    assert cfg.VIT.EMBED_DIM == 96  # from the YAML, not overridden


def test_overrides_beat_the_yaml_and_later_overrides_win():
    cfg = load_config(DIGITS, ["MODEL.NUM_CLASSES", "7", "MODEL.NUM_CLASSES", "9"])
    assert cfg.MODEL.NUM_CLASSES == 9


def test_parse_args_trailing_pairs_and_opts():
    args = parse_args("test", ["--cfg", DIGITS, "SOLVER.BASE_LR", "1e-3", "--opts", "VIT.DEPTH", "2",
                               "TRAIN.BATCH_SIZE", "32"])
    assert args.cfg_file == DIGITS
    assert args.opts == ["SOLVER.BASE_LR", "1e-3", "VIT.DEPTH", "2", "TRAIN.BATCH_SIZE", "32"]
    cfg = load_config(args.cfg_file, args.opts)
    assert cfg.SOLVER.BASE_LR == pytest.approx(1e-3)
    assert cfg.VIT.DEPTH == 2 and cfg.TRAIN.BATCH_SIZE == 32


def test_parse_args_only_opts():
    args = parse_args("test", ["--cfg", DIGITS, "--opts", "MODEL.NUM_CLASSES", "5"])
    assert load_config(args.cfg_file, args.opts).MODEL.NUM_CLASSES == 5


def test_parse_args_shard_flags_become_overrides():
    args = parse_args("test", ["--cfg", DIGITS, "--shard_id", "1", "--num_shards", "2"])
    cfg = load_config(args.cfg_file, args.opts)
    assert (cfg.SHARD_ID, cfg.NUM_SHARDS) == (1, 2)


def test_parse_args_rejects_unknown_flag():
    with pytest.raises(SystemExit):
        parse_args("test", ["--cfg", DIGITS, "--no_such_flag", "1"])


def test_int_for_float_key_is_accepted_as_float():
    cfg = load_config(DIGITS, ["SOLVER.BASE_LR", "3"])
    assert cfg.SOLVER.BASE_LR == 3.0 and isinstance(cfg.SOLVER.BASE_LR, float)


def test_int_for_float_key_in_yaml_is_accepted_as_float(tmp_path):
    path = write(tmp_path / "ints.yaml", "SOLVER:\n  BASE_LR: 3\n  WARMUP_EPOCHS: 2\nDATA:\n  MEAN: [0, 1, 1]\n")
    cfg = load_config(path)
    # PyYAML reads "5e-4" (no dot) as a string; it must still become the float.
    assert load_config(write(tmp_path / "exp.yaml", "SOLVER:\n  BASE_LR: 5e-4\n")).SOLVER.BASE_LR == 5e-4
    assert cfg.SOLVER.BASE_LR == 3.0 and isinstance(cfg.SOLVER.BASE_LR, float)
    assert isinstance(cfg.SOLVER.WARMUP_EPOCHS, float)
    assert list(cfg.DATA.MEAN) == [0.0, 1.0, 1.0] and all(isinstance(v, float) for v in cfg.DATA.MEAN)


def test_loading_does_not_change_the_defaults():
    load_config(DIGITS, ["VIT.DEPTH", "2", "OUTPUT_DIR", "somewhere"])
    fresh = load_config()
    assert fresh.VIT.DEPTH == get_cfg().VIT.DEPTH == 12
    assert fresh.OUTPUT_DIR == os.path.join("runs", "default")


# ------------------------------------------------------------------ error paths


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("opts, key", [
    (["FOO.BAR", "1"], "FOO.BAR"),
    (["VIT.EMBED_DIMS", "1"], "VIT.EMBED_DIMS"),
    (["MODEL.NAME.X", "1"], "MODEL.NAME.X"),
    (["LOG_PERIODS", "1"], "LOG_PERIODS"),
])
def test_unknown_key_override(opts, key):
    with raises_naming(key, "unknown"):
        load_config(DIGITS, opts)


def test_unknown_key_in_yaml(tmp_path):
    path = write(tmp_path / "bad.yaml", "VIT:\n  DEPTH: 2\n  EMBED_DIMS: 64\n")
    with raises_naming("VIT.EMBED_DIMS"):
        load_config(path)


def test_unknown_key_in_yaml_base(tmp_path):
    write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LRR: 0.1\n")
    child = write(tmp_path / "child.yaml", "_BASE_: base.yaml\nVIT:\n  DEPTH: 2\n")
    with raises_naming("SOLVER.BASE_LRR"):
        load_config(child)


def test_unknown_top_level_node_in_yaml(tmp_path):
    path = write(tmp_path / "bad.yaml", "NOT_A_NODE:\n  X: 1\n")
    with raises_naming("NOT_A_NODE"):
        load_config(path)


def test_wrong_type_override():
    with raises_naming("MODEL.NUM_CLASSES"):
        load_config(DIGITS, ["MODEL.NUM_CLASSES", "abc"])


def test_wrong_type_in_yaml(tmp_path):
    path = write(tmp_path / "bad.yaml", "TRAIN:\n  BATCH_SIZE: lots\n")
    with raises_naming("TRAIN.BATCH_SIZE"):
        load_config(path)


def test_odd_number_of_override_tokens():
    with raises_naming("VIT.DEPTH"):
        load_config(DIGITS, ["SOLVER.BASE_LR", "0.1", "VIT.DEPTH"])


def test_missing_config_file(tmp_path):
    missing = str(tmp_path / "nope.yaml")
    with raises_naming(missing):
        load_config(missing)


def test_missing_base_file(tmp_path):
    child = write(tmp_path / "child.yaml", "_BASE_: no_such_base.yaml\n")
    with raises_naming("child.yaml"):
        load_config(child)


def test_shard_id_out_of_range():
    with raises_naming("SHARD_ID", "NUM_SHARDS"):
        load_config(DIGITS, ["NUM_SHARDS", "2", "SHARD_ID", "2"])
    with raises_naming("SHARD_ID"):
        load_config(DIGITS, ["SHARD_ID", "1"])


def test_batch_not_divisible_by_world_size():
    with raises_naming("TRAIN.BATCH_SIZE", "64", "3"):
        load_config("", ["NUM_GPUS", "0", "NUM_PROCS", "3", "TRAIN.BATCH_SIZE", "64"])
    # With a divisible train batch, the test batch is checked too.
    with raises_naming("TEST.BATCH_SIZE"):
        load_config("", ["NUM_GPUS", "0", "NUM_PROCS", "3", "TRAIN.BATCH_SIZE", "63", "TEST.BATCH_SIZE", "100"])
    # Shards multiply the world size.
    with raises_naming("TRAIN.BATCH_SIZE"):
        load_config("", ["NUM_GPUS", "2", "NUM_SHARDS", "3", "TRAIN.BATCH_SIZE", "8", "TEST.BATCH_SIZE", "12"])
    ok = load_config("", ["NUM_GPUS", "0", "NUM_PROCS", "3", "TRAIN.BATCH_SIZE", "63", "TEST.BATCH_SIZE", "99"])
    assert config_module.world_size(ok) == 3


def test_embed_dim_not_divisible_by_heads():
    with raises_naming("VIT.EMBED_DIM", "VIT.NUM_HEADS"):
        load_config(DIGITS, ["VIT.EMBED_DIM", "100"])


@pytest.mark.parametrize("key", ["DATA.TRAIN_CROP_SIZE", "DATA.TEST_CROP_SIZE"])
def test_crop_not_multiple_of_patch(key):
    with raises_naming(key, "VIT.PATCH_SIZE"):
        load_config(DIGITS, [key, "30"])


@pytest.mark.parametrize("key, value", [
    ("MODEL.NAME", "NoSuchNet"),
    ("MODEL.LOSS_FUNC", "no_such_loss"),
    ("TRAIN.DATASET", "no_such_data"),
    ("TEST.DATASET", "no_such_data"),
    ("SOLVER.LR_POLICY", "linear"),
    ("SOLVER.OPTIMIZING_METHOD", "lamb"),
    ("TRAIN.AMP", "fp32"),
    ("DIST_BACKEND", "mpi"),
    ("DATA.INTERPOLATION", "lanczos"),
])
def test_unknown_choice(key, value):
    with raises_naming(key, value):
        load_config(DIGITS, [key, value])


def test_steps_policy_needs_matching_steps_and_lrs():
    with raises_naming("SOLVER.STEPS"):
        load_config(DIGITS, ["SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0, 10]",
                             "SOLVER.LRS", "[1.0]"])
    cfg = load_config(DIGITS, ["SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0, 10]",
                               "SOLVER.LRS", "[1.0, 0.1]"])
    assert list(cfg.SOLVER.STEPS) == [0, 10]


# ------------------------------------------------------------------ check_paths


def test_check_paths_empty_data_dir():
    with raises_naming("DATA.PATH_TO_DATA_DIR"):
        load_config(DEIT_S, check_files=True)


def test_check_paths_missing_data_dir(tmp_path):
    missing = str(tmp_path / "imagenet")
    with raises_naming("DATA.PATH_TO_DATA_DIR", missing):
        load_config(DEIT_S, ["DATA.PATH_TO_DATA_DIR", missing], check_files=True)
    # Without check_files nothing touches the file system.
    assert load_config(DEIT_S, ["DATA.PATH_TO_DATA_DIR", missing]).DATA.PATH_TO_DATA_DIR == missing


def test_check_paths_existing_data_dir(tmp_path):
    cfg = load_config(DEIT_S, ["DATA.PATH_TO_DATA_DIR", str(tmp_path)], check_files=True)
    assert cfg.DATA.PATH_TO_DATA_DIR == str(tmp_path)


def test_check_paths_missing_test_checkpoint(tmp_path):
    missing = str(tmp_path / "weights.pyth")
    with raises_naming("TEST.CHECKPOINT_FILE_PATH", missing):
        load_config(DIGITS, ["TEST.CHECKPOINT_FILE_PATH", missing], check_files=True)
    (tmp_path / "weights.pyth").write_bytes(b"x")
    load_config(DIGITS, ["TEST.CHECKPOINT_FILE_PATH", missing], check_files=True)


def test_check_paths_missing_train_checkpoint(tmp_path):
    missing = str(tmp_path / "pretrained.pth")
    with raises_naming("TRAIN.CHECKPOINT_FILE_PATH", missing):
        load_config(DIGITS, ["TRAIN.CHECKPOINT_FILE_PATH", missing], check_files=True)


# ------------------------------------------------------------------ output dir, freezing, method nodes


def test_output_dir_defaults_to_runs_config_stem():
    assert load_config(DIGITS).OUTPUT_DIR == os.path.join("runs", "DeiT_Ti_digits")
    assert load_config(DEIT_TI).OUTPUT_DIR == os.path.join("runs", "DeiT_Ti")
    assert load_config(DIGITS, ["OUTPUT_DIR", "/tmp/elsewhere"]).OUTPUT_DIR == "/tmp/elsewhere"


def test_returned_config_is_frozen():
    cfg = load_config(DIGITS)
    assert cfg.is_frozen()
    with pytest.raises(AttributeError):
        cfg.OUTPUT_DIR = "x"
    with pytest.raises(AttributeError):
        cfg.SOLVER.BASE_LR = 1.0
    assert cfg.SOLVER.BASE_LR == 2e-3


def test_register_config_adds_node_and_validator(monkeypatch):
    from fvcore.common.config import CfgNode

    def add_node(cfg):
        cfg.MYMETHOD = CfgNode()
        cfg.MYMETHOD.RATIO = 0.5

    def check(cfg):
        if not 0 < cfg.MYMETHOD.RATIO <= 1:
            raise ConfigError(f"MYMETHOD.RATIO must be in (0, 1], got {cfg.MYMETHOD.RATIO}")

    monkeypatch.setattr(config_module, "_NODE_BUILDERS", dict(config_module._NODE_BUILDERS))
    monkeypatch.setattr(config_module, "_VALIDATORS", list(config_module._VALIDATORS))
    register_config("MYMETHOD", add_node, check)
    assert load_config(DIGITS, ["MYMETHOD.RATIO", "1"]).MYMETHOD.RATIO == 1.0
    with raises_naming("MYMETHOD.RATIO"):
        load_config(DIGITS, ["MYMETHOD.RATIO", "2.0"])


def test_error_messages_are_one_line():
    for opts in (["FOO", "1"], ["SHARD_ID", "3"], ["VIT.EMBED_DIM", "100"], ["TRAIN.AMP", "x"]):
        with pytest.raises(ConfigError) as info:
            load_config(DIGITS, opts)
        assert "\n" not in str(info.value)
        assert re.search(r"\w", str(info.value))


@pytest.mark.parametrize("key,value", [
    ("LOG_PERIOD", "0"), ("VIT.PATCH_SIZE", "0"), ("VIT.NUM_HEADS", "0"), ("VIT.DEPTH", "0"),
    ("VIT.DROP_PATH_RATE", "1.5"), ("VIT.DROP_RATE", "-0.1"), ("AUG.SCALE", "[0.5]"), ("AUG.SCALE", "[0.9,0.2]"),
    ("MIXUP.PROB", "2.0"), ("TEST.SPLIT", "vall"), ("TEST.SPLIT", "train"), ("BENCHMARK.NUM_REPEATS", "0"),
    ("BENCHMARK.BATCH_SIZES", "[]"), ("VIT.TOKEN_EXECUTION", "sparse"),
])
def test_out_of_range_values_fail_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=re.escape(key)):
        load_config("", [key, value])


def test_steps_must_rise():
    with pytest.raises(ConfigError, match="SOLVER.STEPS"):
        load_config("", ["SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0,30,20]",
                         "SOLVER.LRS", "[1.0,0.1,0.01]"])


def test_mixup_needs_an_even_batch_per_process():
    with pytest.raises(ConfigError, match="TRAIN.BATCH_SIZE per process"):
        load_config("", ["MIXUP.ENABLE", "True", "NUM_GPUS", "0", "NUM_PROCS", "2", "TRAIN.BATCH_SIZE", "6"])
    assert load_config("", ["MIXUP.ENABLE", "True", "NUM_GPUS", "0", "NUM_PROCS", "2", "TRAIN.BATCH_SIZE", "8"])


def test_config_differences_names_changed_keys():
    a = load_config("", [])
    b = load_config("", ["SOLVER.BASE_LR", "0.1", "VIT.DEPTH", "6", "OUTPUT_DIR", "elsewhere"])
    assert config_module.config_differences(a, b) == ["OUTPUT_DIR", "SOLVER.BASE_LR", "VIT.DEPTH"]
    assert config_module.config_differences(a, a.clone()) == []
