"""Issue 9, engine: no lost run, no silent wrong result, one clear error, progress everywhere.

Each test runs the real entry point (tools/run_net.py's main) or the Trainer on a tiny model and generated data.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import helpers_e2e as h


def folder_digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): h.sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_records(output_dir) -> list:
    """json_stats.log read as strict JSON (NaN / Infinity tokens are an error)."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    text = (Path(output_dir) / "json_stats.log").read_text()
    return [json.loads(line, parse_constant=refuse) for line in text.splitlines() if line.strip()]


def corrupt_images(folder: Path) -> int:
    files = sorted(folder.rglob("*.png"))
    for path in files:
        path.write_bytes(b"not an image")
    return len(files)


# ---------------------------------------------------------------- a run never overwrites another run
def test_auto_resume_false_refuses_an_output_dir_holding_another_run(image_folder, tmp_path, run_net, capsys):
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1)) == 0
    before = folder_digests(out)
    first_top1 = h.records(out, "test_final")[0]["top1_acc"]
    capsys.readouterr()
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, TRAIN__AUTO_RESUME=False,
                                             SOLVER__BASE_LR=0.5, TRAIN__KEEP_LAST_K=1))
    assert rc == 2
    err = capsys.readouterr().err
    assert "TRAIN.AUTO_RESUME is False" in err and str(out) in err and "another OUTPUT_DIR" in err
    assert folder_digests(out) == before  # not one byte of the old run changed, no file added
    assert h.records(out, "test_final")[0]["top1_acc"] == first_top1


def test_refused_resume_changes_nothing_in_output_dir(image_folder, tmp_path, run_net, capsys):
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, TEST__ENABLE=False)) == 0
    before = folder_digests(out)
    assert "config.yaml" in before and "stdout.log" in before
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, SOLVER__BASE_LR=0.01))
    assert rc == 2
    assert "SOLVER.BASE_LR" in capsys.readouterr().err
    assert folder_digests(out) == before  # config.yaml still describes the run the folder holds


def test_test_job_after_training_evaluates_the_checkpoint_this_run_wrote(image_folder, tmp_path, run_net):
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, TRAIN__KEEP_LAST_K=1)) == 0
    assert [p.name for p in (out / "checkpoints").iterdir()] == [h.ckpt_path(out, 2).name]
    assert h.records(out, "test_final")[0]["checkpoint"] == str(h.ckpt_path(out, 2))


def test_output_dir_that_cannot_be_created_is_named_at_start_up(image_folder, tmp_path, run_net, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, blocker / "out"))
    assert rc == 2
    err = capsys.readouterr().err
    assert "OUTPUT_DIR cannot be created or written" in err and str(blocker / "out") in err
    assert "Traceback" not in err


# ---------------------------------------------------------------- NaN and inf are reported, not crashed on
def test_nan_evaluation_is_written_as_strict_json_and_reported(image_folder, tmp_path, run_net, capsys, monkeypatch):
    from vitadapt.models.vit import VisionTransformer

    forward_head = VisionTransformer.forward_head

    def nan_in_eval(self, tokens):
        logits = forward_head(self, tokens)
        return logits if self.training else logits * float("nan")

    monkeypatch.setattr(VisionTransformer, "forward_head", nan_in_eval)
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1)) == 0
    records = strict_records(out)
    val = [r for r in records if r["_type"] == "val"]
    final = [r for r in records if r["_type"] == "test_final"]
    assert len(val) == 1 and len(final) == 1
    for r in val + final:
        assert r["loss"] is None and r["nonfinite"] == {"loss": "nan"}
        assert r["nonfinite_images"] == r["num_images"] == 7
    logged = capsys.readouterr().out
    assert "NaN or infinite for 7 of 7 images" in logged


def diverging_trainer(cfg, after_step):
    from vitadapt.engine import Hook, Trainer

    class Explode(Hook):
        def after_step(self, trainer):
            after_step(trainer)

    trainer = Trainer(cfg)
    trainer.hooks.append(Explode())
    return trainer


