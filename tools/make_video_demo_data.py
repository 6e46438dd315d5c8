#!/usr/bin/env python3
"""A small synthetic video data set in Kinetics format, so the video path runs with no download.

    python tools/make_video_demo_data.py --out DIR [--classes 4] [--per-class-train 100] [--per-class-val 25]
        [--frames 16] [--size 32] [--fps 8] [--seed 0] [--overwrite]

Every clip shows one bright shape (disk, square, diamond, ring or cross, random size and colour) on a dark
background of random grey. The class is carried only by the motion: moving_left, moving_right, moving_up,
moving_down, then (--classes 5 or 6) orbit_clockwise, orbit_anticlockwise. The scene wraps around its borders (a
torus), and start position and speed are random, so in every class the shape sits anywhere in any one frame with the
same probability: no single frame tells the class. Videos are encoded with PyAV (MPEG-4 Part 2 yuv420p, else
libx264, whose output was seen to vary from run to run under machine load) at --fps into
DIR/videos/{train,val}/NNNNN.mp4. Lists, as PySlowFast / TimeSformer's Kinetics loader reads them (path relative to
DIR, to be joined with DATA.PATH_PREFIX DIR, a space, an integer label): DIR/train.csv, DIR/val.csv and
DIR/test.csv; test.csv lists the val videos, as Kinetics is usually tested on val. DIR/classes.json maps the class
names to their labels. Same --seed, same decoded frames."""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import av  # noqa: E402
import numpy as np  # noqa: E402

CLASS_NAMES = ("moving_left", "moving_right", "moving_up", "moving_down", "orbit_clockwise", "orbit_anticlockwise")
SHAPES = ("disk", "square", "diamond", "ring", "cross")
CODECS = ("mpeg4", "libx264")  # the first this PyAV build can encode is used; same seed, same bytes
SPLITS = ("train", "val")


def pick_codec() -> str:
    for name in CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises different errors for unknown / decode-only codecs
            continue
    raise RuntimeError(f"this PyAV build can encode none of {CODECS}")


