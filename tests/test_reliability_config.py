"""Config reliability (issue 9): every bad value fails at start-up as one ConfigError line that names the key or
file and shows the value; configs that are valid but make a method degenerate are logged as warnings."""

import logging
import warnings

import pytest
import torch

import vitadapt.config as config_module
from vitadapt.config import get_cfg, load_config, num_workers

try:
    from helpers_unit import CONFIG_FILES, REPO, TINY_OPTS, write
    from helpers_unit import raises_naming as raises_naming_any
except ImportError:  # tests/ imported as a package
    from tests.helpers_unit import CONFIG_FILES, REPO, TINY_OPTS, write
    from tests.helpers_unit import raises_naming as raises_naming_any

DIGITS = str(REPO / "configs" / "demo" / "DeiT_Ti_digits.yaml")
DEIT_S = str(REPO / "configs" / "ImageNet" / "DeiT_S.yaml")


def raises_naming(*needles):
    """pytest.raises(ConfigError) whose one-line message contains every needle."""
    return raises_naming_any(*needles, one_line=True)


def walk(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, dict):
            yield from walk(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


# ------------------------------------------------------------------ 1. None and empty values


@pytest.mark.parametrize("key, raw, shown", [
    ("VIT.QKV_BIAS", "None", "None"),  # used to be accepted, and built a ViT without qkv biases
    ("MODEL.NUM_CLASSES", "None", "None"),
    ("SOLVER.BASE_LR", "None", "None"),
    ("TRAIN.AMP", "None", "None"),
    ("DATA.MEAN", "None", "None"),
    ("SOLVER.BASE_LR", "", "''"),
    ("VIT.DEPTH", "", "''"),
    ("DATA.MEAN", "", "''"),
])
def test_none_or_empty_value_is_refused_naming_the_key(key, raw, shown):
    with raises_naming(key, shown):
        load_config(DIGITS, [key, raw])


def test_null_in_yaml_is_refused_naming_file_and_key(tmp_path):
    path = write(tmp_path / "null.yaml", "VIT:\n  QKV_BIAS: null\n")
    with raises_naming("null.yaml", "VIT.QKV_BIAS", "None"):
        load_config(path)
    path = write(tmp_path / "empty_value.yaml", "SOLVER:\n  BASE_LR:\n")
    with raises_naming("SOLVER.BASE_LR", "None"):
        load_config(path)


def test_no_default_is_none_unless_declared_optional():
    """A None default makes a key optional (it then accepts None); it must be declared with its type."""
    for key, value in walk(get_cfg()):
        if value is None:
            assert key in config_module._DECLARED_TYPES, f"{key} defaults to None: declare it in DECLARED_TYPES"


# ------------------------------------------------------------------ 2. element types of list keys


@pytest.mark.parametrize("key, raw, shown", [
    ("DATA.MEAN", "['a','b','c']", "['a', 'b', 'c']"),
    ("DATA.STD", "[0.5, 'x', 0.5]", "'x'"),
    ("ATS.BLOCKS", "[1.5]", "[1.5]"),
    ("EVIT.LOCATIONS", "[True]", "[True]"),
    ("BENCHMARK.BATCH_SIZES", "[1, 2.5]", "2.5"),
    ("SOLVER.STEPS", "['a']", "['a']"),  # empty default: the element type is declared
    ("SOLVER.LRS", "[1.0, None]", "None"),
    ("AUG.SCALE", "0.5", "0.5"),  # a scalar for a list key
    ("DATA.MEAN", "[[0.5], [0.5], [0.5]]", "[[0.5]"),
])
def test_list_elements_of_the_wrong_type(key, raw, shown):
    with raises_naming(key, "a list of", shown):
        load_config(DIGITS, [key, raw])


def test_list_elements_in_yaml(tmp_path):
    path = write(tmp_path / "mean.yaml", "DATA:\n  MEAN: [a, b, c]\n")
    with raises_naming("mean.yaml", "DATA.MEAN", "['a', 'b', 'c']"):
        load_config(path)
    # PyYAML reads 5e-1 (no dot) as text, also inside a list: it must still become the number.
    cfg = load_config(write(tmp_path / "exp.yaml", "DATA:\n  MEAN: [5e-1, 5e-1, 0.5]\n"))
    assert list(cfg.DATA.MEAN) == [0.5, 0.5, 0.5] and all(isinstance(v, float) for v in cfg.DATA.MEAN)


def test_declared_list_types_convert_ints():
    cfg = load_config(DIGITS, ["SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0, 2.5, 30]",
                               "SOLVER.LRS", "[1, 0.1, 0.01]"])
    assert list(cfg.SOLVER.STEPS) == [0.0, 2.5, 30.0] and all(isinstance(v, float) for v in cfg.SOLVER.LRS)


def test_every_list_key_has_a_known_element_type():
    """The loader reads a list's element type off its default; an empty default needs a declaration."""
    for key, value in walk(get_cfg()):
        if isinstance(value, (list, tuple)):
            kind = config_module._expected_type(key, value)
            assert kind[0] in (bool, int, float, str), f"{key}: declare its element type in DECLARED_TYPES"


# ------------------------------------------------------------------ 3. malformed YAML files and _BASE_


@pytest.mark.parametrize("name, text, needle", [
    ("empty.yaml", "", "empty"),
    ("comments.yaml", "# nothing here\n", "empty"),
    ("list.yaml", "- VIT\n- SOLVER\n", "list"),
    ("scalar.yaml", "hello\n", "str"),
    ("syntax.yaml", "VIT:\n  DEPTH: [1\n", "cannot read"),
])
def test_malformed_yaml_file_is_one_line_naming_the_file(tmp_path, name, text, needle):
    path = write(tmp_path / name, text)
    with raises_naming(path, needle):
        load_config(path)


def test_base_cycle_lists_the_files(tmp_path):
    a = write(tmp_path / "a.yaml", "_BASE_: b.yaml\nVIT:\n  DEPTH: 2\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with raises_naming("cycle", "a.yaml -> ", "b.yaml -> ") as info:
        load_config(a)
    assert str(info.value).count("a.yaml") == 2
    own = write(tmp_path / "own.yaml", "_BASE_: own.yaml\n")
    with raises_naming("cycle", "own.yaml -> ", "own.yaml"):
        load_config(own)


def test_shared_base_is_not_a_cycle(tmp_path):
    write(tmp_path / "root.yaml", "VIT:\n  DEPTH: 3\n")
    write(tmp_path / "left.yaml", "_BASE_: root.yaml\nSOLVER:\n  BASE_LR: 0.01\n")
    write(tmp_path / "right.yaml", "_BASE_: root.yaml\nMODEL:\n  NUM_CLASSES: 7\n")
    cfg = load_config(write(tmp_path / "top.yaml", "_BASE_: [left.yaml, right.yaml]\n"))
    assert (cfg.VIT.DEPTH, cfg.SOLVER.BASE_LR, cfg.MODEL.NUM_CLASSES) == (3, 0.01, 7)


def test_missing_base_names_both_files(tmp_path):
    child = write(tmp_path / "child.yaml", "_BASE_: no_such_base.yaml\n")
    with raises_naming("child.yaml", "no_such_base.yaml", "not found"):
        load_config(child)


@pytest.mark.parametrize("base", ["3", "[base.yaml, 3]", "{a: b}", "''"])
def test_base_must_be_a_file_name_or_a_list_of_them(tmp_path, base):
    write(tmp_path / "base.yaml", "VIT:\n  DEPTH: 3\n")
    child = write(tmp_path / "child.yaml", f"_BASE_: {base}\n")
    with raises_naming("child.yaml", "_BASE_"):
        load_config(child)


def test_error_in_a_base_names_the_base(tmp_path):
    write(tmp_path / "base.yaml", "VIT:\n  QKV_BIAS: maybe\n")
    child = write(tmp_path / "child.yaml", "_BASE_: base.yaml\n")
    with raises_naming("base.yaml", "VIT.QKV_BIAS", "'maybe'"):
        load_config(child)


# ------------------------------------------------------------------ 4. non-finite floats and LR ranges


@pytest.mark.parametrize("key, raw, shown", [
    ("SOLVER.BASE_LR", "1e39", "1e+39"),  # finite in float64, inf in float32
    ("SOLVER.BASE_LR", "nan", "nan"),
    ("SOLVER.BASE_LR", "inf", "inf"),
    ("SOLVER.BASE_LR", "1e999", "inf"),
    ("SOLVER.WEIGHT_DECAY", "-inf", "-inf"),
    ("VIT.MLP_RATIO", "nan", "nan"),
    ("AUG.COLOR_JITTER", "inf", "inf"),
    ("EVIT.KEEP_RATE", "nan", "nan"),
    ("AVIT.GATE_CENTER", "-1e40", "-1e+40"),
    ("DATA.MEAN", "[0.5, float('nan'), 0.5]", "float('nan')"),  # not a literal: refused as text
    ("DATA.STD", "[0.5, 1e39, 0.5]", "1e+39"),
])
def test_non_finite_floats_are_refused(key, raw, shown):
    with raises_naming(key, shown):
        load_config(DIGITS, [key, raw])


def test_non_finite_floats_in_yaml(tmp_path):
    path = write(tmp_path / "nan.yaml", "SOLVER:\n  BASE_LR: .nan\n")
    with raises_naming("nan.yaml", "SOLVER.BASE_LR", "nan"):
        load_config(path)


@pytest.mark.parametrize("std", ["[0.5, 0.0, 0.5]", "[0.5, -0.2, 0.5]"])
def test_std_must_be_positive(std):
    with raises_naming("DATA.STD", "> 0", "[0.5, "):
        load_config(DIGITS, ["DATA.STD", std])


def test_warmup_start_and_cosine_end_lr_ranges():
    with raises_naming("SOLVER.WARMUP_START_LR", "-1e-06"):
        load_config(DIGITS, ["SOLVER.WARMUP_START_LR", "-1e-6"])
    with raises_naming("SOLVER.COSINE_END_LR", "-1e-05"):
        load_config(DIGITS, ["SOLVER.COSINE_END_LR", "-1e-5"])
    # Above the base learning rate: a warm-up that falls, a cosine that rises.
    with raises_naming("SOLVER.WARMUP_START_LR", "0.01", "0.002"):
        load_config(DIGITS, ["SOLVER.WARMUP_START_LR", "0.01"])
    with raises_naming("SOLVER.COSINE_END_LR", "0.01", "0.002"):
        load_config(DIGITS, ["SOLVER.COSINE_END_LR", "0.01"])
    # The comparison uses the scaled learning rate, and shows how it was scaled.
    with raises_naming("SOLVER.COSINE_END_LR", "SOLVER.BASE_LR", "TRAIN.BATCH_SIZE 64", "SOLVER.LR_SCALE_REF_BATCH 512"):
        load_config(DIGITS, ["SOLVER.LR_SCALE_REF_BATCH", "512", "SOLVER.BASE_LR", "1e-4", "SOLVER.COSINE_END_LR", "5e-5"])
    # Edges that are fine: a cosine to 0, a warm-up start that is unused, a constant policy.
    load_config(DIGITS, ["SOLVER.COSINE_END_LR", "0.0", "SOLVER.WARMUP_START_LR", "0.0"])
    load_config(DIGITS, ["SOLVER.WARMUP_EPOCHS", "0.0", "SOLVER.WARMUP_START_LR", "1.0"])
    load_config(DIGITS, ["SOLVER.LR_POLICY", "constant", "SOLVER.COSINE_END_LR", "1.0"])


def test_scaled_learning_rate_overflow():
    with raises_naming("overflows float32", "SOLVER.BASE_LR"):
        load_config(DIGITS, ["SOLVER.LR_SCALE_REF_BATCH", "1", "SOLVER.BASE_LR", "1e37", "TRAIN.BATCH_SIZE", "1000"])


# ------------------------------------------------------------------ 5. every range error shows the value(s)


@pytest.mark.parametrize("key, raw, shown", [
    ("TRAIN.EVAL_PERIOD", "0", "got 0"),
    ("TRAIN.CHECKPOINT_PERIOD", "-1", "got -1"),
    ("TRAIN.KEEP_LAST_K", "-1", "got -1"),
    ("TRAIN.LABEL_SMOOTHING", "1.0", "got 1.0"),
    ("DATA_LOADER.NUM_WORKERS", "-2", "got -2"),
    ("DATA.IN_VAL_CROP_RATIO", "1.5", "got 1.5"),
    ("DATA.IN_VAL_CROP_RATIO", "0", "got 0.0"),
    ("MIXUP.PROB", "1.5", "got 1.5"),
    ("MIXUP.SWITCH_PROB", "-0.5", "got -0.5"),
    ("MIXUP.ALPHA", "-1", "got -1.0"),
    ("AUG.HFLIP", "2", "got 2.0"),
    ("AUG.RE_PROB", "-0.1", "got -0.1"),
    ("AUG.COLOR_JITTER", "-0.4", "got -0.4"),
    ("AUG.RE_COUNT", "0", "got 0"),
    ("AUG.RE_MODE", "'zeros'", "'zeros'"),
    ("MODEL_EMA.DECAY", "1.0", "got 1.0"),
    ("MODEL_EMA.DECAY", "0", "got 0.0"),
    ("BENCHMARK.BATCH_SIZES", "[4, 0]", "[4, 0]"),
    ("BENCHMARK.BATCH_SIZES", "[]", "[]"),
    ("BENCHMARK.NUM_REPEATS", "0", "got 0"),
    ("BENCHMARK.ITERS_PER_REPEAT", "0", "got 0"),
    ("BENCHMARK.WARMUP_ITERS", "-1", "got -1"),
    ("BENCHMARK.NUM_THREADS", "-4", "got -4"),
    ("SOLVER.MAX_EPOCH", "0", "got 0"),
    ("SOLVER.BASE_LR", "0", "got 0.0"),
    ("SOLVER.WEIGHT_DECAY", "-0.05", "got -0.05"),
    ("SOLVER.MOMENTUM", "1.0", "got 1.0"),
    ("SOLVER.BETAS", "[0.9, 1.5]", "[0.9, 1.5]"),
    ("SOLVER.BETAS", "[0.9]", "[0.9]"),
    ("SOLVER.CLIP_GRAD_L2NORM", "-1", "got -1.0"),
    ("SOLVER.LR_SCALE_REF_BATCH", "-512", "got -512"),
    ("RNG_SEED", "-1", "got -1"),
    ("NUM_GPUS", "-1", "got -1"),
    ("NUM_PROCS", "0", "got 0"),
    ("LOG_PERIOD", "0", "got 0"),
    ("MODEL.NUM_CLASSES", "0", "got 0"),
    ("VIT.DEPTH", "-2", "got -2"),
    ("VIT.MLP_RATIO", "0", "got 0.0"),
    ("VIT.ATTN_DROP_RATE", "1.0", "got 1.0"),
    ("DATA.TRAIN_CROP_SIZE", "-32", "(-32)"),
    ("TRAIN.BATCH_SIZE", "0", "got 0"),
    ("TEST.BATCH_SIZE", "-4", "got -4"),
    ("DIST_BACKEND", "'mpi'", "'mpi'"),
])
def test_range_error_shows_the_value(key, raw, shown):
    with raises_naming(key, shown):
        load_config(DIGITS, [key, raw])


@pytest.mark.parametrize("opts, needles", [
    (["SOLVER.WARMUP_EPOCHS", "50"], ["SOLVER.WARMUP_EPOCHS", "SOLVER.MAX_EPOCH=40", "got 50.0"]),
    (["DATA.MEAN", "[0.5, 0.5]"], ["DATA.MEAN [0.5, 0.5]", "DATA.STD [0.5, 0.5, 0.5]", "VIT.IN_CHANS=3"]),
    (["SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0, 10]", "SOLVER.LRS", "[1.0]"],
     ["SOLVER.STEPS [0.0, 10.0]", "SOLVER.LRS [1.0]"]),
    (["SOLVER.LR_POLICY", "steps_with_relative_lrs", "SOLVER.STEPS", "[0, 10]", "SOLVER.LRS", "[1.0, -0.1]"],
     ["SOLVER.LRS", "[1.0, -0.1]"]),
    (["DIST_BACKEND", "nccl"], ["DIST_BACKEND", "NUM_GPUS 0"]),
    (["MIXUP.ENABLE", "True", "MIXUP.ALPHA", "0.0", "MIXUP.CUTMIX_ALPHA", "0.0"], ["MIXUP.ALPHA", "CUTMIX_ALPHA", "0.0"]),
    (["MIXUP.ENABLE", "True", "MODEL.NUM_CLASSES", "1"], ["MODEL.NUM_CLASSES", "got 1"]),
    (["SOLVER.OPTIMIZING_METHOD", "sgd", "SOLVER.NESTEROV", "True", "SOLVER.MOMENTUM", "0.0"],
     ["SOLVER.NESTEROV", "SOLVER.MOMENTUM", "0.0"]),
])
def test_cross_key_errors_show_the_values(opts, needles):
    with raises_naming(*needles):
        load_config(DIGITS, opts)


TINY = TINY_OPTS + ["NUM_GPUS", "0"]
EVIT = TINY + ["MODEL.NAME", "EViTVisionTransformer", "EVIT.LOCATIONS", "[0, 1]"]
ATS = TINY + ["MODEL.NAME", "ATSVisionTransformer", "ATS.BLOCKS", "[0, 1]"]
AVIT = TINY + ["MODEL.NAME", "AViTVisionTransformer", "AVIT.PRIOR_TARGET_DEPTH", "1"]


@pytest.mark.parametrize("opts, needles", [
    (EVIT + ["EVIT.LOCATIONS", "[5]"], ["EVIT.LOCATIONS [5]", "VIT.DEPTH=2"]),
    (EVIT + ["EVIT.SHRINK_EPOCHS", "-1"], ["EVIT.SHRINK_EPOCHS", "(-1.0)"]),
    (EVIT + ["EVIT.KEEP_RATE", "1.5"], ["EVIT.KEEP_RATE", "1.5"]),
    (EVIT + ["VIT.TOKEN_EXECUTION", "masked"], ["VIT.TOKEN_EXECUTION", "'masked'"]),
    (ATS + ["ATS.BLOCKS", "[0, 7]"], ["ATS.BLOCKS [0, 7]", "VIT.DEPTH=2"]),
    (ATS + ["ATS.BUDGETS", "[0.5, 0.5, 0.5]"], ["ATS.BUDGETS [0.5, 0.5, 0.5]", "got 3"]),
    (ATS + ["ATS.BUDGETS", "[-1]"], ["ATS.BUDGETS", "[-1.0]"]),
    (AVIT + ["AVIT.HALTING_EPS", "1.0"], ["AVIT.HALTING_EPS", "1.0"]),
    (AVIT + ["AVIT.PONDER_WEIGHT", "-1"], ["AVIT.PONDER_WEIGHT", "-1.0"]),
    (AVIT + ["AVIT.PRIOR_TARGET_DEPTH", "5"], ["AVIT.PRIOR_TARGET_DEPTH", "got 5", "2"]),
])
def test_method_validator_errors_show_the_values(opts, needles):
    with raises_naming(*needles):
        load_config("", opts)


# ------------------------------------------------------------------ 6. degenerate methods: warnings


def vitadapt_warnings(caplog):
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name.startswith("vitadapt")]


@pytest.mark.parametrize("opts, needles", [
    (AVIT + ["AVIT.GATE_CENTER", "-5.0"], ["AVIT.GATE_CENTER -5", "halts after 1 of VIT.DEPTH=2"]),
    (AVIT + ["AVIT.GATE_CENTER", "0.0"], ["AVIT.GATE_CENTER 0", "halts after 2 of"]),
    (AVIT + ["AVIT.HALTING_EPS", "0.999", "AVIT.GATE_CENTER", "3.0"], ["AVIT.HALTING_EPS 0.999", "halts after 1 of"]),
    (AVIT + ["AVIT.GATE_SCALE", "0.0"], ["AVIT.GATE_SCALE 0", "same halting score"]),
    (EVIT + ["EVIT.KEEP_RATE", "0.05"], ["EVIT.KEEP_RATE 0.05", "block 0", "1 attentive patch token"]),
    (EVIT + ["EVIT.KEEP_RATE", "1.0"], ["EVIT.KEEP_RATE 1", "plain ViT"]),
    (EVIT + ["EVIT.LOCATIONS", "[]"], ["EVIT.LOCATIONS []", "plain ViT"]),
    (ATS + ["ATS.BUDGETS", "[2]"], ["ATS.BUDGETS [2.0]", "block 0", "CLS and 1 patch token"]),
    (ATS + ["ATS.BUDGETS", "[0.0, 0.01]"], ["ATS.BUDGETS [0.0, 0.01]", "block 1"]),
    (ATS + ["ATS.BUDGETS", "[1]"], ["ATS.BUDGETS [1.0]", "ratio"]),
    (ATS + ["ATS.BLOCKS", "[]"], ["ATS.BLOCKS is empty", "plain ViT"]),
])
def test_degenerate_method_config_warns_once(caplog, opts, needles):
    with caplog.at_level(logging.WARNING):
        cfg = load_config("", opts)  # a warning, not an error
    messages = vitadapt_warnings(caplog)
    assert len(messages) == 1, messages
    for needle in needles:
        assert needle in messages[0], (needle, messages[0])
    assert cfg.is_frozen()


@pytest.mark.parametrize("opts", [
    AVIT, AVIT + ["AVIT.GATE_SCALE", "5.0", "AVIT.GATE_CENTER", "5.0"], EVIT, EVIT + ["EVIT.KEEP_RATE", "0.5"],
    ATS, ATS + ["ATS.BUDGETS", "[0.5]"], ATS + ["ATS.BUDGETS", "[12]"],
], ids=["avit", "avit-5-5", "evit", "evit-0.5", "ats", "ats-0.5", "ats-12"])
def test_working_method_configs_do_not_warn(caplog, opts):
    with caplog.at_level(logging.WARNING):
        load_config("", opts)
    assert vitadapt_warnings(caplog) == []


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_configs_do_not_warn(caplog, path):
    with caplog.at_level(logging.WARNING):
        load_config(str(path))
    assert vitadapt_warnings(caplog) == []


# ------------------------------------------------------------------ 7. loader workers fit the machine


def test_num_workers_auto_fits_the_machine(monkeypatch):
    assert get_cfg().DATA_LOADER.NUM_WORKERS == -1
    for cpus, opts, expected in [(2, ["NUM_GPUS", "1"], 2), (64, ["NUM_GPUS", "1"], 4), (64, ["NUM_GPUS", "8"], 4),
                                 (16, ["NUM_GPUS", "8"], 2), (2, ["NUM_GPUS", "0", "NUM_PROCS", "2"], 1),
                                 (1, ["NUM_GPUS", "2"], 0)]:
        monkeypatch.setattr(config_module, "_machine_cpus", lambda: cpus)
        cfg = load_config(DEIT_S, opts)
        assert cfg.DATA_LOADER.NUM_WORKERS == num_workers(cfg) == expected, (cpus, opts)
    # An explicit count is used as given; num_workers also resolves a config that load_config did not build.
    assert load_config(DEIT_S, ["DATA_LOADER.NUM_WORKERS", "3"]).DATA_LOADER.NUM_WORKERS == 3
    monkeypatch.setattr(config_module, "_machine_cpus", lambda: 3)
    assert num_workers(get_cfg()) == 3


def test_imagenet_config_makes_no_torch_worker_warning():
    """torch warns when a DataLoader asks for more workers than this machine's CPUs (the loader is built like this)."""
    cfg = load_config(DEIT_S, ["NUM_GPUS", "1"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.utils.data.DataLoader(list(range(4)), num_workers=cfg.DATA_LOADER.NUM_WORKERS)
    assert not [w for w in caught if "worker processes" in str(w.message)]


# ------------------------------------------------------------------ 8. more of the same


@pytest.mark.parametrize("key, raw, needles", [
    ("VIT.QKV_BIAS", "yes", ["VIT.QKV_BIAS", "True or False", "'yes'"]),
    ("TRAIN.ENABLE", "1", ["TRAIN.ENABLE", "True or False", "got 1"]),
    ("TRAIN.BATCH_SIZE", "'64'", ["TRAIN.BATCH_SIZE", "an integer", "'64'"]),
    ("VIT.DEPTH", "4.0", ["VIT.DEPTH", "an integer", "4.0"]),
    ("SOLVER.BASE_LR", "fast", ["SOLVER.BASE_LR", "a number", "'fast'"]),
    ("SOLVER.BASE_LR", "True", ["SOLVER.BASE_LR", "a number", "True"]),
    ("TRAIN.AMP", "True", ["TRAIN.AMP", "a string", "True", "quote"]),
    ("VIT", "3", ["VIT is a group of keys", "got 3"]),
    ("VIT.DEPTH", str(2**70), ["VIT.DEPTH", "int64"]),
])
def test_wrong_types_name_key_and_value(key, raw, needles):
    with raises_naming(*needles):
        load_config(DIGITS, [key, raw])


def test_yaml_booleans_for_string_keys_get_a_hint(tmp_path):
    path = write(tmp_path / "amp.yaml", "TRAIN:\n  AMP: off\n")  # YAML 1.1 reads `off` as False
    with raises_naming("amp.yaml", "TRAIN.AMP", "False", "quote"):
        load_config(path)
    assert load_config(write(tmp_path / "quoted.yaml", "TRAIN:\n  AMP: 'off'\n")).TRAIN.AMP == "off"


def test_yaml_node_given_a_value_or_nothing(tmp_path):
    with raises_naming("node.yaml", "SOLVER is a group of keys", "0.1"):
        load_config(write(tmp_path / "node.yaml", "SOLVER: 0.1\n"))
    # A node whose keys are all commented out is just empty.
    assert load_config(write(tmp_path / "empty_node.yaml", "SOLVER:\n#  BASE_LR: 0.1\nVIT:\n  DEPTH: 3\n")).VIT.DEPTH == 3


def test_auto_augment_policy_is_checked_at_start_up():
    with raises_naming("AUG.AA_TYPE", "'rand-x9'"):
        load_config(DEIT_S, ["AUG.AA_TYPE", "rand-x9"])
    with raises_naming("AUG.AA_TYPE", "'randaugment'"):
        load_config(DEIT_S, ["AUG.AA_TYPE", "randaugment"])
    assert load_config(DEIT_S, ["AUG.AA_TYPE", ""]).AUG.AA_TYPE == ""  # no auto-augment
    assert load_config(DEIT_S, ["AUG.AA_TYPE", "augmix-m5-w4-d2"]).AUG.AA_TYPE == "augmix-m5-w4-d2"
    load_config(DIGITS, ["AUG.AA_TYPE", "nonsense"])  # AUG.ENABLE False: not used, not checked


def test_paths_of_the_wrong_kind(tmp_path):
    a_file = tmp_path / "weights.pyth"
    a_file.write_bytes(b"x")
    with raises_naming("DATA.PATH_TO_DATA_DIR", "is a file", str(a_file)):
        load_config(DEIT_S, ["DATA.PATH_TO_DATA_DIR", str(a_file)], check_files=True)
    with raises_naming("TEST.CHECKPOINT_FILE_PATH", "is a folder", str(tmp_path)):
        load_config(DIGITS, ["TEST.CHECKPOINT_FILE_PATH", str(tmp_path)], check_files=True)


def test_unknown_key_suggests_the_closest():
    with raises_naming("unknown config key 'SOLVER.BASE_LRR'", "did you mean 'SOLVER.BASE_LR'"):
        load_config(DIGITS, ["SOLVER.BASE_LRR", "0.1"])
    with raises_naming("unknown config key 'MODEL.NAME.X'", "MODEL.NAME is a value"):
        load_config(DIGITS, ["MODEL.NAME.X", "1"])


def test_string_keys_keep_number_like_text_and_nodes_take_dicts():
    cfg = load_config(DIGITS, ["OUTPUT_DIR", "2024", "TEST.SAVE_RESULTS_PATH", "1e-3", "VIT", "{'DEPTH': 2}"])
    assert cfg.OUTPUT_DIR == "2024" and cfg.TEST.SAVE_RESULTS_PATH == "1e-3" and cfg.VIT.DEPTH == 2
    assert cfg.VIT.EMBED_DIM == 96  # the rest of the node is untouched


# ------------------------------------------------------------------ the real command: exit 2, one line, no traceback


@pytest.mark.parametrize("case", ["qkv_none", "empty_yaml", "base_cycle", "lr_nan", "mean_strings", "yaml_list"])
def test_run_net_exits_2_with_one_error_line(run_net, capsys, tmp_path, case):
    cfg_file, opts, needles = DIGITS, [], []
    if case == "qkv_none":
        opts, needles = ["VIT.QKV_BIAS", "None"], ["VIT.QKV_BIAS", "None"]
    elif case == "empty_yaml":
        cfg_file = write(tmp_path / "empty.yaml", "")
        needles = ["empty.yaml", "empty"]
    elif case == "base_cycle":
        cfg_file = write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
        write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
        needles = ["cycle", "a.yaml", "b.yaml"]
    elif case == "lr_nan":
        opts, needles = ["SOLVER.BASE_LR", "nan"], ["SOLVER.BASE_LR", "nan"]
    elif case == "mean_strings":
        opts, needles = ["DATA.MEAN", "['a','b','c']"], ["DATA.MEAN", "['a', 'b', 'c']"]
    elif case == "yaml_list":
        cfg_file = write(tmp_path / "list.yaml", "- 1\n- 2\n")
        needles = ["list.yaml", "list"]
    rc = run_net(["--cfg", cfg_file, "OUTPUT_DIR", str(tmp_path / "out")] + opts)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
