"""vitadapt.datasets.kinetics: the Kinetics-format video data set (list files, views, failures, loader)."""

import logging
import os
import shutil

import numpy as np
import pytest

from helpers_e2e import load_tool as load_tool_module
import torch

from vitadapt.config import ConfigError, load_config
from vitadapt.datasets import DataError, build_dataset, construct_loader

FPS = 8


def load_tool():
    return load_tool_module("make_video_demo_data")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("kinetics") / "demo")
    os.makedirs(out)
    load_tool().make_dataset(out, classes=2, per_class_train=2, per_class_val=1, frames=8, size=32, fps=FPS)
    return out


def config(root, *extra):
    opts = ["DATA.PATH_TO_DATA_DIR", root, "MODEL.NUM_CLASSES", "2", "TRAIN.DATASET", "kinetics",
            "TEST.DATASET", "kinetics", "DATA.NUM_FRAMES", "4", "DATA.SAMPLING_RATE", "2",
            "DATA.TARGET_FPS", str(FPS), "DATA.TRAIN_CROP_SIZE", "32", "DATA.TEST_CROP_SIZE", "32",
            "DATA.TRAIN_JITTER_SCALES", "[32, 40]", "DATA_LOADER.NUM_WORKERS", "0", "NUM_GPUS", "0",
            "TRAIN.BATCH_SIZE", "2", "TEST.BATCH_SIZE", "2", *extra]
    return load_config("", opts)


def copy_of(demo, tmp_path):
    root = str(tmp_path / "copy")
    shutil.copytree(demo, root)
    return root


def test_train_items(demo):
    ds = build_dataset("kinetics", config(demo), "train")
    assert len(ds) == ds.num_videos == 4
    with open(os.path.join(demo, "train.csv")) as f:
        labels = [int(line.split(" ")[1]) for line in f.read().splitlines()]
    for i in range(len(ds)):
        clip, label = ds[i]
        assert clip.shape == (3, 4, 32, 32) and clip.dtype == torch.float32
        assert label == labels[i]
        assert torch.isfinite(clip).all()


def test_val_is_one_item_per_video(demo):
    ds = build_dataset("kinetics", config(demo), "val")
    assert len(ds) == 2 and ds[0][0].shape == (3, 4, 32, 32)


def test_test_views_and_crops(demo, tmp_path):
    # A wide (64 x 32) video with a horizontal ramp, so the left/centre/right crops differ.
    tool = load_tool()
    root = str(tmp_path / "wide")
    os.makedirs(os.path.join(root, "videos"))
    ramp = np.broadcast_to(np.linspace(0, 255, 64).astype(np.uint8)[None, None, :, None], (8, 32, 64, 3))
    for name in ("a", "b"):
        tool.write_video(os.path.join(root, "videos", f"{name}.mp4"), np.ascontiguousarray(ramp), FPS,
                         tool.pick_codec())
    with open(os.path.join(root, "test.csv"), "w") as f:
        f.write("videos/a.mp4 0\nvideos/b.mp4 1\n")
    cfg = config(root, "TEST.NUM_ENSEMBLE_VIEWS", "2", "TEST.NUM_SPATIAL_CROPS", "3")
    ds = build_dataset("kinetics", cfg, "test")
    assert ds.num_videos == 2 and len(ds) == 2 * 2 * 3
    expected = [(v, t, s) for v in range(2) for t in range(2) for s in range(3)]
    assert [ds.view(i) for i in range(len(ds))] == expected
    assert [ds.video_index(i) for i in range(len(ds))] == [v for v, _, _ in expected]
    items = [ds[i] for i in range(len(ds))]
    assert all(clip.shape == (3, 4, 32, 32) for clip, _ in items)
    assert [label for _, label in items] == [0] * 6 + [1] * 6
    # Crops 0/1/2 are at x = 0, 16, 32 of the ramp: their mean brightness rises.
    means = [items[s][0].mean().item() for s in range(3)]
    assert means[0] < means[1] < means[2]
    # Deterministic: the same item twice is the same clip.
    assert torch.equal(ds[4][0], ds[4][0])


def test_single_crop_is_centre_of_jitter_min(demo):
    cfg = config(demo, "TEST.NUM_ENSEMBLE_VIEWS", "1", "TEST.NUM_SPATIAL_CROPS", "1")
    ds = build_dataset("kinetics", cfg, "test")
    assert len(ds) == 2 and ds[0][0].shape == (3, 4, 32, 32)


def test_loader_batches(demo):
    loader = construct_loader(config(demo), "train")
    batches = list(loader)
    assert len(batches) == 2
    for batch in batches:
        assert batch["inputs"].shape == (2, 3, 4, 32, 32)
        assert batch["labels"].shape == (2,) and batch["skipped"] == 0


def test_corrupt_video_is_skipped_with_a_warning(demo, tmp_path, caplog):
    root = copy_of(demo, tmp_path)
    with open(os.path.join(root, "train.csv")) as f:
        bad = os.path.join(root, f.readline().split(" ")[0])
    with open(bad, "wb") as f:
        f.write(b"this is not a video" * 50)
    cfg = config(root)
    with caplog.at_level(logging.WARNING, logger="vitadapt.datasets.kinetics"):
        assert build_dataset("kinetics", cfg, "train")[0] is None
        assert any(bad in r.getMessage() for r in caplog.records)
        batches = list(construct_loader(cfg, "train"))
    assert sum(b["skipped"] for b in batches) == 1
    assert sum(len(b["labels"]) for b in batches if b["labels"] is not None) == 3


