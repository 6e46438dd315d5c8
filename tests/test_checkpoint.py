"""vitadapt.utils.checkpoint and vitadapt.models.convert: training checkpoints and foreign weight files."""

import argparse
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer as TimmViT

from vitadapt.models.convert import CheckpointMismatchError, LoadReport, extract_state_dict, load_into_model
from vitadapt.utils.checkpoint import (CheckpointError, checkpoint_path, last_checkpoint, list_checkpoints,
                                       load_file, load_weights, resume, save_checkpoint)

try:
    from helpers_unit import TINY, assert_state_equal, clone_state, tiny_cfg, tiny_vit
except ImportError:  # tests/ imported as a package
    from tests.helpers_unit import TINY, assert_state_equal, clone_state, tiny_cfg, tiny_vit


def trained(seed=0, steps=1, **overrides):
    """A tiny model and an AdamW optimizer with real state (exp_avg, step) after `steps` updates."""
    model = tiny_vit(seed=seed, **overrides)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
        optimizer.step()
    return model, optimizer


def draw():
    """Numbers from every RNG a training run uses; the Gaussian draws also exercise the cached values."""
    return (torch.rand(4), torch.randn(3), np.random.rand(3), np.random.randn(3), random.random(),
            random.gauss(0, 1))


def assert_draws_equal(a, b):
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3])
    assert a[4] == b[4] and a[5] == b[5]


def scramble_rngs(seed=12345):
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


# ====================================================================== save / resume


def test_save_and_resume_round_trip(tmp_path):
    out = str(tmp_path / "run")
    model, optimizer = trained(seed=0, steps=2)
    # Leave a cached Gaussian in numpy and Python so that the state is more than the key array.
    np.random.randn(1)
    random.gauss(0, 1)
    path = save_checkpoint(out, 3, model, optimizer, cfg=tiny_cfg())
    assert path == checkpoint_path(out, 3) == os.path.join(out, "checkpoints", "checkpoint_epoch_00003.pyth")
    expected_draws = draw()
    expected_model, expected_opt = clone_state(model), optimizer.state_dict()

    scramble_rngs()
    other, other_opt = trained(seed=1, steps=1)
    assert not torch.equal(other.pos_embed, model.pos_embed)
    epoch = resume(last_checkpoint(out), other, other_opt)

    assert epoch == 3
    assert_draws_equal(draw(), expected_draws)
    assert_state_equal(other.state_dict(), expected_model)
    restored = other_opt.state_dict()
    assert restored["param_groups"] == expected_opt["param_groups"]
    assert set(restored["state"]) == set(expected_opt["state"])
    for index, state in expected_opt["state"].items():
        for key, value in state.items():
            assert torch.equal(restored["state"][index][key], value), (index, key)
    assert float(restored["state"][0]["step"]) == 2.0


def test_resume_continues_training_identically(tmp_path):
    out = str(tmp_path / "run")
    model, optimizer = trained(seed=0)
    images = torch.randn(2, 3, 32, 32)
    save_checkpoint(out, 1, model, optimizer)

    def step(m, opt):
        opt.zero_grad()
        m(images + torch.rand(1)).logsumexp(-1).mean().backward()  # consumes the restored RNG too
        opt.step()
        return clone_state(m)

    reference = step(model, optimizer)
    scramble_rngs()
    other, other_opt = trained(seed=7)
    resume(last_checkpoint(out), other, other_opt)
    assert_state_equal(step(other, other_opt), reference)


def test_checkpoint_contents(tmp_path):
    out = str(tmp_path)
    model, optimizer = trained()
    cfg = tiny_cfg()
    state = load_file(save_checkpoint(out, 2, model, optimizer, cfg=cfg))
    assert {"epoch", "model_state", "optimizer_state", "rng_states", "cfg"} <= set(state)
    assert state["epoch"] == 2 and state["cfg"] == cfg.dump()
    assert_state_equal(state["model_state"], clone_state(model))


def test_atomic_write_leaves_no_tmp_file(tmp_path):
    out = str(tmp_path)
    model, optimizer = trained()
    for epoch in (1, 2):
        save_checkpoint(out, epoch, model, optimizer)
    assert sorted(os.listdir(os.path.join(out, "checkpoints"))) == ["checkpoint_epoch_00001.pyth",
                                                                     "checkpoint_epoch_00002.pyth"]


