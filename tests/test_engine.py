"""End-to-end tests of the train/test engine through tools/run_net.py's main() (single process, CPU).

Every run uses a two-block ViT (patch 8, dim 48) at 32 px on a generated ImageNet-layout folder, so a run
takes well under a second after the imports.
"""

import argparse
import logging
import platform
import shutil
from pathlib import Path

import pytest
import torch

import helpers_e2e as h
from vitadapt.config import load_config
from vitadapt.engine import Trainer, train
from vitadapt.utils import checkpoint as cu


# ---------------------------------------------------------------- 1. train then test, end to end
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, image_folder):
    """run_net: train 2 epochs on the generated folder, then test with TEST.SAVE_RESULTS_PATH."""
    out = tmp_path_factory.mktemp("trained_run") / "out"
    opts = h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, TEST__SAVE_RESULTS_PATH="predictions.pth")
    rc = h.load_run_net().main(["--cfg", ""] + opts)
    return {"rc": rc, "out": out, "opts": opts, "data": image_folder}


def test_train_then_test_returns_zero_and_writes_outputs(trained_run):
    out = trained_run["out"]
    assert trained_run["rc"] == 0
    assert (out / "config.yaml").is_file()
    assert h.ckpt_path(out, 2).is_file()
    assert h.ckpt_path(out, 1).is_file()  # CHECKPOINT_PERIOD 1 (the default)
    assert not list((out / "checkpoints").glob("*.tmp"))
    ck = h.load_ckpt(h.ckpt_path(out, 2))
    assert ck["epoch"] == 2
    assert {"model_state", "optimizer_state", "rng_states", "cfg"} <= set(ck)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":  # KEEP_FREED_CPU_MEMORY, on by default
        assert "CPU allocator: keeps freed memory" in (out / "stdout.log").read_text()


def test_saved_config_reloads_to_the_same_values(trained_run):
    out = trained_run["out"]
    expected = load_config("", trained_run["opts"])
    reloaded = load_config(str(out / "config.yaml"))
    assert reloaded == expected
    assert reloaded.DATA.PATH_TO_DATA_DIR == str(trained_run["data"])
    assert reloaded.VIT.EMBED_DIM == 48 and reloaded.SOLVER.MAX_EPOCH == 2
    # The checkpoint carries the same config.
    assert load_config_from_string(h.load_ckpt(h.ckpt_path(out, 2))["cfg"]) == expected


def load_config_from_string(text: str):
    from vitadapt.config import get_cfg
    from fvcore.common.config import CfgNode

    cfg = get_cfg()
    cfg.merge_from_other_cfg(CfgNode.load_cfg(text))
    return cfg


def test_json_stats_records(trained_run):
    out = trained_run["out"]
    n_val = len(h.list_split(trained_run["data"], "val"))
    stats = h.read_stats(out)
    train_recs = [r for r in stats if r["_type"] == "train_epoch"]
    val_recs = [r for r in stats if r["_type"] == "val"]
    test_recs = [r for r in stats if r["_type"] == "test_final"]
    assert [r["epoch"] for r in train_recs] == [1, 2]
    assert [r["epoch"] for r in val_recs] == [1, 2]
    assert len(test_recs) == 1
    for r in val_recs + test_recs:
        assert 0.0 <= r["top1_acc"] <= 100.0
        assert 0.0 <= r["top5_acc"] <= 100.0
        assert r["top1_acc"] <= r["top5_acc"]
        assert r["num_images"] == n_val
        assert r["skipped_images"] == 0
    for r in train_recs:
        assert 0.0 <= r["top1_acc"] <= 100.0 and r["loss"] > 0 and r["skipped_images"] == 0
    assert test_recs[0]["checkpoint"] == str(h.ckpt_path(out, 2))
    assert test_recs[0]["split"] == "val"
    # The test job evaluates the final checkpoint: the same numbers as the last validation.
    assert test_recs[0]["top1_acc"] == val_recs[-1]["top1_acc"]
    assert test_recs[0]["loss"] == pytest.approx(val_recs[-1]["loss"], rel=1e-5)