def test_missing_video_is_skipped(demo, tmp_path, caplog):
    root = copy_of(demo, tmp_path)
    with open(os.path.join(root, "val.csv")) as f:
        missing = os.path.join(root, f.readline().split(" ")[0])
    os.remove(missing)
    with caplog.at_level(logging.WARNING, logger="vitadapt.datasets.kinetics"):
        assert build_dataset("kinetics", config(root), "val")[0] is None
    assert any(missing in r.getMessage() for r in caplog.records)


def test_short_video_clamped_with_one_warning(demo, caplog):
    # 8 frames at 8 fps; a clip of 4 x 8 at TARGET_FPS 8 spans 32 frames: with "clamp", kept and warned once.
    ds = build_dataset("kinetics", config(demo, "DATA.SAMPLING_RATE", "8", "DATA.SHORT_VIDEO", "clamp"), "train")
    with caplog.at_level(logging.WARNING, logger="vitadapt.datasets.kinetics"):
        assert ds[0][0].shape == (3, 4, 32, 32)
        ds[0]
    short = [r for r in caplog.records if "shorter than a clip" in r.getMessage()]
    assert len(short) == 1 and ds.videos[0][0] in short[0].getMessage()


def test_short_video_skipped_and_counted_by_default(demo, caplog):
    cfg = config(demo, "DATA.SAMPLING_RATE", "8")
    ds = build_dataset("kinetics", cfg, "train")
    with caplog.at_level(logging.WARNING, logger="vitadapt.datasets.kinetics"):
        assert ds[0] is None
        batches = list(construct_loader(cfg, "train"))
    assert any(ds.videos[0][0] in r.getMessage() and "skipping" in r.getMessage() for r in caplog.records)
    assert sum(b["skipped"] for b in batches) == len(ds)  # every demo video is 8 frames: all skipped, all counted


def test_short_video_key_is_checked(demo):
    with pytest.raises(ConfigError, match="DATA.SHORT_VIDEO"):
        config(demo, "DATA.SHORT_VIDEO", "pad")


@pytest.mark.parametrize("line, problem", [
    ("videos/train/00000.mp4", "field"),
    ("videos/train/00000.mp4 1 2", "field"),
    ("videos/train/00000.mp4 one", "integer"),
    ("videos/train/00000.mp4 2", "outside"),
    ("videos/train/00000.mp4 -1", "outside"),
])
def test_malformed_lines(demo, tmp_path, line, problem):
    root = copy_of(demo, tmp_path)
    path = os.path.join(root, "train.csv")
    with open(path) as f:
        lines = f.read().splitlines()
    lines.insert(2, line)
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=problem) as info:
        build_dataset("kinetics", config(root), "train")
    assert f"{path} line 3" in str(info.value)


def test_missing_and_empty_lists(demo, tmp_path):
    root = copy_of(demo, tmp_path)
    os.remove(os.path.join(root, "test.csv"))
    with pytest.raises(DataError, match="test.csv"):
        build_dataset("kinetics", config(root), "test")
    open(os.path.join(root, "val.csv"), "w").close()
    with pytest.raises(DataError, match="val.csv is empty"):
        build_dataset("kinetics", config(root), "val")


def test_path_prefix(demo, tmp_path):
    root = str(tmp_path / "lists")
    os.makedirs(root)
    shutil.copy(os.path.join(demo, "val.csv"), root)
    ds = build_dataset("kinetics", config(root, "DATA.PATH_PREFIX", demo), "val")
    assert ds.videos[0][0] == os.path.join(demo, "videos/val/00000.mp4")
    assert ds[0][0].shape == (3, 4, 32, 32)


def test_separator(demo, tmp_path):
    root = copy_of(demo, tmp_path)
    path = os.path.join(root, "val.csv")
    with open(path) as f:
        text = f.read().replace(" ", ",")
    with open(path, "w") as f:
        f.write(text)
    assert build_dataset("kinetics", config(root, "DATA.PATH_LABEL_SEPARATOR", ","), "val").num_videos == 2


@pytest.mark.parametrize("opts, key", [
    (["DATA.DECODING_BACKEND", "torchvision"], "DATA.DECODING_BACKEND"),
    (["DATA.NUM_FRAMES", "0"], "DATA.NUM_FRAMES"),
    (["DATA.SAMPLING_RATE", "-1"], "DATA.SAMPLING_RATE"),
    (["DATA.TARGET_FPS", "0"], "DATA.TARGET_FPS"),
    (["DATA.TRAIN_JITTER_SCALES", "[320, 256]"], "DATA.TRAIN_JITTER_SCALES"),
    (["DATA.PATH_LABEL_SEPARATOR", ""], "DATA.PATH_LABEL_SEPARATOR"),
    (["TEST.NUM_ENSEMBLE_VIEWS", "0"], "TEST.NUM_ENSEMBLE_VIEWS"),
    (["TEST.NUM_SPATIAL_CROPS", "4"], "TEST.NUM_SPATIAL_CROPS"),
])
def test_bad_video_keys_refused(opts, key):
    with pytest.raises(ConfigError, match=key) as info:
        load_config("", opts)
    if "torchvision" in opts:
        assert "torchvision 0.29" in str(info.value)
