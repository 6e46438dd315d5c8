"""Issue 9, checkpoint cluster: every official layout loads through the one path run_net uses
(vitadapt.utils.checkpoint.load_weights -> vitadapt.models.convert.load_into_model); files that cannot be read or
written give one VitadaptError naming the file and the reason; a file of another method is reported."""

import argparse
import errno
import logging
import os
import pickle
from pathlib import Path

import pytest
import torch

import helpers_e2e as h
from helpers_unit import clone_state, tiny_cfg, tiny_vit
from vitadapt.config import load_config
from vitadapt.errors import VitadaptError
from vitadapt.models import build_model
from vitadapt.models.convert import CheckpointMismatchError, LoadReport, load_into_model
from vitadapt.utils.checkpoint import (CheckpointError, checkpoint_path, load_file, load_weights, resume,
                                       save_checkpoint)

MASKS = ["blocks.0.attn.out_zero_mask", "blocks.1.attn.out_zero_mask"]
ATS = dict(MODEL__NAME="ATSVisionTransformer", ATS__BLOCKS=[0, 1])
EVIT = dict(MODEL__NAME="EViTVisionTransformer", EVIT__LOCATIONS=[1], EVIT__KEEP_RATE=0.5)
AVIT = dict(MODEL__NAME="AViTVisionTransformer", AVIT__GATE_SCALE=10.0, AVIT__GATE_CENTER=30.0,
            AVIT__PRIOR_TARGET_DEPTH=1)


def deit_weights(seed=0):
    """Weights of the tiny DeiT/timm layout (3 classes), drawn wide so that ATS / EViT / A-ViT drop tokens."""
    torch.manual_seed(seed)
    model = h.timm_vit()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def official_ats_weights(seed=0, masks=MASKS):
    """An official ATS model's state_dict (golden/ats `state_dict`): DeiT keys + an all-zero [1, C] out_zero_mask
    per ATS block."""
    sd = deit_weights(seed)
    sd.update({k: torch.zeros(1, 48) for k in masks})
    return sd


def official_file(kind, path, sd):
    """The file each official code base writes (specs/ats.md 2.3, evit_dvt.md 1.9, avit_adavit.md 1.6)."""
    if kind == "ats_state_dict":  # model.state_dict() saved as is
        obj = sd
    elif kind == "ats_slowfast":  # the official ATS trainer (PySlowFast): its cfg names MODEL.MODEL_NAME, not NAME
        obj = {"epoch": 30, "model_state": sd, "optimizer_state": {"state": {}, "param_groups": []},
               "cfg": "MODEL:\n  MODEL_NAME: VisionTransformer\n  NUM_CLASSES: 3\nTRAIN:\n  BATCH_SIZE: 8\n"}
    else:  # EViT / A-ViT main.py: {'model', 'optimizer', 'lr_scheduler', 'epoch', 'model_ema', 'scaler', 'args'}
        obj = {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "lr_scheduler": {"decay_t": 30},
               "epoch": 29, "model_ema": {k: v + 0.01 for k, v in sd.items()}, "scaler": {"scale": 65536.0},
               "args": argparse.Namespace(model="deit_tiny", input_size=32, nb_classes=3, gate_scale=10.0)}
    torch.save(obj, path)
    return path


@torch.no_grad()
def reference_logits(opts, sd, images):
    """The model run_net builds, given the weights with torch's strict load_state_dict (no vitadapt loading code),
    on the val images with timm's eval transform."""
    from PIL import Image

    model = build_model(load_config("", opts)).eval()
    model.load_state_dict({k: v for k, v in sd.items() if k not in MASKS}, strict=True)
    tf = h.timm_eval_transform()
    return model(torch.stack([tf(Image.open(p).convert("RGB")) for p in images]))


def last_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "no error printed"
    return err[-1]


# ============================================================== 1. official layouts through run_net


@pytest.mark.parametrize("kind,method,ema", [("ats_state_dict", ATS, False), ("ats_slowfast", ATS, False),
                                             ("deit_main", EVIT, False), ("deit_main", EVIT, True),
                                             ("deit_main", AVIT, False)],
                         ids=["ats_state_dict", "ats_slowfast", "evit", "evit_ema", "avit"])