def render_clip(label: int, frames: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[frames, size, size, 3] uint8: one shape moving as class `label` says, on a torus."""
    shape = SHAPES[rng.integers(len(SHAPES))]
    radius = rng.uniform(0.12, 0.22) * size
    colour = rng.uniform(0.3, 1.0, 3)
    colour[rng.integers(3)] = 1.0  # at least one full channel: always bright
    colour = colour * rng.uniform(180, 255)
    background = rng.uniform(0, 50)
    speed = rng.uniform(0.75, 2.0) * size / 32  # pixels per frame
    t = np.arange(frames, dtype=np.float64)
    x0, y0 = rng.uniform(0, size, 2)
    if label < 4:  # straight lines; image y grows downwards
        dx, dy = [(-1, 0), (1, 0), (0, -1), (0, 1)][label]
        xs, ys = x0 + dx * speed * t, y0 + dy * speed * t
    else:  # orbits around (x0, y0); clockwise on screen = increasing angle with y down
        orbit = rng.uniform(0.12, 0.25) * size
        phase = rng.uniform(0, 2 * np.pi)
        angle = phase + (1 if label == 4 else -1) * speed / orbit * t
        xs, ys = x0 + orbit * np.cos(angle), y0 + orbit * np.sin(angle)
    grid = np.arange(size, dtype=np.float64) + 0.5
    out = np.empty((frames, size, size, 3), np.uint8)
    for i in range(frames):
        ddx = (grid[None, :] - xs[i] + size / 2) % size - size / 2  # wrapped offsets from the centre
        ddy = (grid[:, None] - ys[i] + size / 2) % size - size / 2
        r = np.hypot(ddx, ddy)
        if shape == "disk":
            dist = r - radius
        elif shape == "square":
            dist = np.maximum(abs(ddx), abs(ddy)) - radius * 0.85
        elif shape == "diamond":
            dist = abs(ddx) + abs(ddy) - radius * 1.2
        elif shape == "ring":
            dist = abs(r - radius * 0.8) - radius * 0.3
        else:  # cross
            dist = np.minimum(np.maximum(abs(ddx) - radius, abs(ddy) - radius * 0.35),
                              np.maximum(abs(ddy) - radius, abs(ddx) - radius * 0.35))
        alpha = np.clip(0.5 - dist, 0, 1)[..., None]  # one pixel of anti-aliasing
        out[i] = np.round(background * (1 - alpha) + colour * alpha).astype(np.uint8)
    return out


def rgb_to_yuv420p(img: np.ndarray) -> np.ndarray:
    """[H, W, 3] uint8 RGB -> the [H * 3 / 2, W] planar YUV 4:2:0 array PyAV takes (BT.601, limited range, chroma
    averaged over 2 x 2 pixels). Converted here, not by FFmpeg's swscale, whose threaded slices can round
    differently from run to run under load: the same seed must give the same bytes."""
    rgb = img.astype(np.float64)
    y = 16 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255
    u = 128 + (-37.797 * rgb[..., 0] - 74.203 * rgb[..., 1] + 112.0 * rgb[..., 2]) / 255
    v = 128 + (112.0 * rgb[..., 0] - 93.786 * rgb[..., 1] - 18.214 * rgb[..., 2]) / 255
    h, w = y.shape
    u = u.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    v = v.reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
    planes = [np.clip(np.rint(p), 0, 255).astype(np.uint8).ravel() for p in (y, u, v)]
    return np.concatenate(planes).reshape(h * 3 // 2, w)


def write_video(path: str, clip: np.ndarray, fps: int, codec: str) -> None:
    with av.open(path, "w", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = clip.shape[2], clip.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1  # one encoder thread: a deterministic bitstream
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "medium"}
        else:
            stream.bit_rate = 2_000_000
        stream.codec_context.flags |= av.codec.context.Flags.bitexact  # no encoder version string
        for img in clip:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb_to_yuv420p(img), format="yuv420p")))
        container.mux(stream.encode())  # flush


def make_dataset(out: str, classes: int = 4, per_class_train: int = 100, per_class_val: int = 25, frames: int = 16,
                 size: int = 32, fps: int = 8, seed: int = 0) -> dict:
    """Write the data set into `out` (which must exist and be empty); return {split: videos written, ...}."""
    codec = pick_codec()
    summary = {"codec": codec}
    for split_id, (split, per_class) in enumerate(zip(SPLITS, (per_class_train, per_class_val))):
        os.makedirs(os.path.join(out, "videos", split), exist_ok=True)
        lines = []
        for idx in range(per_class * classes):
            label = idx % classes  # interleaved: any prefix of the list is balanced
            rng = np.random.default_rng([seed, split_id, idx])
            rel = f"videos/{split}/{idx:05d}.mp4"
            write_video(os.path.join(out, rel), render_clip(label, frames, size, rng), fps, codec)
            lines.append(f"{rel} {label}\n")
        for name in ((split,) if split == "train" else ("val", "test")):
            with open(os.path.join(out, f"{name}.csv"), "w") as f:
                f.writelines(lines)
        summary[split] = len(lines)
    with open(os.path.join(out, "classes.json"), "w") as f:
        json.dump({name: i for i, name in enumerate(CLASS_NAMES[:classes])}, f, indent=1)
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder to write (DATA.PATH_PREFIX and DATA.PATH_TO_DATA_DIR)")
    parser.add_argument("--classes", type=int, default=4, help=f"2..{len(CLASS_NAMES)}: {', '.join(CLASS_NAMES)}")
    parser.add_argument("--per-class-train", type=int, default=100, help="train videos per class")
    parser.add_argument("--per-class-val", type=int, default=25, help="val videos per class (test.csv = val.csv)")
    parser.add_argument("--frames", type=int, default=16, help="frames per video")
    parser.add_argument("--size", type=int, default=32, help="width = height in pixels, even (yuv420p)")
    parser.add_argument("--fps", type=int, default=8, help="frame rate written into the videos")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same decoded frames")
    parser.add_argument("--overwrite", action="store_true", help="allow writing into a non-empty --out")
    args = parser.parse_args(argv)
    if not 2 <= args.classes <= len(CLASS_NAMES):
        parser.error(f"--classes must be 2..{len(CLASS_NAMES)} ({', '.join(CLASS_NAMES)}), got {args.classes}")
    if args.size < 8 or args.size % 2:
        parser.error(f"--size must be even and at least 8 (yuv420p halves the colour planes), got {args.size}")
    for key in ("per_class_train", "per_class_val", "frames", "fps"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be at least 1, got {getattr(args, key)}")
    if os.path.isfile(args.out):
        parser.error(f"--out {args.out} is a file, not a folder")
    if os.path.isdir(args.out) and os.listdir(args.out) and not args.overwrite:
        parser.error(f"--out {args.out} exists and is not empty; pass --overwrite to write into it anyway")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    summary = make_dataset(args.out, args.classes, args.per_class_train, args.per_class_val, args.frames,
                           args.size, args.fps, args.seed)
    print(f"wrote {summary['train']} train, {summary['val']} val (= test) videos of {args.classes} classes, "
          f"{args.frames} frames {args.size}x{args.size} @ {args.fps} fps ({summary['codec']}) to {args.out} "
          f"in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