def test_saved_predictions_equal_timm_reference(trained_run):
    """Predictions of the test job == timm's VisionTransformer with the checkpoint's weights, on the val
    images with timm's eval transform, image by image in data set order."""
    out, data = trained_run["out"], trained_run["data"]
    preds = torch.load(out / "predictions.pth", map_location="cpu", weights_only=True)
    items = h.list_split(data, "val")
    state = h.load_ckpt(h.ckpt_path(out, 2))["model_state"]
    ref = h.reference_logits(state, [p for p, _ in items])
    assert torch.equal(preds["index"], torch.arange(len(items)))
    assert preds["labels"].tolist() == [label for _, label in items]
    assert preds["logits"].shape == ref.shape == (len(items), len(h.CLASSES))
    torch.testing.assert_close(preds["logits"], ref, atol=1e-4, rtol=0)
    test_rec = h.records(out, "test_final")[-1]
    assert test_rec["top1_acc"] == pytest.approx(h.top1(ref, [label for _, label in items]), abs=1e-3)


# ---------------------------------------------------------------- 2. test-only evaluation
def test_test_only_on_external_deit_checkpoint(trained_run, tmp_path, run_net):
    """A DeiT-layout file {"model": ..., "args": Namespace} evaluated with TRAIN.ENABLE False."""
    data = trained_run["data"]
    state = h.load_ckpt(h.ckpt_path(trained_run["out"], 2))["model_state"]
    # Swap two classifier rows: the accuracy becomes something other than 0 or 100 and depends on the order.
    state = {k: v.clone() for k, v in state.items()}
    for key in ("head.weight", "head.bias"):
        state[key][[1, 2]] = state[key][[2, 1]]
    ckpt = tmp_path / "deit_tiny_external.pth"
    torch.save({"model": state, "args": argparse.Namespace(model="deit_tiny", input_size=32, nb_classes=3),
                "epoch": 299}, ckpt)
    items = h.list_split(data, "val")
    ref = h.reference_logits(state, [p for p, _ in items])
    expected_top1 = h.top1(ref, [label for _, label in items])
    assert 0.0 < expected_top1 < 100.0

    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, out, TRAIN__ENABLE=False, TEST__CHECKPOINT_FILE_PATH=str(ckpt)))
    assert rc == 0
    rec = h.records(out, "test_final")
    assert len(rec) == 1
    assert rec[0]["checkpoint"] == str(ckpt)
    assert rec[0]["num_images"] == len(items)
    assert rec[0]["top1_acc"] == pytest.approx(expected_top1, abs=1e-3)
    assert not (out / "checkpoints").exists()  # a test-only run writes no checkpoint


def test_test_only_without_any_checkpoint_refuses_random_weights(image_folder, tmp_path, run_net, capsys):
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, TRAIN__ENABLE=False))
    assert rc != 0
    err = capsys.readouterr().err
    assert "random weights" in err
    assert "TEST.CHECKPOINT_FILE_PATH" in err
    assert not (out / "json_stats.log").exists() or not h.records(out, "test_final")


def test_test_only_with_mismatched_checkpoint_names_the_key(image_folder, tmp_path, run_net, capsys):
    # A checkpoint of a wider model (dim 96): every tensor mismatches; the message names them.
    wider = h.timm_vit(embed_dim=96)
    ckpt = tmp_path / "wider.pth"
    torch.save({"model": wider.state_dict()}, ckpt)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(ckpt)))
    assert rc != 0
    err = capsys.readouterr().err
    assert "patch_embed.proj.weight" in err
    assert str(ckpt) in err


def test_test_only_with_other_num_classes_fails_naming_head(image_folder, tmp_path, run_net, capsys):
    # The head is re-initialised only when fine-tuning; evaluating a 5-class head on 3 classes is an error.
    ckpt = tmp_path / "five_classes.pth"
    torch.save({"model": h.timm_vit(num_classes=5).state_dict()}, ckpt)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(ckpt)))
    assert rc != 0
    assert "head.weight" in capsys.readouterr().err


