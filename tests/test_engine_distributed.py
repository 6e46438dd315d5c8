"""Distributed training and evaluation on the CPU: 2 gloo processes through vitadapt.engine.launch_job, and
2 torchrun-style processes (env://) running tools/run_net.py.

Spawned processes re-import torch and timm (seconds each), so one module-scoped run serves most tests.
"""

import functools
import os
import subprocess
import sys
import time

import pytest
import torch

import helpers_e2e as h
from vitadapt.config import load_config
from vitadapt.engine import launch_job
from vitadapt.engine import test as run_test

N_VAL = 7  # odd: the two ranks evaluate 4 and 3 images


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    data = h.make_image_folder(root / "data", train_counts=(8, 8, 8), val_counts=(3, 2, 2))
    assert len(h.list_split(data, "val")) == N_VAL
    out, ema_out = root / "out", root / "ema"
    cfg = load_config("", h.tiny_opts(data, out, NUM_PROCS=2, SOLVER__MAX_EPOCH=2, AUG__ENABLE=True,
                                      VIT__DROP_PATH_RATE=0.1, TEST__SAVE_RESULTS_PATH="predictions.pth"),
                      check_files=True)
    # A second, one-epoch run with a (fast) EMA, whose per-rank EMA weights the job saves.
    ema_cfg = load_config("", h.tiny_opts(data, ema_out, NUM_PROCS=2, SOLVER__MAX_EPOCH=1, MODEL_EMA__ENABLE=True,
                                          MODEL_EMA__DECAY=0.5, MODEL_EMA__EVAL=True, TEST__ENABLE=False),
                          check_files=True)
    # Resume: an uninterrupted 3-epoch run, and one interrupted half-way through epoch 2, then restarted.
    resume_opts = dict(NUM_PROCS=2, SOLVER__MAX_EPOCH=3, SOLVER__WARMUP_EPOCHS=1.0, AUG__ENABLE=True,
                       MIXUP__ENABLE=True, VIT__DROP_PATH_RATE=0.2, TEST__ENABLE=False)
    resume_cfgs = tuple(load_config("", h.tiny_opts(data, root / name, **resume_opts), check_files=True)
                        for name in ("resume_a", "resume_b"))
    start = time.perf_counter()
    result = launch_job(cfg, functools.partial(h.distributed_job, ema_cfg=ema_cfg, resume_cfgs=resume_cfgs,
                                               stop_epoch=1.5))
    return {"root": root, "data": data, "out": out, "ema_out": ema_out, "cfg": cfg, "result": result,
            "resume_b": root / "resume_b", "seconds": time.perf_counter() - start}


def test_every_rank_ends_with_identical_parameters(dist_run):
    out = dist_run["out"]
    assert dist_run["result"] is None  # spawned: the job ran in the workers, not here
    s0 = torch.load(out / "rank0.pt", map_location="cpu", weights_only=True)
    s1 = torch.load(out / "rank1.pt", map_location="cpu", weights_only=True)
    assert set(s0) == set(s1) and "head.weight" in s0
    different = [k for k in s0 if not torch.equal(s0[k], s1[k])]
    assert not different, f"ranks disagree on {different}"
    saved = h.load_ckpt(h.ckpt_path(out, 2))["model_state"]
    assert all(torch.equal(saved[k], s0[k]) for k in s0)
    # ... and training did move them away from the initialisation of either rank.
    first = h.load_ckpt(h.ckpt_path(out, 1))["model_state"]
    assert not torch.equal(first["head.weight"], s0["head.weight"])


def test_only_rank0_writes_checkpoints_and_stats(dist_run):
    out = dist_run["out"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
        "checkpoint_epoch_00001.pyth", "checkpoint_epoch_00002.pyth"]
    assert [r["epoch"] for r in h.records(out, "train_epoch")] == [1, 2]
    assert [r["epoch"] for r in h.records(out, "val")] == [1, 2]
    assert len(h.records(out, "test_final")) == 1
    log = (out / "stdout.log").read_text()
    assert log.count("train job, 2 process(es)") == 1
    assert log.count("test job, 2 process(es)") == 1


def test_distributed_evaluation_counts_every_image_once(dist_run):
    out = dist_run["out"]
    for r in h.records(out, "val") + h.records(out, "test_final"):
        assert r["num_images"] == N_VAL
    for rank in (0, 1):  # every rank returns the reduced, global numbers
        stats = torch.load(out / f"test_stats_rank{rank}.pt", weights_only=True)
        assert stats["num_images"] == N_VAL
    preds = torch.load(out / "predictions.pth", map_location="cpu", weights_only=True)
    assert torch.equal(preds["index"], torch.arange(N_VAL))
    assert preds["labels"].tolist() == [label for _, label in h.list_split(dist_run["data"], "val")]


def test_distributed_top1_equals_single_process_evaluation(dist_run, tmp_path):
    out = dist_run["out"]
    ckpt = h.ckpt_path(out, 2)
    single = load_config("", h.tiny_opts(dist_run["data"], tmp_path / "single", TRAIN__ENABLE=False,
                                         TEST__CHECKPOINT_FILE_PATH=str(ckpt),
                                         TEST__SAVE_RESULTS_PATH="predictions.pth"), check_files=True)
    stats = run_test(single)
    dist_test = h.records(out, "test_final")[0]
    assert stats["num_images"] == dist_test["num_images"] == N_VAL
    assert dist_test["top1_acc"] == pytest.approx(stats["top1_acc"], abs=1e-3)
    assert dist_test["top5_acc"] == pytest.approx(stats["top5_acc"], abs=1e-3)
    assert dist_test["loss"] == pytest.approx(stats["loss"], rel=1e-4)
    # The distributed validation after the last epoch saw the same weights.
    assert h.records(out, "val")[-1]["top1_acc"] == pytest.approx(stats["top1_acc"], abs=1e-3)
    p_dist = torch.load(out / "predictions.pth", weights_only=True)
    p_single = torch.load(tmp_path / "single" / "predictions.pth", weights_only=True)
    assert torch.equal(p_dist["index"], p_single["index"])
    torch.testing.assert_close(p_dist["logits"], p_single["logits"], atol=1e-5, rtol=0)