def test_failed_write_never_leaves_a_checkpoint_behind(tmp_path, monkeypatch):
    out = str(tmp_path)
    model, optimizer = trained()
    first = save_checkpoint(out, 1, model, optimizer)

    def crash(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        save_checkpoint(out, 2, model, optimizer)
    assert not os.path.exists(checkpoint_path(out, 2))
    assert last_checkpoint(out) == first


def test_saving_the_same_epoch_again_replaces_the_file(tmp_path):
    out = str(tmp_path)
    old, old_opt = trained(seed=0)
    save_checkpoint(out, 1, old, old_opt)
    new, new_opt = trained(seed=1)
    path = save_checkpoint(out, 1, new, new_opt)
    assert os.listdir(os.path.dirname(path)) == ["checkpoint_epoch_00001.pyth"]
    assert_state_equal(load_file(path)["model_state"], clone_state(new))


def test_keep_last_k_prunes_old_checkpoints(tmp_path):
    out = str(tmp_path)
    model, optimizer = trained()
    folder = os.path.join(out, "checkpoints")
    os.makedirs(folder)
    (tmp_path / "checkpoints" / "best.pyth").write_bytes(b"not ours")
    for epoch in range(1, 6):
        save_checkpoint(out, epoch, model, optimizer, keep_last_k=2)
    assert sorted(os.listdir(folder)) == ["best.pyth", "checkpoint_epoch_00004.pyth", "checkpoint_epoch_00005.pyth"]
    assert [e for e, _ in list_checkpoints(out)] == [4, 5]
    # 0 keeps everything.
    save_checkpoint(out, 6, model, optimizer, keep_last_k=0)
    save_checkpoint(out, 7, model, optimizer)
    assert [e for e, _ in list_checkpoints(out)] == [4, 5, 6, 7]


def test_last_checkpoint_picks_highest_epoch_ignoring_other_files(tmp_path):
    out = str(tmp_path)
    assert last_checkpoint(out) is None  # no checkpoints folder yet
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    assert last_checkpoint(out) is None
    for name in ("checkpoint_epoch_00002.pyth", "checkpoint_epoch_00010.pyth", "checkpoint_epoch_00003.pyth",
                 "z_best_checkpoint_epoch_00099.pyth", "checkpoint_epoch_00050.pyth.tmp",
                 "checkpoint_epoch_00060.pth", "checkpoint_epoch_00070.pyth.bak", "notes.txt"):
        (folder / name).write_bytes(b"")
    (folder / "checkpoint_epoch_00080.pyth.d").mkdir()
    assert last_checkpoint(out) == str(folder / "checkpoint_epoch_00010.pyth")
    assert [e for e, _ in list_checkpoints(out)] == [2, 3, 10]


def test_last_checkpoint_orders_numerically_not_by_save_time(tmp_path):
    model, optimizer = trained()
    out = str(tmp_path)
    save_checkpoint(out, 12, model, optimizer)
    save_checkpoint(out, 9, model, optimizer)
    assert last_checkpoint(out) == checkpoint_path(out, 12)


def test_resume_rejects_weights_only_file(tmp_path):
    model, optimizer = trained()
    path = str(tmp_path / "weights.pth")
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="weights.pth"):
        resume(path, model, optimizer)


def test_resume_with_ema(tmp_path):
    out = str(tmp_path)
    model, optimizer = trained(seed=0)
    ema = SimpleNamespace(module=tiny_vit(seed=3))
    save_checkpoint(out, 1, model, optimizer, ema=ema)
    other, other_opt = trained(seed=1)
    other_ema = SimpleNamespace(module=tiny_vit(seed=4))
    resume(last_checkpoint(out), other, other_opt, ema=other_ema)
    assert_state_equal(other_ema.module.state_dict(), clone_state(ema.module))
    assert_state_equal(other.state_dict(), clone_state(model))
    # EMA asked for, but the checkpoint has none.
    save_checkpoint(out, 2, model, optimizer)
    with pytest.raises(CheckpointError, match="EMA"):
        resume(last_checkpoint(out), other, other_opt, ema=other_ema)


def test_load_weights_prefers_ema_when_asked(tmp_path):
    model, optimizer = trained(seed=0)
    ema = SimpleNamespace(module=tiny_vit(seed=3))
    path = save_checkpoint(str(tmp_path), 1, model, optimizer, ema=ema)
    plain, from_ema = tiny_vit(seed=5), tiny_vit(seed=5)
    assert load_weights(plain, path).container == "'model_state'"
    load_weights(from_ema, path, prefer_ema=True)
    assert_state_equal(plain.state_dict(), clone_state(model))
    assert_state_equal(from_ema.state_dict(), clone_state(ema.module))