def test_official_checkpoint_evaluates_through_run_net(image_folder, tmp_path, run_net, capsys, kind, method, ema):
    sd = official_ats_weights() if kind.startswith("ats") else deit_weights()
    # A-ViT's official files carry the gate in their name (tiny-<scale>-<center>.pth), which must agree.
    ckpt = official_file(kind, tmp_path / "tiny-10-30.pth", sd)
    out = tmp_path / "out"
    opts = h.tiny_opts(image_folder, out, TRAIN__ENABLE=False, TEST__CHECKPOINT_FILE_PATH=str(ckpt),
                       TEST__SAVE_RESULTS_PATH="predictions.pth", MODEL_EMA__ENABLE=ema, MODEL_EMA__EVAL=ema, **method)
    rc = run_net(["--cfg", ""] + opts)
    assert rc == 0, capsys.readouterr().err
    items = h.list_split(image_folder, "val")
    weights = {k: v + 0.01 for k, v in sd.items()} if ema else sd  # the official EMA weights, when asked for
    ref = reference_logits(opts, weights, [p for p, _ in items])
    preds = torch.load(out / "predictions.pth", map_location="cpu", weights_only=True)
    torch.testing.assert_close(preds["logits"], ref, atol=1e-4, rtol=0)
    assert h.records(out, "test_final")[-1]["checkpoint"] == str(ckpt)
    log = (out / "stdout.log").read_text()
    assert ("'model_ema'" if ema else "loaded " + str(ckpt)) in log
    if kind.startswith("ats"):
        assert "converted from the official layout: dropped attn.out_zero_mask of blocks [0, 1] (all zeros, " \
               "unused)" in log
        tokens = h.records(out, "test_final")[-1]["tokens_per_block_mean"]
        assert tokens[-1] < 17  # the ATS model ran and sampled: 16 patches + CLS enter block 0


def test_finetune_from_official_ats_checkpoint(image_folder, tmp_path, run_net, capsys):
    from vitadapt.engine import Trainer
    from vitadapt.utils.checkpoint import unwrap

    sd = official_ats_weights()
    ckpt = official_file("ats_state_dict", tmp_path / "ats_official.pth", sd)
    # The weights fine-tuning starts from are the file's, masks dropped.
    opts = h.tiny_opts(image_folder, tmp_path / "probe", SOLVER__MAX_EPOCH=1, TEST__ENABLE=False,
                       TRAIN__CHECKPOINT_FILE_PATH=str(ckpt), **ATS)
    start = unwrap(Trainer(load_config("", opts)).model).state_dict()
    assert set(start) == set(sd) - set(MASKS)
    assert all(torch.equal(start[k], sd[k]) for k in start)
    # And run_net fine-tunes from it.
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, TEST__ENABLE=False,
                                             TRAIN__CHECKPOINT_FILE_PATH=str(ckpt), **ATS))
    assert rc == 0, capsys.readouterr().err
    saved = h.load_ckpt(h.ckpt_path(out, 1))["model_state"]
    assert set(saved) == set(sd) - set(MASKS)
    assert not torch.equal(saved["blocks.0.attn.qkv.weight"], sd["blocks.0.attn.qkv.weight"])  # it trained
    assert "dropped attn.out_zero_mask of blocks [0, 1]" in (out / "stdout.log").read_text()


def test_non_zero_out_zero_mask_is_refused_naming_key_and_file(image_folder, tmp_path, run_net, capsys):
    sd = official_ats_weights()
    sd["blocks.1.attn.out_zero_mask"][0, 5] = 0.5
    ckpt = official_file("ats_state_dict", tmp_path / "not_ats.pth", sd)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(ckpt), **ATS))
    assert rc == 2
    assert last_error_line(capsys) == (f"error: {ckpt}: blocks.1.attn.out_zero_mask is not all zeros; the official "
                                       "ATS model keeps it at zero, so this is not an official ATS checkpoint")
    # Refused before anything is copied.
    model = build_model(tiny_cfg("MODEL.NAME", "ATSVisionTransformer", "ATS.BLOCKS", "[0, 1]",
                                 "MODEL.NUM_CLASSES", "3"))
    before = clone_state(model)
    with pytest.raises(CheckpointMismatchError):
        load_weights(model, str(ckpt))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_official_ats_file_into_plain_vit_says_what_to_use(image_folder, tmp_path, run_net, capsys):
    ckpt = official_file("ats_state_dict", tmp_path / "ats_official.pth", official_ats_weights())
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(ckpt)))
    assert rc == 2
    err = capsys.readouterr().err
    assert (f"error: {ckpt} (top level) does not match the model, nothing was loaded (attn.out_zero_mask is a "
            "parameter of official ATS checkpoints: use MODEL.NAME ATSVisionTransformer):\n  unexpected keys (not "
            "in the model): blocks.0.attn.out_zero_mask, blocks.1.attn.out_zero_mask") in err
    assert "ignored" not in err


