"""vitadapt.datasets.decoder against the official TimeSformer / PySlowFast formulas (spec video.md 4.3, 4.4).

The videos are rendered here with PyAV: 64x48, frame i shows the bits of i as eight 8-px wide black/white
columns, so a decoded frame is identified from its pixels despite a lossy codec.
"""

import math

import av
import numpy as np
import pytest
import torch

from vitadapt.datasets.decoder import (VideoDecodeError, clip_span, decode_clip, frame_indices, horizontal_flip,
                                       normalize, random_crop, random_short_side_scale, short_side_scale,
                                       spatial_sampling, start_end, uniform_crop)
from vitadapt.errors import VitadaptError

W, H = 64, 48


def _has_encoder(name):
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def _write(path, num_frames, fps, codec=None, pix_fmt="yuv420p"):
    codec = codec or ("libx264" if _has_encoder("libx264") else "mpeg4")
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = W, H, pix_fmt
    stream.options = {"g": "12"}  # keyframes every 12 frames, so a mid-video clip needs a real seek
    for i in range(num_frames):
        img = np.zeros((H, W, 3), np.uint8)
        for bit in range(8):
            if (i >> bit) & 1:
                img[:, bit * 8:(bit + 1) * 8] = 255
        for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return str(path)


def _ids(frames):
    """The frame number each decoded frame shows."""
    bits = (frames[:, H // 2, 4::8, 0].int() > 127).int()
    return (bits * 2 ** torch.arange(8)).sum(1).tolist()


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    return {"30fps_120": _write(d / "a.mp4", 120, 30), "30fps_130": _write(d / "b.mp4", 130, 30),
            "15fps_80": _write(d / "c.mp4", 80, 15), "short_20": _write(d / "d.mp4", 20, 30)}


# ---- temporal sampling formulas ----

def test_spec_example_one_and_two_views():
    span = clip_span(8, 4, 30)
    assert span == 32
    start, end = start_end(120, span, 0, 1)
    assert (start, end) == (0, 31)
    assert frame_indices(start, end, 8, 120).tolist() == [0, 4, 8, 13, 17, 22, 26, 31]
    start, end = start_end(120, span, 1, 2)
    assert (start, end) == (44, 75)  # (120 - 32) * 1 / 2
    assert frame_indices(start, end, 8, 120).tolist() == [44 + i for i in [0, 4, 8, 13, 17, 22, 26, 31]]


def test_clip_span_scales_with_fps():
    assert clip_span(8, 32, 30) == 256 and clip_span(16, 16, 30) == 256  # 8x32 and HR 16x16
    assert clip_span(8, 4, 15) == 16
    assert clip_span(8, 4, 60) == 64


def test_indices_clamp_then_truncate():
    # linspace(0, 31, 8) on a 20-frame video: clamped to 19, then truncated.
    assert frame_indices(0, 31, 8, 20).tolist() == [0, 4, 8, 13, 17, 19, 19, 19]
    # A fractional start truncates each point, as .long() does.
    assert frame_indices(0.9, 7.9, 4, 100).tolist() == [0, 3, 5, 7]


def test_train_start_is_seeded_and_in_range():
    span, length = 32, 120
    starts = [start_end(length, span, -1, 1, torch.Generator().manual_seed(s))[0] for s in range(50)]
    assert all(0 <= s <= length - span for s in starts)
    assert len(set(starts)) > 40
    again = start_end(length, span, -1, 1, torch.Generator().manual_seed(7))
    assert again == start_end(length, span, -1, 1, torch.Generator().manual_seed(7))
    assert again[1] == again[0] + span - 1
    assert start_end(20, span, -1, 1, torch.Generator().manual_seed(3)) == (0, 31)  # short: delta 0


# ---- decoding ----

def test_decode_spec_example(videos):
    clip = decode_clip(videos["30fps_120"], 8, 4, 30, 0, 1)
    assert clip.frames.shape == (8, H, W, 3) and clip.frames.dtype == torch.uint8
    assert clip.indices.tolist() == _ids(clip.frames) == [0, 4, 8, 13, 17, 22, 26, 31]
    assert clip.video_frames == 120 and clip.fps == 30
    clip = decode_clip(videos["30fps_120"], 8, 4, 30, 1, 2)
    assert clip.indices.tolist() == _ids(clip.frames) == [44, 48, 52, 57, 61, 66, 70, 75]


def test_decode_mid_video_views_seek_to_the_window(videos):
    """Fractional starts: the official decodes from the first frame at or after the start pts, then samples
    linspace(0, span - 1) from there, so the clip starts at ceil(start)."""
    offsets = frame_indices(0, 31, 8, 1000)
    for view in range(3):
        start, _ = start_end(130, 32, view, 3)  # 0, 32.67, 65.33
        clip = decode_clip(videos["30fps_130"], 8, 4, 30, view, 3)
        assert _ids(clip.frames) == clip.indices.tolist() == (math.ceil(start) + offsets).tolist()


def test_decode_15fps_halves_the_span(videos):
    clip = decode_clip(videos["15fps_80"], 8, 4, 30, 1, 2)  # span 16, delta 64, start 32
    assert clip.fps == 15
    assert _ids(clip.frames) == clip.indices.tolist() == [32, 34, 36, 38, 40, 42, 44, 47]


def test_decode_train_view_is_seeded(videos):
    a = decode_clip(videos["30fps_130"], 8, 4, 30, -1, 1, torch.Generator().manual_seed(5))
    b = decode_clip(videos["30fps_130"], 8, 4, 30, -1, 1, torch.Generator().manual_seed(5))
    assert a.indices.tolist() == b.indices.tolist() == _ids(a.frames)
    assert torch.equal(a.frames, b.frames)
    assert 0 <= a.indices[0] <= 130 - 32 + 1 and a.indices[-1] - a.indices[0] == 31


def test_short_video_clamps_and_reports_length(videos):
    clip = decode_clip(videos["short_20"], 8, 4, 30, 0, 1)
    assert clip.video_frames == 20
    assert _ids(clip.frames) == clip.indices.tolist() == [0, 4, 8, 13, 17, 19, 19, 19]


@pytest.mark.skipif(not _has_encoder("ffv1"), reason="no ffv1 encoder in this PyAV build")
def test_decode_without_frame_count_decodes_everything(tmp_path):
    path = _write(tmp_path / "v.mkv", 120, 30, "ffv1", "bgr0")  # Matroska gives no frame count
    clip = decode_clip(path, 8, 4, 30, 1, 2)
    assert clip.video_frames == 120
    assert _ids(clip.frames) == clip.indices.tolist() == [44, 48, 52, 57, 61, 66, 70, 75]


def test_errors_name_the_file(tmp_path):
    missing = tmp_path / "nope.mp4"
    with pytest.raises(VideoDecodeError, match="nope.mp4.*no such"):
        decode_clip(str(missing), 8, 4)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(VideoDecodeError, match="garbage.mp4.*cannot open"):
        decode_clip(str(garbage), 8, 4)
    audio = tmp_path / "sound.wav"
    with av.open(str(audio), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoDecodeError, match="sound.wav.*no video stream"):
        decode_clip(str(audio), 8, 4)
    assert issubclass(VideoDecodeError, VitadaptError)


# ---- spatial processing ----

def _coords(height, width):
    """[C=2, T=1, H, W]: channel 0 holds y, channel 1 holds x."""
    y, x = torch.meshgrid(torch.arange(height).float(), torch.arange(width).float(), indexing="ij")
    return torch.stack([y, x])[:, None]


def test_uniform_crop_offsets():
    wide = _coords(6, 11)  # offsets along x: 0, ceil(5 / 2) = 3, 5; y centred (0)
    for index, x0 in enumerate([0, 3, 5]):
        crop = uniform_crop(wide, 6, index)
        assert crop.shape[-2:] == (6, 6) and crop[1, 0, 0, 0] == x0 and crop[0, 0, 0, 0] == 0
    tall = _coords(11, 6)
    for index, y0 in enumerate([0, 3, 5]):
        crop = uniform_crop(tall, 6, index)
        assert crop.shape[-2:] == (6, 6) and crop[0, 0, 0, 0] == y0 and crop[1, 0, 0, 0] == 0
    # 224 crops of a 298x224 frame (short side 224 of 4:3): 0, 37, 74, covering the whole width.
    assert [uniform_crop(_coords(224, 298), 224, i)[1, 0, 0, 0].item() for i in range(3)] == [0, 37, 74]
    with pytest.raises(ValueError):
        uniform_crop(wide, 6, 3)


def test_short_side_scale_sizes():
    assert short_side_scale(torch.zeros(3, 2, 48, 64), 224).shape == (3, 2, 224, 298)
    assert short_side_scale(torch.zeros(3, 2, 64, 48), 224).shape == (3, 2, 298, 224)
    same = torch.zeros(3, 2, 224, 300)
    assert short_side_scale(same, 224) is same
    const = torch.full((3, 1, 48, 64), 0.3)
    assert torch.allclose(short_side_scale(const, 96), torch.full((3, 1, 96, 128), 0.3))
    sizes = {min(random_short_side_scale(torch.zeros(1, 1, 48, 64), 256, 320,
                                         torch.Generator().manual_seed(s)).shape[-2:]) for s in range(30)}
    assert min(sizes) >= 256 and max(sizes) <= 320 and len(sizes) > 10


def test_random_crop_and_flip():
    frames = _coords(10, 20)
    origins = set()
    for s in range(200):
        crop = random_crop(frames, 8, torch.Generator().manual_seed(s))
        assert crop.shape[-2:] == (8, 8)
        origins.add((int(crop[0, 0, 0, 0]), int(crop[1, 0, 0, 0])))
    # np.random.randint(0, n) as in the official code: offsets 0..n-1.
    assert {y for y, _ in origins} == {0, 1} and {x for _, x in origins} == set(range(12))
    assert torch.equal(random_crop(frames, 8, torch.Generator().manual_seed(1)),
                       random_crop(frames, 8, torch.Generator().manual_seed(1)))
    assert torch.equal(horizontal_flip(frames, 1.0), frames.flip(-1))
    assert horizontal_flip(frames, 0.0) is frames


def test_normalize_and_spatial_sampling():
    frames = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    frames[..., 0], frames[..., 1], frames[..., 2] = 255, 0, 51
    out = normalize(frames, [0.45, 0.45, 0.45], [0.225, 0.225, 0.225])
    assert out.shape == (3, 2, 4, 5) and out.dtype == torch.float32
    expect = [(1 - 0.45) / 0.225, -0.45 / 0.225, (0.2 - 0.45) / 0.225]
    for c in range(3):
        assert torch.allclose(out[c], torch.full((2, 4, 5), expect[c]))
    clip = normalize(torch.zeros(2, 48, 64, 3, dtype=torch.uint8), [0.5] * 3, [0.5] * 3)
    assert spatial_sampling(clip, 1, 32, 32, 32).shape == (3, 2, 32, 32)
    assert spatial_sampling(clip, -1, 40, 48, 32, generator=torch.Generator().manual_seed(0)).shape == (3, 2, 32, 32)