# ---------------------------------------------------------------- 3. error paths of run_net
@pytest.mark.parametrize("extra, expected", [
    (["SOLVER.NO_SUCH_KEY", "1"], "SOLVER.NO_SUCH_KEY"),
    (["NOT_A_NODE.KEY", "1"], "NOT_A_NODE.KEY"),
    (["TRAIN.BATCH_SIZE", "'many'"], "TRAIN.BATCH_SIZE"),
    (["TRAIN.ENABLE", "'yes please'"], "TRAIN.ENABLE"),
    (["SOLVER.MAX_EPOCH"], "SOLVER.MAX_EPOCH"),  # a key without its value
], ids=["unknown-key", "unknown-node", "wrong-type-int", "wrong-type-bool", "missing-value"])
def test_bad_override_is_reported(image_folder, tmp_path, run_net, capsys, extra, expected):
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out) + extra)
    assert rc != 0
    assert expected in capsys.readouterr().err
    assert not out.exists()  # nothing was started


def test_unknown_key_in_yaml_is_reported(image_folder, tmp_path, run_net, capsys):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("SOLVER:\n  BASE_LR: 1.0e-3\n  LR_SCHEDULE: cosine\n")
    rc = run_net(["--cfg", str(cfg)] + h.tiny_opts(image_folder, tmp_path / "out"))
    assert rc != 0
    assert "SOLVER.LR_SCHEDULE" in capsys.readouterr().err


def test_missing_data_dir_is_reported(tmp_path, run_net, capsys):
    opts = h.flatten_opts(h.tiny_opts("x", tmp_path / "out"))
    del opts["DATA.PATH_TO_DATA_DIR"]
    rc = run_net(["--cfg", ""] + [t for kv in opts.items() for t in kv])
    assert rc != 0
    assert "DATA.PATH_TO_DATA_DIR" in capsys.readouterr().err

    missing = tmp_path / "no_such_folder"
    rc = run_net(["--cfg", ""] + h.tiny_opts(missing, tmp_path / "out"))
    assert rc != 0
    err = capsys.readouterr().err
    assert "DATA.PATH_TO_DATA_DIR" in err and str(missing) in err


def test_missing_split_folder_is_reported(tmp_path, make_image_folder, run_net, capsys):
    data = make_image_folder()
    shutil.rmtree(data / "val")
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, tmp_path / "out", SOLVER__MAX_EPOCH=1))
    assert rc != 0
    assert str(data / "val") in capsys.readouterr().err


def test_missing_test_checkpoint_file_is_reported(image_folder, tmp_path, run_net, capsys):
    missing = tmp_path / "nowhere" / "model.pth"
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(missing)))
    assert rc != 0
    err = capsys.readouterr().err
    assert "TEST.CHECKPOINT_FILE_PATH" in err and str(missing) in err


def test_missing_config_file_is_reported(tmp_path, run_net, capsys):
    missing = tmp_path / "nope.yaml"
    rc = run_net(["--cfg", str(missing)])
    assert rc != 0
    assert str(missing) in capsys.readouterr().err


def test_nothing_to_do_is_reported(image_folder, tmp_path, run_net, capsys):
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__ENABLE=False))
    assert rc != 0
    assert "TRAIN.ENABLE" in capsys.readouterr().err


# ---------------------------------------------------------------- 4. fine-tuning with another number of classes
def test_finetune_from_checkpoint_with_other_num_classes(image_folder, tmp_path, caplog):
    source = h.timm_vit(num_classes=5)
    torch.manual_seed(123)
    for p in source.parameters():  # non-trivial values everywhere (timm zero-inits some biases)
        torch.nn.init.normal_(p, std=0.05)
    src_state = {k: v.clone() for k, v in source.state_dict().items()}
    ckpt = tmp_path / "pretrained_5_classes.pth"
    torch.save({"model": src_state, "args": argparse.Namespace(nb_classes=5)}, ckpt)

    cfg = load_config("", h.tiny_opts(image_folder, tmp_path / "out", SOLVER__MAX_EPOCH=1,
                                      TRAIN__CHECKPOINT_FILE_PATH=str(ckpt)), check_files=True)
    caplog.set_level(logging.INFO)
    trainer = Trainer(cfg)
    assert trainer.start_epoch == 0
    assert "classifier re-initialised" in caplog.text
    state = cu.unwrap(trainer.model).state_dict()
    assert set(state) == set(src_state)
    for key, value in state.items():
        if key in ("head.weight", "head.bias"):
            continue
        assert torch.equal(value, src_state[key]), key
    assert state["head.weight"].shape == (3, 48) and state["head.bias"].shape == (3,)
    # Re-initialised, not a slice of the checkpoint's 5-class head.
    assert not torch.equal(state["head.weight"], src_state["head.weight"][:3])

    model = trainer.run()
    assert h.ckpt_path(cfg.OUTPUT_DIR, 1).is_file()
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], src_state["blocks.0.attn.qkv.weight"])
    assert "classifier re-initialised" in (Path(cfg.OUTPUT_DIR) / "stdout.log").read_text()