def test_official_ats_file_with_other_ats_blocks_loads_with_a_warning(tmp_path, caplog):
    ckpt = official_file("ats_state_dict", tmp_path / "ats_official.pth", official_ats_weights())
    model = build_model(tiny_cfg("MODEL.NAME", "ATSVisionTransformer", "ATS.BLOCKS", "[1]", "MODEL.NUM_CLASSES", "3"))
    with caplog.at_level(logging.WARNING):
        load_weights(model, str(ckpt))
    assert f"{ckpt} was trained with ATS at blocks [0, 1] (its out_zero_mask keys), but ATS.BLOCKS is [1]" \
        in caplog.text


def test_golden_ats_state_dict_loads_through_load_weights(tmp_path):
    from vitadapt.models.ats import official_to_config_opts

    golden = h.load_golden_or_skip(Path(os.environ.get("VITADAPT_GOLDEN_DIR", "/work/shared/golden"))
                                   / "ats" / "golden_dev.pt")
    path = tmp_path / "golden_state_dict.pth"
    torch.save(golden["state_dict"], path)
    model = build_model(load_config("", official_to_config_opts(golden["config"]) + ["NUM_GPUS", "0"]))
    report = load_weights(model, str(path))
    blocks = sorted(golden["config"]["ats_blocks"])
    assert report.converted == [f"dropped attn.out_zero_mask of blocks {blocks} (all zeros, unused)"]
    state = model.state_dict()
    assert set(state) == {k for k in golden["state_dict"] if not k.endswith("out_zero_mask")}
    assert all(torch.equal(state[k], golden["state_dict"][k]) for k in state)


def test_mismatch_messages_say_what_happens():
    sd = tiny_vit(seed=0).state_dict()
    del sd["norm.weight"]
    sd["dist_token"] = torch.zeros(1, 1, 48)
    model = tiny_vit(seed=1)
    before = clone_state(model)
    with pytest.raises(CheckpointMismatchError) as info:
        load_into_model(model, sd, LoadReport("f.pth", "top level"))
    assert str(info.value).splitlines() == [
        "f.pth (top level) does not match the model, nothing was loaded (is MODEL.NAME / VIT.* the architecture it "
        "was trained with?):",
        "  missing keys (not in the checkpoint): norm.weight",
        "  unexpected keys (not in the model): dist_token"]
    # The refused file changed nothing (it used to be half loaded).
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


# ============================================================== 2. files that are not readable checkpoints


def _corrupt(kind, tmp_path) -> Path:
    path = tmp_path / f"{kind}.pyth"
    good = tmp_path / "good.pyth"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "random":
        path.write_bytes(bytes(range(256)) * 4)
    elif kind == "text":
        path.write_text("model: vit_small\nepoch: 3\n")
    elif kind == "plain_pickle":
        path.write_bytes(pickle.dumps({"model": [1.0, 2.0]}))
    elif kind in ("truncated", "truncated_legacy"):
        torch.save(tiny_vit().state_dict(), good, _use_new_zipfile_serialization=kind == "truncated")
        data = good.read_bytes()
        path.write_bytes(data[:len(data) // 2])
    return path


@pytest.mark.parametrize("kind,reason", [
    ("empty", "checkpoint file is empty (0 bytes): {path}"),
    ("random", "{path} is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy format)"),
    ("text", "{path} is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy format)"),
    ("plain_pickle", "{path} is not a PyTorch checkpoint (neither torch.save's zip format nor its legacy format)"),
    ("truncated", "{path} is truncated or corrupt, not a readable checkpoint ("),
    ("truncated_legacy", "{path} is truncated or corrupt, not a readable checkpoint ("),
])
def test_unreadable_file_says_why_naming_it(tmp_path, kind, reason):
    path = _corrupt(kind, tmp_path)
    for load in (lambda: load_weights(tiny_vit(), str(path)), lambda: resume(str(path), *_trained())):
        with pytest.raises(CheckpointError) as info:
            load()
        assert str(info.value).startswith(reason.format(path=path))
        assert "weights_only" not in str(info.value)  # torch's advice is for trusted pickles, not broken files


def test_unreadable_file_through_run_net_is_one_line(image_folder, tmp_path, run_net, capsys):
    path = _corrupt("truncated", tmp_path)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(path)))
    assert rc == 2
    line = last_error_line(capsys)
    assert line.startswith(f"error: {path} is truncated or corrupt")


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran while loading",))