def test_nan_stop_does_not_call_the_checkpoint_of_the_bad_weights_good(image_folder, tmp_path):
    """One iteration per epoch: the weights of epoch 1's checkpoint are the ones whose loss is NaN."""
    from vitadapt.config import load_config
    from vitadapt.engine import TrainingDiverged

    data = h.make_image_folder(tmp_path / "data", train_counts=(3, 3, 2), val_counts=(1, 1, 1))
    out = tmp_path / "out"
    cfg = load_config("", h.tiny_opts(data, out, SOLVER__MAX_EPOCH=3, TEST__ENABLE=False))

    def blow_up(trainer):  # the weights explode on the first step (as with a huge learning rate)
        if trainer.global_step == 1:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.mul_(1e30)

    with pytest.raises(TrainingDiverged) as info:
        diverging_trainer(cfg, blow_up).run()
    message = str(info.value)
    first = str(h.ckpt_path(out, 1))
    assert "epoch 2, iteration 1" in message
    assert f"{first} holds exactly the weights on which the loss became non-finite" in message
    assert "last good checkpoint" not in message
    val = h.records(out, "val")
    assert len(val) == 1 and val[0]["loss"] is None  # its validation was NaN, flagged in the stats


def test_nan_stop_names_a_validated_checkpoint_as_good(image_folder, tmp_path):
    from vitadapt.config import load_config
    from vitadapt.engine import TrainingDiverged

    out = tmp_path / "out"
    cfg = load_config("", h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=3, TEST__ENABLE=False))
    iters = 3  # 24 images, batch 8

    def blow_up(trainer):  # in the middle of epoch 2
        if trainer.global_step == iters + 2:
            with torch.no_grad():
                for p in trainer.model.parameters():
                    p.fill_(float("inf"))

    with pytest.raises(TrainingDiverged) as info:
        diverging_trainer(cfg, blow_up).run()
    message = str(info.value)
    val_loss = h.records(out, "val")[0]["loss"]
    assert f"the last good checkpoint is {h.ckpt_path(out, 1)} (finite weights, val loss {val_loss:.4g})" in message


def test_non_finite_weights_are_never_saved(image_folder, tmp_path):
    from vitadapt.config import load_config
    from vitadapt.engine import TrainingDiverged

    out = tmp_path / "out"
    cfg = load_config("", h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, TEST__ENABLE=False))

    def poison_last_step(trainer):  # the last step of epoch 1 leaves a NaN weight, the loss of that step was fine
        if trainer.global_step == 3:
            with torch.no_grad():
                trainer.model.head.bias[0] = float("nan")

    with pytest.raises(TrainingDiverged) as info:
        diverging_trainer(cfg, poison_last_step).run()
    assert "weights became NaN or infinite during epoch 1" in str(info.value)
    assert "No checkpoint was written" in str(info.value)
    assert not h.ckpt_path(out, 1).exists()


# ---------------------------------------------------------------- nothing to learn from is an error
def test_epoch_where_every_image_was_skipped_stops_with_a_message(make_image_folder, tmp_path, run_net, capsys):
    data = make_image_folder()
    assert corrupt_images(data / "train") == 24
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, out))
    assert rc == 2
    captured = capsys.readouterr()
    message = "epoch 1: no training image could be used (24 skipped as undecodable"
    assert message in captured.err
    assert not (out / "checkpoints").exists()
    # Printed once on the console (stderr), and kept once in the log file.
    assert (captured.out + captured.err).count(message) == 1
    assert (out / "stdout.log").read_text().count(message) == 1


def test_test_job_on_an_all_corrupt_split_says_so(make_image_folder, tmp_path, run_net, capsys):
    data = make_image_folder()
    corrupt_images(data / "val")
    ckpt = tmp_path / "w.pth"
    torch.save(h.timm_vit().state_dict(), ckpt)
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(ckpt)))
    assert rc == 2
    assert "no image of the test on val split could be decoded (7 skipped" in capsys.readouterr().err


# ---------------------------------------------------------------- outputs are checked before the work
def test_save_results_path_folder_is_created_at_start_up(image_folder, tmp_path, run_net):
    out = tmp_path / "out"
    ckpt = tmp_path / "w.pth"
    torch.save(h.timm_vit().state_dict(), ckpt)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, TRAIN__ENABLE=False, TEST__CHECKPOINT_FILE_PATH=str(ckpt),
                                             TEST__SAVE_RESULTS_PATH="results/new/preds.pt"))
    assert rc == 0
    saved = torch.load(out / "results/new/preds.pt", weights_only=True)
    assert saved["index"].tolist() == list(range(7)) and saved["logits"].shape == (7, 3)