def test_finetune_from_checkpoint_of_another_architecture_fails(image_folder, tmp_path, run_net, capsys):
    # Only the classifier may be re-initialised: a checkpoint of another width is an error, not a partial load.
    ckpt = tmp_path / "wider.pth"
    torch.save({"model": h.timm_vit(num_classes=5, embed_dim=96).state_dict()}, ckpt)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__CHECKPOINT_FILE_PATH=str(ckpt)))
    assert rc != 0
    assert "blocks.0.attn.qkv.weight" in capsys.readouterr().err
    assert not h.ckpt_path(tmp_path / "out", 1).exists()


# ---------------------------------------------------------------- 5. resume is bit-exact
def _resume_opts(data, out, workers):
    return h.tiny_opts(data, out, SOLVER__MAX_EPOCH=4, SOLVER__WARMUP_EPOCHS=1.0, TRAIN__CHECKPOINT_PERIOD=1,
                       AUG__ENABLE=True, AUG__SCALE=[0.3, 1.0], MIXUP__ENABLE=True, VIT__DROP_PATH_RATE=0.2,
                       TRAIN__LABEL_SMOOTHING=0.1, DATA_LOADER__NUM_WORKERS=workers, TEST__ENABLE=False)


@pytest.mark.parametrize("workers", [0, 1], ids=["workers0", "workers1"])
def test_resume_is_bit_identical_to_uninterrupted_run(image_folder, tmp_path, workers):
    # A: four epochs in one go.
    cfg_a = load_config("", _resume_opts(image_folder, tmp_path / "a", workers))
    model_a = train(cfg_a)

    # B: same config (MAX_EPOCH 4, so the same LR schedule), killed half-way through epoch 3 ...
    cfg_b = load_config("", _resume_opts(image_folder, tmp_path / "b", workers))
    trainer = Trainer(cfg_b)
    trainer.hooks.append(h.stop_at(2.5))
    with pytest.raises(h.Interrupt):
        trainer.run()
    del trainer
    assert h.ckpt_path(tmp_path / "b", 2).is_file() and not h.ckpt_path(tmp_path / "b", 3).exists()
    # The RNG state is now wherever the crash left it; resume must not depend on that.
    torch.rand(17)
    # ... then restarted: it resumes from the epoch-2 checkpoint and finishes.
    resumed = Trainer(load_config("", _resume_opts(image_folder, tmp_path / "b", workers)))
    assert resumed.start_epoch == 2
    model_b = resumed.run()

    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert set(state_a) == set(state_b)
    different = [k for k in state_a if not torch.equal(state_a[k], state_b[k])]
    assert not different, f"resumed run differs from the uninterrupted one in {different}"
    ck_a, ck_b = h.load_ckpt(h.ckpt_path(tmp_path / "a", 4)), h.load_ckpt(h.ckpt_path(tmp_path / "b", 4))
    for key in ck_a["model_state"]:
        assert torch.equal(ck_a["model_state"][key], ck_b["model_state"][key]), key
    # The per-epoch training losses after the resume are those of the uninterrupted run.
    loss_a = {r["epoch"]: r["loss"] for r in h.records(tmp_path / "a", "train_epoch")}
    loss_b = {r["epoch"]: r["loss"] for r in h.records(tmp_path / "b", "train_epoch")}
    assert loss_b[3] == loss_a[3] and loss_b[4] == loss_a[4]
    assert "resumed from" in (tmp_path / "b" / "stdout.log").read_text()