def test_pickle_that_would_run_code_is_refused_saying_so(tmp_path):
    path = tmp_path / "untrusted.pth"
    torch.save({"model": tiny_vit().state_dict(), "extra": _RunsCode()}, path)
    with pytest.raises(CheckpointError) as info:
        load_weights(tiny_vit(), str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path} holds a Python object (print) whose loading could run code; vitadapt loads "
                          "checkpoints with torch.load(weights_only=True) and refuses it")


def test_directory_as_checkpoint_path(tmp_path):
    model, optimizer = _trained()
    out = tmp_path / "run"
    newest = save_checkpoint(str(out), 2, model, optimizer)
    for folder in (out, out / "checkpoints"):
        with pytest.raises(CheckpointError) as info:
            load_weights(tiny_vit(), str(folder))
        assert str(info.value) == f"{folder} is a directory, not a checkpoint file (its newest checkpoint is {newest})"
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match=r"empty_dir is a directory, not a checkpoint file$"):
        load_weights(tiny_vit(), str(empty))


def test_safetensors_file_loads_and_truncated_one_is_named(tmp_path):
    from safetensors.torch import save_file

    source = tiny_vit(seed=0)
    path = tmp_path / "model.safetensors"  # timm's hub layout: the state_dict at the top level
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    target = tiny_vit(seed=1)
    assert load_weights(target, str(path)).container == "top level"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    with pytest.raises(CheckpointError, match=f"^{broken} is a truncated or corrupt safetensors file"):
        load_weights(tiny_vit(), str(broken))


# ============================================================== 3. a full disk while saving


def _trained(seed=0):
    model = tiny_vit(seed=seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
    optimizer.step()
    return model, optimizer


def _disk_full(monkeypatch):
    def full(obj, f, *args, **kwargs):
        f.write(b"the first megabytes of a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch, "save", full)


def test_disk_full_while_saving_names_the_file_and_leaves_nothing(tmp_path, monkeypatch):
    out = str(tmp_path)
    model, optimizer = _trained()
    first = save_checkpoint(out, 1, model, optimizer)
    before = h.sha256(first)
    _disk_full(monkeypatch)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(out, 2, model, optimizer, keep_last_k=1)  # pruning must not happen either
    assert isinstance(info.value, VitadaptError) and info.value.errno == errno.ENOSPC
    assert str(info.value) == (f"cannot write checkpoint {checkpoint_path(out, 2)}: disk full ([Errno 28] No space "
                               "left on device); no partial file was left and the previous checkpoints are untouched")
    assert os.listdir(os.path.join(out, "checkpoints")) == ["checkpoint_epoch_00001.pyth"]  # no .tmp
    assert h.sha256(first) == before


def test_disk_full_during_training_is_one_line_error(image_folder, tmp_path, run_net, capsys, monkeypatch):
    out = tmp_path / "out"
    _disk_full(monkeypatch)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, TEST__ENABLE=False))
    assert rc == 2
    assert last_error_line(capsys).startswith(f"error: cannot write checkpoint {h.ckpt_path(out, 1)}: disk full")
    assert not list((out / "checkpoints").iterdir())


# ============================================================== 4. a checkpoint of another method


def test_checkpoint_of_another_method_is_reported(tmp_path, caplog):
    model, optimizer = _trained()
    evit_cfg = tiny_cfg("MODEL.NAME", "EViTVisionTransformer", "EVIT.LOCATIONS", "[1]")
    path = save_checkpoint(str(tmp_path / "evit"), 3, model, optimizer, cfg=evit_cfg)
    target = tiny_vit(seed=1)  # a plain VisionTransformer: the same keys, so the weights load
    with caplog.at_level(logging.INFO):
        report = load_weights(target, path)
    assert report.lines()[:2] == [f"loaded {path} ('model_state')",
                                  "  a vitadapt checkpoint of MODEL.NAME EViTVisionTransformer, 3 epoch(s) trained"]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"{path} was trained as MODEL.NAME EViTVisionTransformer, but the model built here is "
                        "VisionTransformer: the weights fit (the methods share the backbone's parameters), the "
                        "token handling is this model's"]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in target.state_dict().items())


def test_checkpoint_of_the_same_method_is_reported_without_warning(tmp_path, caplog):
    model, optimizer = _trained()
    path = save_checkpoint(str(tmp_path), 2, model, optimizer, cfg=tiny_cfg())
    with caplog.at_level(logging.INFO):
        load_weights(tiny_vit(seed=1), path)
    assert "a vitadapt checkpoint of MODEL.NAME VisionTransformer, 2 epoch(s) trained" in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# ============================================================== 5. more of the same


