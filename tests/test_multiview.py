"""Multi-view (video) testing in vitadapt.engine.evaluate / trainer.test: the views of a video are ensembled
(DATA.ENSEMBLE_METHOD sum / max, TEST.ENSEMBLE_SCORES logits / softmax) as PySlowFast's TestMeter does, undecodable
videos are excluded and counted, every view counts once across ranks, and the saved json / csv re-score.

A fake video data set whose every view carries its own logits and GMACs, and a stub model that returns them, make
every expected number computable by hand (no video decoding, no training).
"""

import csv
import importlib
import json
import logging
import threading

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

from vitadapt.config import ConfigError, load_config
from vitadapt.datasets.build import register_dataset
from vitadapt.datasets.loader import ShardSampler, _Indexed, collate_skipping_failures
from vitadapt.engine import trainer
from vitadapt.models.build import MODEL_REGISTRY
from vitadapt.utils import distributed as du

ev = importlib.import_module("vitadapt.engine.evaluate")  # the package exports the function under that name

VIEWS = 3
# Per video: (path, label, per-view logits, None for a view that does not decode). 3 classes.
VIDEOS = [
    # A: partial (3rd view undecodable). sum [0, 2, 0] -> 1; max [4, 2, 0] -> 0; mean softmax ~[.48, .45, .07] -> 0.
    ("a.mp4", 1, [[4.0, 0.0, 0.0], [-4.0, 2.0, 0.0], None]),
    # B: per-view majority and softmax say 1, the logit sum [10, 6, 0] and max [10, 3, 0] say 0.
    ("b.mp4", 0, [[10.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0]]),
    # C: no view decodes: excluded.
    ("c.mp4", 0, [None, None, None]),
    # D: every view and method -> 2.
    ("d.mp4", 2, [[0.0, 0.0, 1.0], [0.0, 0.5, 1.0], [0.2, 0.0, 1.0]]),
]
# Video top-1 (of A, B, D) per (DATA.ENSEMBLE_METHOD, TEST.ENSEMBLE_SCORES), by hand from the comments above.
EXPECTED_TOP1 = {("sum", "logits"): 100.0, ("max", "logits"): 200 / 3, ("sum", "softmax"): 100 / 3}
EXPECTED_PRED = {("sum", "logits"): [1, 0, 2], ("max", "logits"): [0, 0, 2], ("sum", "softmax"): [0, 1, 2]}


def gmacs(item: int) -> float:
    return 1.0 + item  # a different cost per view


DECODED = [v * VIEWS + k for v, (_, _, views) in enumerate(VIDEOS) for k, view in enumerate(views) if view is not None]
GMACS_PER_VIEW = sum(gmacs(i) for i in DECODED) / len(DECODED)  # 51 / 8
GMACS_PER_VIDEO = (gmacs(0) + gmacs(1) + gmacs(3) + gmacs(4) + gmacs(5) + gmacs(9) + gmacs(10) + gmacs(11)) / 3