def test_resume_comparison_depends_on_rng_restoration(image_folder, tmp_path, monkeypatch):
    """Control for the test above: with the RNG restoration switched off, the resumed run does differ, so
    augmentation / mixup / drop path really draw from the restored streams."""
    cfg_a = load_config("", _resume_opts(image_folder, tmp_path / "a", 0))
    state_a = train(cfg_a).state_dict()
    cfg_b = load_config("", _resume_opts(image_folder, tmp_path / "b", 0))
    trainer = Trainer(cfg_b)
    trainer.hooks.append(h.stop_at(2.5))
    with pytest.raises(h.Interrupt):
        trainer.run()
    monkeypatch.setattr(cu, "set_rng_state", lambda state: None)
    state_b = Trainer(cfg_b).run().state_dict()
    assert any(not torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_resume_from_finished_run_does_not_retrain(image_folder, tmp_path, run_net):
    out = tmp_path / "out"
    opts = h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, TEST__ENABLE=False)
    assert run_net(["--cfg", ""] + opts) == 0
    digest = h.sha256(h.ckpt_path(out, 1))
    n_records = len(h.read_stats(out))
    assert run_net(["--cfg", ""] + opts) == 0
    assert h.sha256(h.ckpt_path(out, 1)) == digest
    assert len(h.read_stats(out)) == n_records  # no epoch trained again
    assert "training already finished" in (out / "stdout.log").read_text()


# ---------------------------------------------------------------- 6. undecodable images
def test_undecodable_images_are_skipped_and_counted(make_image_folder, tmp_path, run_net):
    # 23 good + 1 corrupt train images: with batch 8 no image is dropped by drop_last, so the corrupt one
    # is seen every epoch; 7 good + 1 corrupt val images.
    data = make_image_folder(train_counts=(8, 8, 7), val_counts=(3, 2, 2))
    bad_train = data / "train" / "zebra" / "corrupt.jpg"
    bad_val = data / "val" / "dog" / "broken.jpg"
    rng = torch.Generator().manual_seed(0)
    for path in (bad_train, bad_val):
        path.write_bytes(bytes(torch.randint(0, 256, (300,), generator=rng, dtype=torch.uint8).tolist()))
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, out, SOLVER__MAX_EPOCH=2))
    assert rc == 0
    assert h.ckpt_path(out, 2).is_file()
    log = (out / "stdout.log").read_text()
    assert str(bad_train) in log and str(bad_val) in log
    assert "WARNING" in log
    train_recs = h.records(out, "train_epoch")
    assert [r["skipped_images"] for r in train_recs] == [1, 1]
    for r in h.records(out, "val") + h.records(out, "test_final"):
        assert r["skipped_images"] == 1
        assert r["num_images"] == 7


# ---------------------------------------------------------------- 7. a diverging loss
def test_nan_loss_stops_with_clear_error_and_keeps_last_checkpoint(image_folder, tmp_path, run_net, capsys,
                                                                   monkeypatch):
    import vitadapt.engine.trainer as trainer_mod

    out = tmp_path / "out"
    first = h.ckpt_path(out, 1)
    seen = {}
    real_build_loss = trainer_mod.build_loss

    def build_loss(cfg):
        loss_fn = real_build_loss(cfg)

        def loss(logits, targets):
            value = loss_fn(logits, targets)
            if first.exists():  # epoch 2: the epoch-1 checkpoint is written; record it, then diverge
                seen.setdefault("digest", h.sha256(first))
                seen["calls"] = seen.get("calls", 0) + 1
                return value * float("nan")
            return value

        return loss

    monkeypatch.setattr(trainer_mod, "build_loss", build_loss)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=3))
    assert rc != 0
    err = capsys.readouterr().err
    assert "loss is nan" in err.lower()
    assert "epoch 2" in err
    assert str(first) in err  # the last good checkpoint is named
    assert seen.get("calls") == 1  # stopped at the first bad step
    assert h.sha256(first) == seen["digest"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [first.name]
    ck = h.load_ckpt(first)
    assert ck["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ck["model_state"].values())
    assert not h.records(out, "test_final")  # the test job did not run after the failure


def test_huge_learning_rate_diverges_with_clear_error(image_folder, tmp_path, run_net, capsys):
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=6, SOLVER__OPTIMIZING_METHOD="sgd",
                                             SOLVER__BASE_LR=1e12, TEST__ENABLE=False))
    assert rc != 0
    err = capsys.readouterr().err
    assert "loss is" in err and "SOLVER.BASE_LR" in err
    for path in (out / "checkpoints").glob("*.pyth") if (out / "checkpoints").exists() else []:
        h.load_ckpt(path)  # whatever was saved before the divergence is complete and readable