def test_resume_unwraps_ddp_like_wrapper(tmp_path):
    model, optimizer = trained(seed=0)
    wrapped = SimpleNamespace(module=model)
    path = save_checkpoint(str(tmp_path), 1, wrapped, optimizer)
    assert all(not k.startswith("module.") for k in load_file(path)["model_state"])
    other, other_opt = trained(seed=2)
    assert resume(path, SimpleNamespace(module=other), other_opt) == 1
    assert_state_equal(other.state_dict(), clone_state(model))


# ====================================================================== load_weights: layouts


def test_load_deit_file_with_argparse_namespace(tmp_path):
    source, optimizer = trained(seed=0)
    path = str(tmp_path / "deit_tiny.pth")
    torch.save({"model": source.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 3,
                "args": argparse.Namespace(lr=5e-4, model="deit_tiny_patch16_224")}, path)
    with pytest.raises(Exception):  # what torch.load does by default: the Namespace is refused
        torch.load(path)
    target = tiny_vit(seed=1)
    report = load_weights(target, path)
    assert isinstance(report, LoadReport)
    assert report.container == "'model'" and report.source == path
    assert report.missing == report.unexpected == report.resized == [] and not report.head_reset
    assert_state_equal(target.state_dict(), clone_state(source))
    assert load_file(path)["args"].lr == 5e-4


def test_load_plain_timm_state_dict_gives_timm_logits(tmp_path):
    torch.manual_seed(0)
    timm_model = TimmViT(**TINY).eval()
    path = str(tmp_path / "timm.pth")
    torch.save(timm_model.state_dict(), path)
    target = tiny_vit(seed=1).eval()
    assert load_weights(target, path).container == "top level"
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(target(images), timm_model(images), atol=1e-5)


@pytest.mark.parametrize("layout", ["module_top", "module_in_model", "state_dict_ema", "state_dict", "model_ema"])
def test_load_other_layouts(tmp_path, layout):
    source = tiny_vit(seed=0)
    sd = source.state_dict()
    prefixed = {"module." + k: v for k, v in sd.items()}
    obj, container = {
        "module_top": (prefixed, "top level"),
        "module_in_model": ({"model": prefixed, "epoch": 1}, "'model'"),
        "state_dict_ema": ({"state_dict_ema": sd, "epoch": 10, "arch": "vit"}, "'state_dict_ema'"),
        "state_dict": ({"state_dict": prefixed, "epoch": 10}, "'state_dict'"),
        "model_ema": ({"model_ema": sd}, "'model_ema'"),
    }[layout]
    path = str(tmp_path / "weights.pth")
    torch.save(obj, path)
    target = tiny_vit(seed=1)
    assert load_weights(target, path).container == container
    assert_state_equal(target.state_dict(), clone_state(source))


def test_extract_state_dict_prefers_model_over_ema():
    a, b = tiny_vit(seed=0).state_dict(), tiny_vit(seed=1).state_dict()
    sd, where = extract_state_dict({"model": a, "model_ema": b})
    assert where == "'model'" and torch.equal(sd["pos_embed"], a["pos_embed"])


# ====================================================================== load_weights: adaptation and errors


def test_pos_embed_is_interpolated_for_another_resolution(tmp_path, caplog):
    source = tiny_vit(seed=0)  # 32px: 4x4 grid
    path = str(tmp_path / "at32.pth")
    torch.save({"model": source.state_dict()}, path)
    target = tiny_vit(seed=1, img_size=48)  # 6x6 grid
    with caplog.at_level("INFO", logger="vitadapt.utils.checkpoint"):
        report = load_weights(target, path)
    assert len(report.resized) == 1 and "pos_embed" in report.resized[0]
    assert "(1, 17, 48)" in report.resized[0] and "(1, 37, 48)" in report.resized[0]
    assert any("interpolated" in line and "pos_embed" in line for line in report.lines())
    assert "pos_embed" in caplog.text and "interpolated" in caplog.text
    expected = resample_abs_pos_embed(source.pos_embed.detach(), [6, 6], [4, 4], num_prefix_tokens=1)
    assert torch.allclose(target.pos_embed, expected)
    assert torch.equal(target.pos_embed[0, 0], source.pos_embed[0, 0].detach())  # CLS position is not resampled
    assert_state_equal(target.state_dict(), clone_state(source), skip=("pos_embed",))
    # The 48px model built from 32px weights computes what the 32px model computes on 48px images.
    images = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        assert torch.allclose(target.eval()(images), source.eval()(images), atol=1e-5)


def test_head_of_other_size_raises(tmp_path):
    path = str(tmp_path / "in1k.pth")
    torch.save({"model": tiny_vit(seed=0, num_classes=1000).state_dict()}, path)
    target = tiny_vit(seed=1, num_classes=10)
    before = clone_state(target)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(target, path)
    assert "head.weight" in str(info.value) and "head.bias" in str(info.value)
    assert "in1k.pth" in str(info.value)
    assert_state_equal(target.state_dict(), before)  # nothing was loaded


