"""vitadapt's Python API (vitadapt/api.py): models by name from the configs, checkpoints loaded as the test job loads
them, timm ViTs adapted to every method (exact against timm with reduction off), refusals, and cost()."""

import argparse
import logging
import subprocess
import sys

import pytest
import torch

import helpers_dvt
import helpers_e2e as h
import vitadapt
from vitadapt.api import UnsupportedModelError, config_file, model_name
from vitadapt.config import ConfigError, load_config
from vitadapt.engine.evaluate import reports
from vitadapt.errors import VitadaptError
from vitadapt.models import build_model, input_shape
from vitadapt.utils import checkpoint as cu

# Sizes every config family accepts (one value per key, whatever the family reads); T2T-ViT's soft split is
# fixed for 224 px, so its families keep that crop.
TINY = {"MODEL.NUM_CLASSES": 5, "VIT.EMBED_DIM": 24, "VIT.DEPTH": 2, "VIT.NUM_HEADS": 2, "VIT.PATCH_SIZE": 8,
        "DATA.TRAIN_CROP_SIZE": 32, "DATA.TEST_CROP_SIZE": 32, "DATA.NUM_FRAMES": 4, "ATS.BLOCKS": [1],
        "EVIT.LOCATIONS": [1], "AVIT.PRIOR_TARGET_DEPTH": 1, "DVT.PATCH_SIZES": [16, 11, 8],
        "DVT.PATCH_PADDINGS": [0, 1, 0], "T2T.TOKEN_DIM": 8, "XVIT.NUM_SEGMENTS": 4, "XVIT.NUM_FRAMES_EMBED": 4,
        "XVIT.POS_EMBED_IMG_SIZE": 32, "TEMPORAL_HEAD.NUM_ATTENTION_HEADS": 2, "TEMPORAL_HEAD.MLP_DIM": 16}
# The vitadapt config of h.timm_vit() (the tiny timm DeiT every adapt test uses: 32 px, patch 8, 48 wide, 2 blocks).
TIMM_TINY = {"MODEL.NUM_CLASSES": len(h.CLASSES), "VIT.PATCH_SIZE": 8, "VIT.EMBED_DIM": 48, "VIT.DEPTH": 2,
             "VIT.NUM_HEADS": 3, "DATA.TRAIN_CROP_SIZE": 32, "DATA.TEST_CROP_SIZE": 32}