# ---------------------------------------------------------------- 8. the demo config
def test_demo_config_short_schedule_learns(tmp_path, run_net):
    out = tmp_path / "demo"
    # 6 of the 30 epochs, with twice as many (smaller) steps per epoch: ~60% top-1 (the full demo: ~97%).
    rc = run_net(["--cfg", str(h.REPO / "configs/demo/DeiT_Ti_digits.yaml"), "OUTPUT_DIR", str(out),
                  "SOLVER.MAX_EPOCH", "6", "SOLVER.WARMUP_EPOCHS", "1.0", "TRAIN.BATCH_SIZE", "32",
                  "LOG_MODEL_INFO", "False"])
    assert rc == 0
    val = h.records(out, "val")
    test_rec = h.records(out, "test_final")
    assert [r["epoch"] for r in val] == [5, 6]  # TRAIN.EVAL_PERIOD 5 of the demo config, and the last epoch
    assert val[-1]["num_images"] == 300
    assert val[-1]["top1_acc"] > 50.0  # chance is 10%
    assert len(test_rec) == 1 and test_rec[0]["num_images"] == 300
    assert test_rec[0]["top1_acc"] == pytest.approx(val[-1]["top1_acc"], abs=1e-3)
    assert h.ckpt_path(out, 6).is_file() and h.ckpt_path(out, 5).is_file()


def test_auto_resume_refuses_the_checkpoint_of_a_differently_configured_run(image_folder, tmp_path, run_net, capsys):
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, TEST__ENABLE=False)) == 0
    before = h.sha256(h.ckpt_path(out, 1))
    # Same OUTPUT_DIR, another learning rate: not a continuation of that run.
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, SOLVER__BASE_LR=0.01,
                                             TEST__ENABLE=False))
    assert rc == 2
    err = capsys.readouterr().err
    assert "SOLVER.BASE_LR" in err and "different config" in err
    assert h.sha256(h.ckpt_path(out, 1)) == before and not h.ckpt_path(out, 2).exists()
    # Changing only how long it runs is a continuation.
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, TEST__ENABLE=False)) == 0
    assert h.ckpt_path(out, 2).is_file()


def test_run_saved_before_the_cpu_settings_existed_resumes(image_folder, tmp_path, run_net):
    """KEEP_FREED_CPU_MEMORY and FLUSH_DENORMAL say how a CPU run executes, not what it trains: a run whose saved
    config predates them (no such keys), or that ran with other values, continues."""
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, TEST__ENABLE=False)) == 0
    saved = out / "config.yaml"
    lines = saved.read_text().splitlines(keepends=True)
    kept = [line for line in lines if not line.startswith(("FLUSH_DENORMAL:", "KEEP_FREED_CPU_MEMORY:"))]
    assert len(kept) == len(lines) - 2
    saved.write_text("".join(kept))
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, TEST__ENABLE=False,
                                               FLUSH_DENORMAL=False)) == 0
    assert h.ckpt_path(out, 2).is_file()


def test_digits_rejects_too_few_classes(tmp_path, run_net, capsys):
    rc = run_net(["--cfg", str(Path(__file__).resolve().parents[1] / "configs" / "demo" / "DeiT_Ti_digits.yaml"), "MODEL.NUM_CLASSES", "5",
                  "SOLVER.MAX_EPOCH", "2", "OUTPUT_DIR", str(tmp_path / "o")])
    assert rc == 2 and "MODEL.NUM_CLASSES" in capsys.readouterr().err