def test_unwritable_save_results_path_fails_before_evaluating(image_folder, tmp_path, run_net, capsys, monkeypatch):
    import vitadapt.engine.trainer as trainer_mod

    calls = []
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **k: calls.append(1))
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    ckpt = tmp_path / "w.pth"
    torch.save(h.timm_vit().state_dict(), ckpt)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", TRAIN__ENABLE=False,
                                             TEST__CHECKPOINT_FILE_PATH=str(ckpt),
                                             TEST__SAVE_RESULTS_PATH=str(blocker / "preds.pt")))
    assert rc == 2 and not calls
    assert "TEST.SAVE_RESULTS_PATH (its folder) cannot be created or written" in capsys.readouterr().err


# ---------------------------------------------------------------- logs a reader can trust
def test_resumed_run_writes_each_epoch_record_once(image_folder, tmp_path, run_net):
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, TEST__ENABLE=False)) == 0
    # A run stopped after epoch 2's records but before its checkpoint: the resumed run repeats epoch 2.
    h.ckpt_path(out, 2).unlink()
    old_epoch2 = [r for r in h.read_stats(out) if r["epoch"] == 2]
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=2, TEST__ENABLE=False)) == 0
    assert [r["epoch"] for r in h.records(out, "train_epoch")] == [1, 2]
    assert [r["epoch"] for r in h.records(out, "val")] == [1, 2]
    moved = [json.loads(line) for line in (out / "json_stats.superseded.log").read_text().splitlines()]
    assert moved == old_epoch2  # kept aside, not lost


def test_config_error_is_printed_once(tmp_path):
    proc = subprocess.run([sys.executable, str(h.RUN_NET_PATH), "SOLVER.NO_SUCH_KEY", "1", "OUTPUT_DIR",
                           str(tmp_path / "o")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert (proc.stdout + proc.stderr).count("SOLVER.NO_SUCH_KEY") == 1
    assert proc.stderr.startswith("error: unknown config key 'SOLVER.NO_SUCH_KEY'")


def test_no_future_warning_at_start_up():
    tool = h.REPO / "tools" / "run_net.py"
    proc = subprocess.run([sys.executable, "-W", "error::FutureWarning", str(tool), "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr


def test_evaluation_logs_progress_with_running_top1_and_eta(image_folder, tmp_path, run_net, capsys):
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1)) == 0
    log = (out / "stdout.log").read_text()
    # TEST.BATCH_SIZE 4 over 7 images, LOG_PERIOD 1: after 4 and after 7 images, in validation and in the test.
    for label in ("val epoch 1", "test on val"):
        for done in (4, 7):
            assert f"{label}: {done}/7 images, top1 so far" in log
    assert log.count("eta ") >= 4


@pytest.mark.parametrize("name, extra, token_stats", [
    ("VisionTransformer", {}, ()),
    ("ATSVisionTransformer", {"ATS__BLOCKS": [1]}, ("tokens_per_block_mean",)),
    ("AViTVisionTransformer", {"AVIT__PRIOR_TARGET_DEPTH": 1}, ("tokens_per_block_mean", "token_depth_mean")),
])
def test_token_statistics_are_logged_only_where_defined(image_folder, tmp_path, run_net, name, extra, token_stats):
    out = tmp_path / "out"
    assert run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, SOLVER__MAX_EPOCH=1, MODEL__NAME=name,
                                               **extra)) == 0
    final = h.records(out, "test_final")[0]
    train = h.records(out, "train_epoch")[0]
    for key in ("tokens_per_block_mean", "token_depth_mean"):
        assert (key in final) == (key in token_stats), key
    assert ("token_depth" in train) == ("token_depth_mean" in token_stats)
    progress = [line for line in (out / "stdout.log").read_text().splitlines() if " iter " in line]
    assert progress and all(("token_depth" in line) == ("token_depth_mean" in token_stats) for line in progress)
    assert "gmacs_mean" in final