NUM_TOKENS = (32 // 8) ** 2 + 1


def tiny(name: str) -> dict:
    return {**TINY, **({"DATA.TRAIN_CROP_SIZE": 224, "DATA.TEST_CROP_SIZE": 224} if "t2t" in name else {})}


def images(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def wide_timm_deit(seed: int = 0, **kwargs):
    """timm's own VisionTransformer (tiny DeiT, no download) with weights drawn wide, so that logits are O(1) and
    the methods' decisions depend on the image."""
    torch.manual_seed(seed)
    model = h.timm_vit(**kwargs)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model


def state_of(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------ names


def test_names_follow_the_config_files():
    assert model_name("ATS_DeiT_S") == "ats_deit_small_patch16_224"
    assert model_name("EViT_DeiT_S_keep0.7_nofuse") == "evit_deit_small_patch16_224_keep0.7_nofuse"
    assert model_name("DeiT_Ti") == "deit_tiny_patch16_224"
    assert model_name("AdaViT_T2T_ViT_19") == "adavit_t2t_vit_19"
    assert model_name("ATS_XViT_B16_16x16_224_K600") == "ats_xvit_b16_16x16_224_k600"


def test_list_models_has_one_sorted_name_per_config():
    names = vitadapt.list_models()
    configs = sorted(p for folder in ("ImageNet", "Kinetics") for p in (h.REPO / "configs" / folder).rglob("*.yaml"))
    assert names == sorted(names) and len(set(names)) == len(names) == len(configs)
    assert sorted(config_file(n) for n in names) == configs
    assert {"deit_small_patch16_224", "ats_deit_small_patch16_224", "evit_deit_small_patch16_224_keep0.7",
            "avit_deit_tiny_patch16_224", "adavit_deit_small_patch16_224", "adavit_t2t_vit_19", "dvt_t2t_vit_12",
            "dvt_deit_small_patch16_224", "t2t_vit_14", "timesformer_divst_8x32_224", "xvit_b16_16x16_224",
            "ats_xvit_b16_16x16_224", "evit_timesformer_jointst_8x32_224"} <= set(names)


@pytest.mark.parametrize("name", vitadapt.list_models())
def test_every_listed_model_builds_and_reports_its_cost(name):
    model = vitadapt.create_model(name, **tiny(name))
    assert type(model).__name__ == load_config(str(config_file(name))).MODEL.NAME
    assert not model.training and model.cfg.VIT.EMBED_DIM == 24 and model.cfg.MODEL.NUM_CLASSES == 5
    with torch.no_grad():
        logits = model(torch.randn(input_shape(model.cfg, 2)))
    assert logits.shape == (2, 5) and bool(torch.isfinite(logits).all())
    cost = vitadapt.cost(model)
    assert cost["gmacs"].shape == (2,) and bool((cost["gmacs"] > 0).all())
    # Every statistic the model reports (as the test job logs it) is in its cost.
    assert ("kept_tokens" in cost) == reports(model, "kept_tokens")
    assert ("token_depth" in cost) == reports(model, "token_depth")
    if reports(model, "kept_tokens"):
        assert cost["kept_tokens"].shape == (2, 2)


def test_missing_configs_folder_is_an_error_that_says_where_it_looked(monkeypatch, tmp_path):
    import vitadapt.api

    monkeypatch.setattr(vitadapt.api, "CONFIGS_DIR", tmp_path / "configs")
    with pytest.raises(VitadaptError, match="configs folder is not at .*pip install -e"):
        vitadapt.list_models()


def test_unknown_name_is_refused_with_the_closest_names():
    with pytest.raises(ConfigError, match="unknown model name 'evit_deit_small_patch16_224_keep07'") as info:
        vitadapt.create_model("evit_deit_small_patch16_224_keep07")
    assert "evit_deit_small_patch16_224_keep0.7" in str(info.value)


@pytest.mark.parametrize("overrides, needles", [
    ({"VIT.DEPHT": 2}, ["'VIT.DEPHT'", "VIT.DEPTH"]),
    ({"num_classes": 3}, ["'num_classes'", "MODEL.NUM_CLASSES"]),
    ({"VIT.DEPTH": "two"}, ["VIT.DEPTH", "integer"]),
    ({"TEST.CHECKPOINT_FILE_PATH": "x.pth"}, ["checkpoint=", "TEST.CHECKPOINT_FILE_PATH"]),
], ids=["misspelt", "option-style", "wrong-type", "two-checkpoints"])
def test_bad_overrides_are_refused_naming_them(overrides, needles):
    with pytest.raises(ConfigError) as info:
        vitadapt.create_model("deit_tiny_patch16_224", checkpoint="y.pth" if "TEST.CHECKPOINT_FILE_PATH" in overrides
                              else None, **overrides)
    for needle in needles:
        assert needle in str(info.value)


def test_create_model_is_seeded_like_run_net_and_leaves_the_callers_rng_alone():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = (vitadapt.create_model("deit_tiny_patch16_224", **TIMM_TINY) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(first.cfg.RNG_SEED)  # run_net's jobs seed RNG_SEED before build_model
    reference = build_model(load_config(str(config_file("deit_tiny_patch16_224")),
                                        [x for kv in TIMM_TINY.items() for x in kv]))
    for key, value in reference.state_dict().items():
        assert torch.equal(first.state_dict()[key], value) and torch.equal(second.state_dict()[key], value), key


@pytest.mark.parametrize("name", ["deit_tiny_patch16_224", "timesformer_divst_8x32_224", "xvit_b16_16x16_224",
                                  "dvt_deit_small_patch16_224"])
def test_cost_needs_a_forward_first(name):
    with pytest.raises(RuntimeError, match="run one first"):
        vitadapt.cost(vitadapt.create_model(name, **tiny(name)))


def test_cost_lets_errors_other_than_a_missing_forward_through(monkeypatch):
    model = vitadapt.create_model("deit_tiny_patch16_224", **TIMM_TINY)
    with torch.no_grad():
        model(images())

    def broken():
        raise AttributeError("a bug in macs_per_image")

    monkeypatch.setattr(model, "macs_per_image", broken)
    with pytest.raises(AttributeError, match="a bug in macs_per_image"):
        vitadapt.cost(model)


def test_import_vitadapt_stays_light():
    out = subprocess.run([sys.executable, "-c", "import sys, vitadapt; print(sorted({'torch', 'timm'} & set(sys.modules)))"],
                         capture_output=True, text=True, check=True, cwd=str(h.REPO))
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ checkpoints, as run_net's test job loads them


def split_qkv(sd: dict) -> dict:
    """AdaViT's official layout: blocks.i.attn.{query,key,value} instead of qkv."""
    out = {}
    for key, value in sd.items():
        if ".attn.qkv." in key:
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[key.replace(".qkv.", f".{name}.")] = part.clone()
        else:
            out[key] = value
    return out


def official_file(kind: str, path, name: str) -> str:
    """The tiny model `name` with wide random weights, saved as its official code saves it."""
    model = vitadapt.create_model(name, **TIMM_TINY, **({"ATS.BLOCKS": [1]} if kind == "ats" else {}))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    sd = state_of(model)
    if kind == "deit":  # DeiT main.py
        obj = {"model": sd, "optimizer": {}, "epoch": 299, "args": argparse.Namespace(model="deit_tiny")}
    elif kind == "ats":  # the official ATS (PySlowFast) trainer, with its all-zero out_zero_mask per ATS block
        obj = {"epoch": 30, "model_state": {**sd, "blocks.1.attn.out_zero_mask": torch.zeros(1, 48)},
               "optimizer_state": {}, "cfg": "MODEL:\n  MODEL_NAME: VisionTransformer\n"}
    else:  # AdaViT (timm's saver): state_dict and state_dict_ema, q / k / v apart; the test job reads the EMA
        obj = {"state_dict": split_qkv(sd), "state_dict_ema": split_qkv({k: v + 0.05 for k, v in sd.items()})}
    torch.save(obj, path)
    return str(path)


@pytest.mark.parametrize("kind, name, extra", [
    ("deit", "deit_small_patch16_224", {}),
    ("ats", "ats_deit_small_patch16_224", {"ATS.BLOCKS": "[1]"}),
    ("adavit", "adavit_deit_small_patch16_224", {}),
])
def test_checkpoint_gives_the_logits_of_run_nets_test_job(tmp_path, image_folder, run_net, kind, name, extra):
    checkpoint = official_file(kind, tmp_path / f"{kind}.pth", name)
    out = tmp_path / "out"
    opts = h.tiny_opts(image_folder, out, TRAIN__ENABLE=False, TEST__SAVE_RESULTS_PATH="predictions.pth")
    opts += [x for kv in extra.items() for x in kv]
    assert run_net(["--cfg", str(config_file(name)), "TEST.CHECKPOINT_FILE_PATH", checkpoint] + opts) == 0
    expected = torch.load(out / "predictions.pth", weights_only=True)["logits"]

    model = vitadapt.create_model(name, checkpoint=checkpoint, **dict(zip(opts[0::2], opts[1::2])))
    assert not model.training
    assert model.load_report.container == ("'state_dict_ema'" if kind == "adavit" else
                                           "'model_state'" if kind == "ats" else "'model'")
    from PIL import Image

    transform = h.timm_eval_transform()
    batch = torch.stack([transform(Image.open(p).convert("RGB")) for p, _ in h.list_split(image_folder)])
    with torch.no_grad():
        logits = model(batch)
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() < 1e-5


def test_dvt_exits_at_the_thresholds_an_official_checkpoint_stores(tmp_path):
    opts = {**TINY, "MODEL.NUM_CLASSES": 3, "DVT.BUDGET_POINT": 7, "DVT.THRESHOLD_SOURCE": "checkpoint"}
    weights = state_of(vitadapt.create_model("dvt_deit_small_patch16_224", **TINY | {"MODEL.NUM_CLASSES": 3}))
    stored = helpers_dvt.random_dynamic_threshold()
    path = helpers_dvt.official_release(tmp_path / "dvt.pth.tar", weights, stored)
    model = vitadapt.create_model("dvt_deit_small_patch16_224", checkpoint=path, **opts)
    assert torch.equal(model.thresholds, stored[6, :2])


def test_dvt_thresholds_from_a_checkpoint_need_one():
    with pytest.raises(ConfigError, match=r"DVT.THRESHOLD_SOURCE checkpoint.*create_model\(\.\.\., checkpoint=PATH\)"):
        vitadapt.create_model("dvt_deit_small_patch16_224", **TINY, **{"DVT.BUDGET_POINT": 7,
                                                                       "DVT.THRESHOLD_SOURCE": "checkpoint"})


@pytest.mark.parametrize("dvt, searches", [
    ({}, False), ({"DVT.BUDGET_POINT": 7}, True), ({"DVT.BUDGET_GMACS": 1.0}, True),
    ({"DVT.THRESHOLDS": [0.5, 0.6]}, False)], ids=["none", "budget-point", "budget-gmacs", "thresholds"])
def test_create_model_and_the_test_job_agree_on_which_thresholds_need_a_search(caplog, dvt, searches):
    from vitadapt.engine.exits import needs_threshold_search

    with caplog.at_level(logging.WARNING):
        model = vitadapt.create_model("dvt_deit_small_patch16_224", **TINY, **dvt)
    assert needs_threshold_search(model.cfg) == searches  # the rule the test job's prepare_exits follows
    assert any("search on training images" in r.getMessage() for r in caplog.records) == searches
    assert (model.thresholds is not None) == ("DVT.THRESHOLDS" in dvt)


def test_dvt_whose_config_searches_thresholds_runs_every_exit_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        model = vitadapt.create_model("dvt_xvit_b16_16x16_224", **TINY)
    assert model.thresholds is None
    assert any("DVT.BUDGET_POINT 10" in r.getMessage() and "every exit runs" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------------ adapt(): exact with reduction off


@pytest.mark.parametrize("method, options", [
    ("deit", {}),
    ("none", {}),
    ("evit", {"keep_rate": 1.0, "locations": [0, 1]}),
    ("ats", {"blocks": []}),
    ("avit", {"gate_center": 1e4, "prior_target_depth": 1}),  # no token ever reaches the halting threshold
    ("adavit", {"head_threshold": 1e-6, "layer_threshold": 1e-6, "token_threshold": 1e-6}),  # every decision: keep
    ("adavit", {"head": False, "layer": False, "token": False}),
], ids=["deit", "none", "evit", "ats", "avit", "adavit-keep-all", "adavit-off"])
def test_adapt_without_reduction_gives_timm_logits(method, options):
    timm_model = wide_timm_deit()
    x = images()
    with torch.no_grad():
        expected = timm_model(x)
    timm_model.train()  # the user's model, in training: adapt() must leave its mode (and weights) alone
    before = state_of(timm_model)
    with torch.no_grad():
        model = vitadapt.adapt(timm_model, method, **options)
        logits = model(x)
    assert not model.training and type(model).__name__ == model.cfg.MODEL.NAME
    assert expected.abs().mean() > 0.3  # logits of size, so that the tolerance means something
    assert (logits - expected).abs().max().item() < 1e-5
    cost = vitadapt.cost(model)
    if "kept_tokens" in cost:
        assert bool((cost["kept_tokens"] == NUM_TOKENS).all())
    if "token_depth" in cost:
        assert bool((cost["token_depth"] == 2).all())
    dense = vitadapt.adapt(timm_model, "deit")
    dense(x)
    assert torch.allclose(cost["gmacs"], vitadapt.cost(dense)["gmacs"], rtol=0.01)  # AdaViT adds its decision heads
    after = state_of(timm_model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in timm_model.modules())


def test_adapt_starts_new_parameters_as_fine_tuning_from_a_deit_file_does(tmp_path):
    timm_model = wide_timm_deit()
    model = vitadapt.adapt(timm_model, "adavit")
    weights = timm_model.state_dict()
    assert model.new_parameters == sorted(set(model.state_dict()) - set(weights))
    assert model.new_parameters and all("_select." in k for k in model.new_parameters)
    # run_net's fine-tuning: seeded build_model, then TRAIN.CHECKPOINT_FILE_PATH loaded with a classifier reset allowed.
    path = tmp_path / "deit.pth"
    torch.save({"model": state_of(timm_model)}, path)
    torch.manual_seed(model.cfg.RNG_SEED)
    reference = build_model(model.cfg)
    report = cu.load_weights(reference, str(path), reset_head_on_mismatch=True)
    assert any("decision heads newly initialised" in line for line in report.converted)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert vitadapt.adapt(timm_model, "evit", locations=[1]).new_parameters == []


def timm_created_vit(**overlay):
    """A tiny ViT built by timm.create_model, so that it has a pretrained_cfg: vit_tiny_patch16_224's default tag
    (augreg, mean / std 0.5), with `overlay` over it."""
    import timm

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=48, depth=2,
                             num_heads=3, num_classes=3, pretrained_cfg_overlay=overlay).eval()


def test_adapt_takes_the_timm_models_preprocessing():
    import numpy as np
    from PIL import Image
    from timm.data import create_transform, resolve_model_data_config

    from vitadapt.datasets.transforms import build_transform

    timm_model = timm_created_vit(interpolation="bilinear", crop_pct=0.95)
    model = vitadapt.adapt(timm_model, "evit", locations=[1])
    d = model.cfg.DATA
    assert (d.MEAN, d.STD, d.IN_VAL_CROP_RATIO, d.INTERPOLATION) == ([0.5] * 3, [0.5] * 3, 0.95, "bilinear")
    # vitadapt's eval transform of model.cfg is timm's for this model (at the model's input size).
    timm_transform = create_transform(**{**resolve_model_data_config(timm_model), "input_size": (3, 32, 32)})
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (45, 60, 3), dtype=np.uint8))
    assert torch.equal(build_transform(model.cfg, is_train=False)(image), timm_transform(image))


def test_adapt_without_pretrained_cfg_keeps_the_default_preprocessing_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        model = vitadapt.adapt(h.timm_vit(), "deit")
    defaults = load_config("").DATA
    assert (model.cfg.DATA.MEAN, model.cfg.DATA.STD) == (defaults.MEAN, defaults.STD)
    assert any("no pretrained_cfg" in r.getMessage() and "DATA.MEAN" in r.getMessage() for r in caplog.records)


def test_adapt_names_the_pretrained_cfg_entry_the_config_refuses():
    with pytest.raises(ConfigError) as info:
        vitadapt.adapt(timm_created_vit(interpolation="lanczos"), "deit")
    assert "DATA.INTERPOLATION" in str(info.value) and "timm_model.pretrained_cfg['interpolation']" in str(info.value)


# ------------------------------------------------------------------ adapt(): with reduction, = the config's model


@pytest.mark.parametrize("method, options, name, overrides", [
    ("evit", {"keep_rate": 0.5, "locations": [0]}, "evit_deit_tiny_patch16_224",
     {"EVIT.KEEP_RATE": 0.5, "EVIT.LOCATIONS": [0]}),
    ("ats", {"blocks": [0], "budgets": [0.5]}, "ats_deit_tiny_patch16_224", {"ATS.BLOCKS": [0], "ATS.BUDGETS": [0.5]}),
    ("avit", {"gate_center": 1.0, "prior_target_depth": 1}, "avit_deit_tiny_patch16_224",
     {"AVIT.GATE_CENTER": 1.0, "AVIT.PRIOR_TARGET_DEPTH": 1}),
    ("adavit", {}, "adavit_deit_tiny_patch16_224", {}),
])
def test_adapt_with_reduction_is_the_configs_model_and_costs_less(method, options, name, overrides):
    timm_model = wide_timm_deit()
    x = images()
    model = vitadapt.adapt(timm_model, method, **options)
    reference = vitadapt.create_model(name, **TIMM_TINY, **overrides)
    reference.load_state_dict(model.state_dict())  # strict: the same parameters
    dense = vitadapt.adapt(timm_model, "deit")
    with torch.no_grad():
        logits, expected = model(x), reference(x)
        dense(x)
    assert (logits - expected).abs().max().item() < 1e-5
    cost, reference_cost = vitadapt.cost(model), vitadapt.cost(reference)
    assert torch.equal(cost["kept_tokens"], reference_cost["kept_tokens"])
    assert torch.allclose(cost["gmacs"], reference_cost["gmacs"])
    assert bool((cost["gmacs"] < vitadapt.cost(dense)["gmacs"]).all())
    assert bool((cost["kept_tokens"].min(dim=1).values < NUM_TOKENS).all())


# ------------------------------------------------------------------ adapt(): refusals


@pytest.mark.parametrize("kwargs, reason", [
    ({"init_values": 1e-5}, "LayerScale"),
    ({"qk_norm": True}, "qk-norm"),
    ({"reg_tokens": 4}, "4 register tokens"),
    ({"class_token": False, "global_pool": "avg"}, "no CLS token"),
    ({"global_pool": "avg"}, "global_pool 'avg'"),
    ({"global_pool": "map"}, "global_pool 'map'"),
    ({"no_embed_class": True}, "no_embed_class=True"),
    ({"pre_norm": True}, "pre-norm"),
    ({"fc_norm": True}, "fc_norm"),
    ({"final_norm": False}, "final_norm=False"),
    ({"pos_embed": "none"}, "no position embedding"),
    ({"dynamic_img_pad": True}, "dynamic_img_pad=True"),
    ({"act_layer": "gelu_tanh"}, "exact GELU"),
    ({"proj_bias": False}, "proj_bias=False"),
    ({"scale_attn_norm": True}, "scale_attn_norm"),
    ({"scale_mlp_norm": True}, "scale_mlp_norm"),
    ({"norm_layer": "rmsnorm"}, "RmsNorm"),
    ({"norm_layer": torch.nn.LayerNorm}, "eps 1e-05"),
    ({"patch_drop_rate": 0.1}, "patch dropout"),
    ({"pos_drop_rate": 0.1}, "dropout rates differ"),
    ({"num_classes": 0}, "no classifier"),
    ({"img_size": (32, 48)}, "square images"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_adapt_refuses_what_it_cannot_run_exactly(kwargs, reason):
    timm_model = h.timm_vit(**kwargs)
    with pytest.raises(UnsupportedModelError) as info:
        vitadapt.adapt(timm_model, "evit")
    assert reason in str(info.value)


def test_adapt_refuses_another_patch_embedding():
    timm_model = h.timm_vit()
    timm_model.patch_embed = torch.nn.Sequential(torch.nn.Conv2d(3, 48, 8, stride=8), torch.nn.Flatten(2))
    with pytest.raises(UnsupportedModelError, match="patch embedding torch.nn.modules.container.Sequential"):
        vitadapt.adapt(timm_model, "evit")


def test_adapt_refuses_other_model_classes():
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.resnet import BasicBlock, ResNet

    for model in (VisionTransformerDistilled(**h.TINY_VIT), ResNet(BasicBlock, [1, 1, 1, 1], num_classes=3)):
        with pytest.raises(UnsupportedModelError, match=f"{type(model).__name__} is another class"):
            vitadapt.adapt(model, "ats")


@pytest.mark.parametrize("method, options, error, needles", [
    ("dvt", {}, UnsupportedModelError, ["DVT is a cascade of three ViTs"]),
    ("tome", {}, ConfigError, ["unknown method 'tome'", "evit"]),
    ("evit", {"keep": 0.5}, ConfigError, ["unknown option(s) keep", "keep_rate (EVIT.KEEP_RATE)"]),
    ("deit", {"keep_rate": 0.5}, ConfigError, ["unknown option(s) keep_rate", "valid options: none"]),
    ("avit", {}, ConfigError, ["AVIT.PRIOR_TARGET_DEPTH must be in [1, VIT.DEPTH)", "option prior_target_depth"]),
    ("evit", {"keep_rate": "half"}, ConfigError, ["EVIT.KEEP_RATE must be a number", "option keep_rate"]),
])
def test_adapt_refuses_bad_methods_and_options(method, options, error, needles):
    with pytest.raises(error) as info:
        vitadapt.adapt(h.timm_vit(), method, **options)
    for needle in needles:
        assert needle in str(info.value)
