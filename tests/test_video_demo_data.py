"""tools/make_video_demo_data.py: the synthetic Kinetics-format video set (layout, decoding, determinism, and a
label that only the motion carries)."""

import json
import os

import av
import numpy as np
import pytest

from helpers_e2e import load_tool as load_tool_module

FRAMES, SIZE, CLASSES, TRAIN, VAL = 8, 32, 6, 3, 2


def load_tool():
    return load_tool_module("make_video_demo_data")


tool = load_tool()


def make(out, seed=0, *extra):
    argv = ["--out", str(out), "--classes", str(CLASSES), "--per-class-train", str(TRAIN), "--per-class-val",
            str(VAL), "--frames", str(FRAMES), "--size", str(SIZE), "--seed", str(seed), *extra]
    assert tool.main(argv) == 0
    return str(out)


def read_list(out, split):
    with open(os.path.join(out, f"{split}.csv")) as f:
        return [(line.split(" ")[0], int(line.split(" ")[1])) for line in f.read().splitlines()]


def decode(path):
    with av.open(path) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make(tmp_path_factory.mktemp("videos") / "demo")


def test_layout_and_decoding(dataset):
    with open(os.path.join(dataset, "classes.json")) as f:
        assert json.load(f) == {name: i for i, name in enumerate(tool.CLASS_NAMES[:CLASSES])}
    assert read_list(dataset, "test") == read_list(dataset, "val")
    for split, per_class in (("train", TRAIN), ("val", VAL)):
        entries = read_list(dataset, split)
        assert len(entries) == per_class * CLASSES
        assert np.bincount([label for _, label in entries]).tolist() == [per_class] * CLASSES
        for rel, _ in entries:
            assert not os.path.isabs(rel)
            clip = decode(os.path.join(dataset, rel))
            assert clip.shape == (FRAMES, SIZE, SIZE, 3) and clip.dtype == np.uint8


def test_same_seed_same_frames(dataset, tmp_path):
    again, other = make(tmp_path / "again"), make(tmp_path / "other", 1)
    for rel, _ in read_list(dataset, "train")[:6] + read_list(dataset, "val")[:2]:
        np.testing.assert_array_equal(decode(os.path.join(dataset, rel)), decode(os.path.join(again, rel)))
    assert not np.array_equal(decode(os.path.join(dataset, rel)), decode(os.path.join(other, rel)))


def centroids(clip):
    """[T, 2] (x, y) circular centroids of brightness above the background (the scene wraps around)."""
    lum = clip.astype(np.float64).mean(-1)
    w = np.clip(lum - np.median(lum, axis=(1, 2), keepdims=True), 0, None)
    phase = np.exp(2j * np.pi * (np.arange(SIZE) + 0.5) / SIZE)
    x = np.angle((w.sum(1) * phase).sum(-1)) * SIZE / (2 * np.pi)
    y = np.angle((w.sum(2) * phase).sum(-1)) * SIZE / (2 * np.pi)
    return np.stack([x, y], -1)


def test_motion_carries_the_label(dataset):
    for split in ("train", "val"):
        for rel, label in read_list(dataset, split):
            c = centroids(decode(os.path.join(dataset, rel)))
            step = (np.diff(c, axis=0) + SIZE / 2) % SIZE - SIZE / 2  # per-frame displacement, unwrapped
            if label < 4:
                axis, sign = [(0, -1), (0, 1), (1, -1), (1, 1)][label]
                along = sign * step[:, axis]
                assert (along > 0.3).all(), (rel, label, step)  # every frame moves the labelled way
                assert abs(step[:, 1 - axis]).max() < 0.5, (rel, label, step)  # ... and not sideways
            else:  # orbits: the velocity turns clockwise (on screen, y down) for label 4
                turn = step[:-1, 0] * step[1:, 1] - step[:-1, 1] * step[1:, 0]
                assert ((1 if label == 4 else -1) * turn > 0).mean() >= 0.8, (rel, label, turn)


def test_single_frames_do_not_tell_the_class():
    """Over many clips, first-frame brightness and position statistics are the same in every class."""
    n = 300
    features = np.zeros((CLASSES, n, 3))
    for label in range(CLASSES):
        for i in range(n):
            frame = tool.render_clip(label, 2, SIZE, np.random.default_rng([7, label, i]))[0]
            x, y = centroids(frame[None])[0] * 2 * np.pi / SIZE
            features[label, i] = [frame.mean(), np.cos(x) + np.sin(y), np.sin(x) - np.cos(y)]
    means, spread = features.mean(1), features.std((0, 1))
    # class means agree within a few standard errors of the mean (chance level for a single-frame classifier)
    assert (abs(means - means.mean(0)) < 4 * spread / np.sqrt(n)).all(), (means, spread)


def test_refuses_non_empty_out_and_bad_arguments(tmp_path, capsys):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(SystemExit) as exc:
        tool.main(["--out", str(out)])
    assert exc.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]
    make(out, 0, "--overwrite")
    assert f"wrote {TRAIN * CLASSES} train, {VAL * CLASSES} val (= test) videos" in capsys.readouterr().out
    assert len(read_list(str(out), "train")) == TRAIN * CLASSES and (out / "keep.txt").exists()
    for bad in (["--classes", "7"], ["--size", "31"], ["--frames", "0"]):
        with pytest.raises(SystemExit):
            tool.main(["--out", str(tmp_path / "new"), *bad])
    assert not (tmp_path / "new").exists()