@register_dataset("multiview_test_images")
class FakeImages:
    """VIEWS items per video (item i: video i // VIEWS, view i % VIEWS). An item is [3, 1, 1, num classes]: channel 0
    holds its logits, channel 1 its GMACs; an undecodable view is None, as Kinetics returns it. Without
    video_index, as here, the items are evaluated as images."""

    NEEDS_DATA_DIR = False

    def __init__(self, cfg=None, split="test"):
        pass

    def __len__(self):
        return len(VIDEOS) * VIEWS

    def __getitem__(self, item):
        _, label, views = VIDEOS[item // VIEWS]
        logits = views[item % VIEWS]
        if logits is None:
            return None
        x = torch.zeros(3, 1, 1, len(logits))
        x[0, 0, 0] = torch.tensor(logits)
        x[1, 0, 0] = gmacs(item)
        return x, label


@register_dataset("multiview_test_videos")
class FakeVideos(FakeImages):
    """The same items as views of videos: the interface of vitadapt.datasets.kinetics.Kinetics."""

    def __init__(self, cfg=None, split="test"):
        self.videos = [(path, label) for path, label, _ in VIDEOS]

    @property
    def num_videos(self):
        return len(self.videos)

    def video_index(self, item):
        return item // VIEWS


@MODEL_REGISTRY.register()
class MultiviewStub(nn.Module):
    """Returns the logits each view carries (times a weight, 1, so that a checkpoint has something to load)."""

    token_statistics = ()

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.last_macs = None

    @classmethod
    def from_config(cls, cfg):
        return cls()

    def forward(self, x):
        self.last_macs = x[:, 1, 0, 0, 0] * 1e9
        return x[:, 0, 0, 0, :] * self.scale

    def macs_per_image(self):
        return self.last_macs


def loader(dataset, rank=0, world=1, batch=2):
    return DataLoader(_Indexed(dataset), batch_size=batch, sampler=ShardSampler(len(dataset), rank, world),
                      collate_fn=collate_skipping_failures)


def run(dataset=None, method="sum", scores="logits", keep=False, rank=0, world=1):
    return ev.evaluate(MultiviewStub(), loader(dataset or FakeVideos(), rank, world), torch.device("cpu"),
                       keep_predictions=keep, ensemble_method=method, ensemble_scores=scores)


@pytest.mark.parametrize("method,scores", sorted(EXPECTED_TOP1))
def test_ensembles_give_the_hand_computed_video_predictions(method, scores):
    stats = run(method=method, scores=scores, keep=True)
    assert stats["video_top1_acc"] == pytest.approx(EXPECTED_TOP1[method, scores])
    videos = stats["video_predictions"]
    assert videos["video"].tolist() == [0, 1, 3] and videos["path"] == ["a.mp4", "b.mp4", "d.mp4"]
    assert videos["scores"].argmax(dim=1).tolist() == EXPECTED_PRED[method, scores]
    assert videos["labels"].tolist() == [1, 0, 2] and videos["views"].tolist() == [2, 3, 3]
    # The per-view statistics are unchanged: 5 of the 8 decoded views are right on their own (A 1, B 1, D 3).
    assert stats["num_images"] == 8 and stats["top1_acc"] == pytest.approx(62.5) and stats["skipped_images"] == 4
    assert stats["video_top5_acc"] == 100.0  # 3 classes: top-5 is every class


def test_ensembled_scores_by_formula():
    a = torch.tensor([[4.0, 0.0, 0.0], [-4.0, 2.0, 0.0]])
    by = {(m, s): run(method=m, scores=s, keep=True)["video_predictions"]["scores"][0] for m, s in EXPECTED_TOP1}
    torch.testing.assert_close(by["sum", "logits"], a.sum(0))
    torch.testing.assert_close(by["max", "logits"], a.max(0).values)
    torch.testing.assert_close(by["sum", "softmax"], a.softmax(1).mean(0))
    b = torch.tensor([[10.0, 0.0, 0.0], [0.0, 3.0, 0.0], [0.0, 3.0, 0.0]])
    assert b.argmax(1).mode().values.item() == 1 != b.sum(0).argmax().item()  # majority vote != logit sum


def test_excluded_and_partial_videos_are_counted_and_named(caplog):
    with caplog.at_level(logging.WARNING, logger="vitadapt.engine.evaluate"):
        stats = run()
    assert stats["num_videos"] == 3 and stats["excluded_videos"] == 1 and stats["partial_videos"] == 1
    assert stats["views_per_video"] == VIEWS
    assert any("c.mp4" in r.getMessage() and "excluded" in r.getMessage() for r in caplog.records)
    assert not any("a.mp4" in r.getMessage() for r in caplog.records)


def test_gmacs_per_video_is_the_sum_over_its_views():
    stats = run()
    assert stats["gmacs_per_view_mean"] == pytest.approx(GMACS_PER_VIEW)
    assert stats["gmacs_per_video_mean"] == pytest.approx(GMACS_PER_VIDEO)  # (3 + 15 + 33) / 3


def test_subset_of_the_items_maps_to_the_right_videos():
    # Items of B and D only (the loader's Subset positions differ from the data set's items).
    stats = run(Subset(FakeVideos(), list(range(3, 6)) + list(range(9, 12))), keep=True)
    assert stats["num_videos"] == 2 and stats["excluded_videos"] == 0 and stats["partial_videos"] == 0
    assert stats["video_predictions"]["video"].tolist() == [1, 3]
    assert stats["video_top1_acc"] == 100.0


class FakeWorld:
    """Two ranks as two threads: the collectives evaluate uses, exchanging through a barrier."""

    def __init__(self, monkeypatch, world=2):
        self.world, self.local, self.slots = world, threading.local(), [None] * world
        self.barrier = threading.Barrier(world)
        monkeypatch.setattr(du, "get_world_size", lambda: world)
        monkeypatch.setattr(du, "get_rank", lambda: self.local.rank)
        monkeypatch.setattr(du, "is_master", lambda: self.local.rank == 0)
        monkeypatch.setattr(du, "all_gather_objects", self.all_gather_objects)
        monkeypatch.setattr(du, "all_reduce_sum", lambda t: sum(self.all_gather_objects(t.clone())))

    def all_gather_objects(self, obj):
        self.slots[self.local.rank] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before every rank has read them
        return out

    def run(self, fn):
        results, errors = [None] * self.world, []

        def target(rank):
            self.local.rank = rank
            try:
                results[rank] = fn(rank)
            except Exception as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        if errors:
            raise errors[0]
        return results


def test_two_ranks_count_every_view_and_video_once(monkeypatch):
    single = run(keep=True)
    # Batch 1: views of one video are spread over both ranks (items 0, 2 on rank 0, item 1 on rank 1).
    ranks = FakeWorld(monkeypatch).run(lambda rank: run(keep=True, rank=rank, world=2) | {"rank": rank})
    for stats in ranks:
        assert stats["num_images"] == 8 and stats["num_videos"] == 3
        assert stats["excluded_videos"] == 1 and stats["partial_videos"] == 1
        for key in ("video_top1_acc", "video_top5_acc", "top1_acc", "gmacs_per_view_mean", "gmacs_per_video_mean"):
            assert stats[key] == pytest.approx(single[key]), key
        torch.testing.assert_close(stats["video_predictions"]["scores"], single["video_predictions"]["scores"])
        assert stats["video_predictions"]["views"].tolist() == [2, 3, 3]


@pytest.mark.parametrize("method,scores", sorted(EXPECTED_TOP1))
def test_saved_json_and_csv_rescore_to_the_reported_top1(tmp_path, method, scores):
    stats = run(method=method, scores=scores, keep=True)
    predictions, videos = stats["predictions"], stats["video_predictions"]
    trainer.save_results(str(tmp_path / "r.json"), predictions, videos)
    trainer.save_results(str(tmp_path / "r.csv"), predictions, videos)
    saved = json.loads((tmp_path / "r.json").read_text())
    assert (saved["ensemble_method"], saved["ensemble_scores"]) == (method, scores)
    rows = saved["rows"]
    assert [r["video"] for r in rows] == [0, 1, 3] and [r["path"] for r in rows] == ["a.mp4", "b.mp4", "d.mp4"]
    rescored = [max(range(3), key=lambda c: r["scores"][c]) for r in rows]
    assert rescored == [r["pred"] for r in rows] == EXPECTED_PRED[method, scores]
    assert 100.0 * sum(p == r["label"] for p, r in zip(rescored, rows)) / len(rows) == pytest.approx(
        stats["video_top1_acc"])
    with open(tmp_path / "r.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert list(table[0])[:5] == ["video", "path", "label", "pred", "top5"]
    scores_of = [[float(r[f"score_{c}"]) for c in range(3)] for r in table]
    rescored_csv = [max(range(3), key=lambda c: s[c]) for s in scores_of]
    assert rescored_csv == rescored and [int(r["pred"]) for r in table] == rescored
    assert [r["top5"].split()[0] for r in table] == [r["pred"] for r in table]
    assert 100.0 * sum(p == int(r["label"]) for p, r in zip(rescored_csv, table)) / len(table) == pytest.approx(
        stats["video_top1_acc"])
    assert not list(tmp_path.glob("*.tmp"))


def test_image_data_set_has_no_video_statistics_and_saves_per_image_rows(tmp_path):
    stats = run(FakeImages(), keep=True)
    assert "video_top1_acc" not in stats and "video_predictions" not in stats and stats["num_images"] == 8
    trainer.save_results(str(tmp_path / "r.json"), stats["predictions"], None)
    trainer.save_results(str(tmp_path / "r.csv"), stats["predictions"], None)
    rows = json.loads((tmp_path / "r.json").read_text())["rows"]
    assert [r["index"] for r in rows] == DECODED and set(rows[0]) == {"index", "label", "pred", "top5"}
    assert 100.0 * sum(r["pred"] == r["label"] for r in rows) / len(rows) == pytest.approx(stats["top1_acc"])
    with open(tmp_path / "r.csv", newline="") as f:
        assert list(csv.DictReader(f))[1] == {"index": "1", "label": "1", "pred": "1", "top5": "1 2 0"}


@pytest.mark.parametrize("key,value", [("DATA.ENSEMBLE_METHOD", "mean"), ("TEST.ENSEMBLE_SCORES", "probs")])
def test_bad_ensemble_keys_are_refused_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key):
        load_config("", [key, value])
    cfg = load_config("", [])
    assert (cfg.DATA.ENSEMBLE_METHOD, cfg.TEST.ENSEMBLE_SCORES) == ("sum", "logits")


@pytest.mark.parametrize("ext", ["json", "csv", "pth"])
def test_test_job_logs_per_video_and_saves(tmp_path, run_net, caplog, ext):
    """tools/run_net.py test-only on the fake video data set with the stub model (a checkpoint of its weight)."""
    ckpt = tmp_path / "stub.pth"
    torch.save({"model": MultiviewStub().state_dict()}, ckpt)
    opts = ["TRAIN.ENABLE", "False", "MODEL.NAME", "MultiviewStub", "MODEL.NUM_CLASSES", "3",
            "TEST.DATASET", "multiview_test_videos", "TEST.SPLIT", "test", "TEST.BATCH_SIZE", "2",
            "TEST.CHECKPOINT_FILE_PATH", str(ckpt), "TEST.SAVE_RESULTS_PATH", f"results.{ext}",
            "DATA.ENSEMBLE_METHOD", "max", "OUTPUT_DIR", str(tmp_path / "out"), "NUM_GPUS", "0",
            "DATA_LOADER.NUM_WORKERS", "0", "DATA_LOADER.PIN_MEMORY", "False", "LOG_MODEL_INFO", "False"]
    with caplog.at_level(logging.INFO):
        assert run_net(["--opts", *opts]) == 0
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "test on test (3 videos, 3 views each): video top1 66.67% top5 100.00%" in text
    assert "per view: top1 62.50%" in text and "1 video(s) excluded" in text and "c.mp4" in text
    assert f"per video: mean {GMACS_PER_VIDEO:.4f}" in text
    out = tmp_path / "out" / f"results.{ext}"
    if ext == "json":
        rows = json.loads(out.read_text())["rows"]
        assert [r["pred"] for r in rows] == EXPECTED_PRED["max", "logits"]
    elif ext == "csv":
        assert out.read_text().startswith("video,path,label,pred,top5,score_0,score_1,score_2")
    else:
        saved = torch.load(out, weights_only=False)
        assert saved["index"].tolist() == DECODED
        assert saved["videos"]["scores"].argmax(1).tolist() == EXPECTED_PRED["max", "logits"]