def test_head_reset_on_mismatch_keeps_fresh_head(tmp_path):
    source = tiny_vit(seed=0, num_classes=1000)
    path = str(tmp_path / "in1k.pth")
    torch.save({"model": source.state_dict()}, path)
    target = tiny_vit(seed=1, num_classes=10)
    fresh_head = clone_state(target.head)
    report = load_weights(target, path, reset_head_on_mismatch=True)
    assert report.head_reset and report.missing == [] and report.unexpected == []
    assert any("re-initialised" in line for line in report.lines())
    assert_state_equal(target.head.state_dict(), fresh_head)
    assert_state_equal(target.state_dict(), clone_state(source), skip=("head.weight", "head.bias"))


def test_head_reset_does_not_hide_other_shape_mismatches(tmp_path):
    path = str(tmp_path / "wide.pth")
    torch.save(tiny_vit(seed=0, num_classes=5, mlp_ratio=2.0).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="mlp.fc1.weight"):
        load_weights(tiny_vit(seed=1), path, reset_head_on_mismatch=True)


def test_same_head_is_loaded_even_with_reset_allowed(tmp_path):
    source = tiny_vit(seed=0)
    path = str(tmp_path / "same.pth")
    torch.save(source.state_dict(), path)
    target = tiny_vit(seed=1)
    assert not load_weights(target, path, reset_head_on_mismatch=True).head_reset
    assert_state_equal(target.state_dict(), clone_state(source))


def test_missing_keys_are_named(tmp_path):
    sd = tiny_vit(seed=0).state_dict()
    del sd["norm.weight"], sd["blocks.1.mlp.fc2.bias"]
    path = str(tmp_path / "partial.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(tiny_vit(seed=1), path)
    assert "norm.weight" in str(info.value) and "blocks.1.mlp.fc2.bias" in str(info.value)
    assert "missing" in str(info.value)


def test_unexpected_keys_are_named(tmp_path):
    sd = tiny_vit(seed=0).state_dict()
    sd["dist_token"] = torch.zeros(1, 1, 48)
    sd["head_dist.weight"] = torch.zeros(10, 48)
    path = str(tmp_path / "distilled.pth")
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(tiny_vit(seed=1), path)
    assert "dist_token" in str(info.value) and "head_dist.weight" in str(info.value)
    assert "unexpected" in str(info.value)


def test_missing_head_is_an_error_without_reset(tmp_path):
    sd = tiny_vit(seed=0).state_dict()
    del sd["head.weight"], sd["head.bias"]
    path = str(tmp_path / "headless.pth")
    torch.save(sd, path)
    with pytest.raises(CheckpointMismatchError, match="head.weight"):
        load_weights(tiny_vit(seed=1), path)


def test_corrupt_file_raises_checkpoint_error_naming_it(tmp_path):
    path = tmp_path / "corrupt.pyth"
    path.write_bytes(os.urandom(256))
    with pytest.raises(CheckpointError, match="corrupt.pyth"):
        load_weights(tiny_vit(), str(path))
    # A truncated real checkpoint, too.
    good = tmp_path / "good.pyth"
    torch.save(tiny_vit().state_dict(), good)
    truncated = tmp_path / "truncated.pyth"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.pyth"):
        load_weights(tiny_vit(), str(truncated))


@pytest.mark.parametrize("obj", [[1, 2, 3], {"epoch": 3, "note": "no weights"}, {"model": {"a": 1}}],
                         ids=["list", "dict_without_tensors", "model_without_tensors"])
def test_non_checkpoint_file_raises_checkpoint_error_naming_it(tmp_path, obj):
    path = str(tmp_path / "not_weights.pth")
    torch.save(obj, path)
    with pytest.raises(CheckpointError, match="not_weights.pth"):
        load_weights(tiny_vit(), path)


def test_missing_file_raises_checkpoint_error_naming_it(tmp_path):
    path = str(tmp_path / "absent.pyth")
    with pytest.raises(CheckpointError, match="absent.pyth"):
        load_weights(tiny_vit(), path)
    with pytest.raises(CheckpointError, match="absent.pyth"):
        resume(path, *trained())


def test_load_into_model_directly_reports_resize():
    source, target = tiny_vit(seed=0), tiny_vit(seed=1, img_size=48)
    report = load_into_model(target, source.state_dict(), LoadReport("mem", "top level"))
    assert report.resized and report.lines()[0] == "loaded mem (top level)"