def test_distributed_ema_weights_identical_across_ranks(dist_run):
    ema_out = dist_run["ema_out"]
    e0 = torch.load(ema_out / "ema_rank0.pt", map_location="cpu", weights_only=True)
    e1 = torch.load(ema_out / "ema_rank1.pt", map_location="cpu", weights_only=True)
    assert all(torch.equal(e0["model"][k], e1["model"][k]) for k in e0["model"])  # DDP keeps these in sync
    different = [k for k in e0["ema"] if not torch.equal(e0["ema"][k], e1["ema"][k])]
    assert not different, f"EMA weights differ across ranks in {different}"


def test_distributed_resume_is_bit_identical_to_uninterrupted_run(dist_run):
    """Interrupted (on every rank) half-way through epoch 2, restarted, resumed from the epoch-1 checkpoint:
    every rank ends where the uninterrupted run ends. Augmentation, mixup and drop path draw from each
    rank's own RNG stream, so every rank's stream must be restored, not only rank 0's."""
    out = dist_run["resume_b"]
    assert h.ckpt_path(out, 3).is_file()
    for rank in (0, 1):
        saved = torch.load(out / f"resume_rank{rank}.pt", map_location="cpu", weights_only=True)
        assert saved["start_epoch"] == 1
        a, b = saved["uninterrupted"], saved["resumed"]
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"rank {rank}: the resumed run differs from the uninterrupted one in {different}"


def test_error_in_spawned_workers_is_reported_like_in_one_process(image_folder, tmp_path, run_net, capsys):
    """The ConfigError of a test-only run without any checkpoint, raised inside both spawned workers."""
    out = tmp_path / "out"
    try:
        rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, out, NUM_PROCS=2, TRAIN__ENABLE=False))
    except Exception as e:  # noqa: BLE001  (a worker's error must not escape main())
        pytest.fail(f"run_net.main raised {type(e).__name__} instead of returning an error code: {str(e)[-300:]}")
    assert rc != 0
    assert "random weights" in capsys.readouterr().err


# ---------------------------------------------------------------- torchrun-style env:// rendezvous
def test_torchrun_style_env_rendezvous(tmp_path, image_folder):
    """What `torchrun --nproc_per_node 2 tools/run_net.py ...` does: RANK/WORLD_SIZE/LOCAL_RANK and
    MASTER_ADDR/MASTER_PORT set in each of two processes; each runs the train job, then the test job."""
    out = tmp_path / "out"
    opts = h.tiny_opts(image_folder, out, NUM_PROCS=2, SOLVER__MAX_EPOCH=1)
    port = h.free_port()
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore")
        procs.append(subprocess.Popen([sys.executable, str(h.RUN_NET_PATH), "--cfg", ""] + opts, env=env,
                                      cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=150)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, p in enumerate(procs):
        assert p.returncode == 0, f"rank {rank} failed:\n{outputs[rank][-3000:]}"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint_epoch_00001.pyth"]
    assert [r["epoch"] for r in h.records(out, "train_epoch")] == [1]
    val, test_rec = h.records(out, "val"), h.records(out, "test_final")
    assert len(val) == 1 and len(test_rec) == 1
    assert val[0]["num_images"] == test_rec[0]["num_images"] == N_VAL
    assert "train job, 2 process(es)" in outputs[0]
    assert "train job" not in outputs[1]  # rank 1 logs warnings and errors only


def test_torchrun_world_size_must_match_config(image_folder, tmp_path, run_net, capsys, monkeypatch):
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "2")):
        monkeypatch.setenv(key, value)
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", NUM_PROCS=1))
    assert rc != 0
    err = capsys.readouterr().err
    assert "torchrun" in err and "NUM_PROCS" in err


def test_multi_shard_needs_init_method(image_folder, tmp_path, run_net, capsys):
    rc = run_net(["--cfg", ""] + h.tiny_opts(image_folder, tmp_path / "out", NUM_PROCS=1, NUM_SHARDS=2))
    assert rc != 0
    assert "--init_method" in capsys.readouterr().err


def test_batch_of_undecodable_images_on_one_rank_is_skipped_by_every_rank(tmp_path, run_net):
    """Per-process batch 1: the step whose only image cannot be decoded on one rank is skipped on both, so DDP's
    collectives stay matched (otherwise gloo aborts on mismatched sizes and NCCL hangs)."""
    data = h.make_image_folder(tmp_path / "data", train_counts=(3, 2, 2), val_counts=(2, 1, 1))
    (next((data / "train").iterdir()) / "zz_corrupt.jpg").write_bytes(b"not an image" * 20)
    out = tmp_path / "out"
    rc = run_net(["--cfg", ""] + h.tiny_opts(data, out, NUM_PROCS=2, SOLVER__MAX_EPOCH=1, TRAIN__BATCH_SIZE=2,
                                             TEST__BATCH_SIZE=2, TEST__ENABLE=False))
    assert rc == 0
    epoch = [r for r in h.read_stats(out) if r["_type"] == "train_epoch"]
    assert len(epoch) == 1 and epoch[0]["skipped_images"] == 1
    assert h.ckpt_path(out, 1).is_file()