def test_resume_of_a_file_without_rng_states_warns_instead_of_crashing(tmp_path, caplog):
    model, optimizer = _trained()
    path = save_checkpoint(str(tmp_path), 1, model, optimizer)
    state = load_file(path)
    del state["rng_states"]  # e.g. a PySlowFast-style training checkpoint
    torch.save(state, path)
    with caplog.at_level(logging.WARNING):
        assert resume(path, *_trained(seed=1)) == 1
    assert f"{path} holds the RNG states of 0 process(es), this run has 1" in caplog.text


def test_resume_of_weights_only_file_points_to_train_checkpoint(tmp_path):
    path = tmp_path / "deit.pth"
    torch.save({"model": tiny_vit().state_dict(), "epoch": 299}, path)
    with pytest.raises(CheckpointError, match="to start from its weights, use TRAIN.CHECKPOINT_FILE_PATH"):
        resume(str(path), *_trained())


def test_resume_with_another_optimizer_layout_names_the_file(tmp_path):
    model, optimizer = _trained()
    path = save_checkpoint(str(tmp_path), 1, model, optimizer)
    other = tiny_vit(seed=1)
    decay = [p for n, p in other.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in other.named_parameters() if p.ndim <= 1]
    two_groups = torch.optim.AdamW([{"params": decay}, {"params": no_decay, "weight_decay": 0.0}])
    with pytest.raises(CheckpointError, match=f"^{path}: its optimizer state does not fit this run's optimizer"):
        resume(path, other, two_groups)


def test_resume_with_mismatching_ema_names_the_key(tmp_path):
    model, optimizer = _trained()
    ema = argparse.Namespace(module=tiny_vit(seed=2))
    path = save_checkpoint(str(tmp_path), 1, model, optimizer, ema=ema)
    state = load_file(path)
    del state["ema_state"]["norm.bias"]
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(not in the checkpoint\): norm\.bias"):
        resume(path, *_trained(seed=1), ema=argparse.Namespace(module=tiny_vit(seed=3)))


def test_nan_weights_are_refused(tmp_path):
    sd = tiny_vit(seed=0).state_dict()
    sd["blocks.1.mlp.fc1.weight"][3, 4] = float("nan")
    sd["head.bias"][0] = float("inf")
    path = tmp_path / "diverged.pth"
    torch.save(sd, path)
    target = tiny_vit(seed=1)
    before = clone_state(target)
    with pytest.raises(CheckpointMismatchError) as info:
        load_weights(target, str(path))
    assert str(info.value) == (f"{path}: weights are NaN or infinite in blocks.1.mlp.fc1.weight, head.bias (saved "
                               "from a run that diverged?)")
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())


def test_torch_compile_prefix_is_stripped(tmp_path):
    source = tiny_vit(seed=0)
    path = tmp_path / "compiled.pth"
    torch.save({"model": {"module._orig_mod." + k: v for k, v in source.state_dict().items()}}, path)
    target = tiny_vit(seed=1)
    load_weights(target, str(path))
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


def test_prefer_ema_uses_official_model_ema(tmp_path, caplog):
    sd = tiny_vit(seed=0).state_dict()
    ema = tiny_vit(seed=5).state_dict()
    path = tmp_path / "deit_training.pth"
    torch.save({"model": sd, "model_ema": ema, "epoch": 9}, path)
    target = tiny_vit(seed=1)
    with caplog.at_level(logging.WARNING):
        report = load_weights(target, str(path), prefer_ema=True)
    assert report.container == "'model_ema'"
    assert "has no EMA weights" not in caplog.text
    assert all(torch.equal(v, ema[k]) for k, v in target.state_dict().items())



def test_unreadable_permissions_are_not_called_corrupt(tmp_path, monkeypatch):
    from iopath.common.file_io import g_pathmgr

    path = tmp_path / "weights.pth"
    torch.save(tiny_vit().state_dict(), path)

    def denied(*args, **kwargs):  # tests run as root, where chmod does not block reading
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))

    monkeypatch.setattr(g_pathmgr, "open", denied)
    with pytest.raises(CheckpointError) as info:
        load_weights(tiny_vit(), str(path))
    assert str(info.value) == f"cannot read checkpoint {path}: [Errno 13] Permission denied: '{path}'"


def test_dvt_style_model_state_dict_container(tmp_path):
    source = tiny_vit(seed=0)
    path = tmp_path / "dvt_style.pth.tar"
    torch.save({"model_state_dict": source.state_dict(), "flops": [0.1, 0.2, 0.3]}, path)
    target = tiny_vit(seed=1)
    assert load_weights(target, str(path)).container == "'model_state_dict'"
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())
