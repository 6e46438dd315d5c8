"""Kinetics video decoding and sampling, as the official TimeSformer (= PySlowFast) code does it.

Temporal sampling (spec video.md 4.3, PySlowFast decoder.py). A clip of NUM_FRAMES frames, SAMPLING_RATE
apart at TARGET_FPS (30), spans clip_span() source frames, so a 15 fps video spans half as many. The clip
starts uniformly at random in [0, L - span] when training (view_index -1), else at (L - span) * i / views
for temporal view i: with one view the test clip starts at frame 0, not in the middle. The frames are
linspace(start, start + span - 1, NUM_FRAMES), clamped to the video and truncated to integers.

Decoding (PyAV, decoder.py L61-100, L213-300). When the container gives the frame count and duration, the
start and end frames become pts (duration / frame count per frame), the decoder seeks to 1024 pts before
the start and decodes only that window, plus the first frame after it as the official loop does; the
frames are then picked from the window, indices counted from its first frame. When the stream does not
say (e.g. Matroska), the whole video is decoded and sampled. A video shorter than the clip is not an
error: the indices clamp to its last frame, and VideoClip.video_frames tells a dataset how long it was.
Errors (missing or unreadable file, no video stream, no frame) raise VideoDecodeError naming the file;
the official code prints them and returns None.

Spatial processing (spec 4.4, PySlowFast transform.py / utils.spatial_sampling) works on float
[C, T, H, W] clips, after normalize(), as the official order is. Random draws use an optional
torch.Generator instead of Python's and NumPy's global generators, so a seed fixes them.
"""

import math
import os
from typing import NamedTuple, Optional, Sequence, Tuple

import av
import torch
import torch.nn.functional as F

from .imagenet import DataError

SEEK_MARGIN_PTS = 1024  # the official seeks this far (stream time base) before the clip start


class VideoDecodeError(DataError):
    """A video file is missing, unreadable, has no video stream or yields no frame."""


class VideoClip(NamedTuple):
    frames: torch.Tensor  # uint8 [T, H, W, 3], RGB
    indices: torch.Tensor  # long [T], the source frame of each clip frame
    video_frames: int  # frames in the video (container's count, else the decoded count)
    fps: float


def clip_span(num_frames: int, sampling_rate: int, video_fps: float, target_fps: float = 30) -> float:
    """Source frames a clip covers: the sampling rate is in TARGET_FPS frames, not in the video's."""
    return sampling_rate * num_frames / target_fps * video_fps


def _uniform(low: float, high: float, generator: Optional[torch.Generator]) -> float:
    return low + (high - low) * torch.rand((), generator=generator, dtype=torch.float64).item()


def start_end(video_frames: int, clip_size: float, view_index: int, num_views: int,
              generator: Optional[torch.Generator] = None) -> Tuple[float, float]:
    """First and last source frame (floats) of a clip: random for view -1 (train/val), else view i of n."""
    if view_index < -1:
        raise ValueError(f"view_index must be -1 (random) or a view number, got {view_index}")
    delta = max(video_frames - clip_size, 0)
    start = _uniform(0, delta, generator) if view_index == -1 else delta * view_index / num_views
    return start, start + clip_size - 1


def frame_indices(start: float, end: float, num_frames: int, video_frames: int) -> torch.Tensor:
    """num_frames evenly spaced frames from start to end, clamped to the video, then truncated (official order)."""
    index = torch.linspace(start, end, num_frames)
    return torch.clamp(index, 0, video_frames - 1).long()


def _open(path: str):
    if not os.path.exists(path):
        raise VideoDecodeError(f"{path}: no such video file")
    try:
        container = av.open(path)
    except (av.error.FFmpegError, OSError) as e:
        raise VideoDecodeError(f"{path}: PyAV cannot open it as a video ({e})") from None
    if not container.streams.video:
        container.close()
        raise VideoDecodeError(f"{path}: has no video stream")
    return container


def _decode_window(container, stream, start_pts: float, end_pts: float) -> list:
    """Frames with start_pts <= pts <= end_pts, plus the first one after, as PySlowFast's pyav_decode_stream."""
    container.seek(max(int(start_pts) - SEEK_MARGIN_PTS, 0), any_frame=False, backward=True, stream=stream)
    frames = {}
    for frame in container.decode(stream):
        if frame.pts is None or frame.pts < start_pts:
            continue
        frames[frame.pts] = frame
        if frame.pts > end_pts:
            break
    return [frames[pts] for pts in sorted(frames)]


def decode_clip(path: str, num_frames: int, sampling_rate: int, target_fps: float = 30,
                view_index: int = -1, num_views: int = 1,
                generator: Optional[torch.Generator] = None) -> VideoClip:
    """Decode the num_frames-frame clip for temporal view view_index of num_views (-1: random, for training)."""
    container = _open(path)
    try:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if fps <= 0:
            raise VideoDecodeError(f"{path}: the video stream has no frame rate")
        span = clip_span(num_frames, sampling_rate, fps, target_fps)
        length, duration = stream.frames, stream.duration
        try:
            if duration and length:
                # Seek and decode only the clip window; the clip then starts at the window's first frame.
                pts_per_frame = duration / length
                start, end = start_end(length, span, view_index, num_views, generator)
                window = _decode_window(container, stream, int(start * pts_per_frame), int(end * pts_per_frame))
                first_pts = stream.start_time or 0
                source = [round((f.pts - first_pts) / pts_per_frame) for f in window]
                start, end = 0, span - 1
            else:
                # The container does not say how long the video is: decode all of it.
                window = list(container.decode(stream))
                length = len(window)
                source = list(range(length))
                start, end = start_end(length, span, view_index, num_views, generator)
        except av.error.FFmpegError as e:
            raise VideoDecodeError(f"{path}: decoding failed ({e})") from None
        if not window:
            raise VideoDecodeError(f"{path}: no frame decoded (video of {length} frames, clip from frame "
                                   f"{start:.1f})")
        picked = frame_indices(start, end, num_frames, len(window)).tolist()
        frames = torch.stack([torch.from_numpy(window[i].to_ndarray(format="rgb24")) for i in picked])
        return VideoClip(frames, torch.tensor([source[i] for i in picked], dtype=torch.long), length, fps)
    finally:
        container.close()


# ---- spatial processing, on float [C, T, H, W] (any [N, M, H, W]) clips ----

def short_side_scale(frames: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize so the short side is `size`, the long side floor(long / short * size)."""
    height, width = frames.shape[-2:]
    if min(height, width) == size:
        return frames
    if width < height:
        new_h, new_w = int(math.floor(height / width * size)), size
    else:
        new_h, new_w = size, int(math.floor(width / height * size))
    return F.interpolate(frames, size=(new_h, new_w), mode="bilinear", align_corners=False)


def random_short_side_scale(frames: torch.Tensor, min_size: int, max_size: int,
                            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Short side to round(U[min_size, max_size]) (train jitter, 256..320 for TimeSformer)."""
    return short_side_scale(frames, int(round(_uniform(min_size, max_size, generator))))


def random_crop(frames: torch.Tensor, size: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """A size x size crop; like the official np.random.randint, the offset excludes its last value (H - size)."""
    height, width = frames.shape[-2:]
    y = int(torch.randint(0, height - size, (), generator=generator)) if height > size else 0
    x = int(torch.randint(0, width - size, (), generator=generator)) if width > size else 0
    return frames[..., y:y + size, x:x + size]


def horizontal_flip(frames: torch.Tensor, p: float = 0.5,
                    generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Mirror the clip (all frames alike) with probability p."""
    return frames.flip(-1) if torch.rand((), generator=generator).item() < p else frames


def uniform_crop(frames: torch.Tensor, size: int, spatial_index: int) -> torch.Tensor:
    """Crop 0/1/2 along the long side: offsets 0, ceil((L - size) / 2), L - size; centred on the short side."""
    if spatial_index not in (0, 1, 2):
        raise ValueError(f"spatial_index must be 0, 1 or 2, got {spatial_index}")
    height, width = frames.shape[-2:]
    y = int(math.ceil((height - size) / 2))
    x = int(math.ceil((width - size) / 2))
    if height > width:
        y = {0: 0, 1: y, 2: height - size}[spatial_index]
    else:
        x = {0: 0, 1: x, 2: width - size}[spatial_index]
    return frames[..., y:y + size, x:x + size]


def normalize(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 [T, H, W, C] -> float [C, T, H, W]: /255, then (x - mean) / std per channel."""
    x = frames.float() / 255.0 if frames.dtype == torch.uint8 else frames.float()
    x = (x - torch.tensor(mean, dtype=x.dtype)) / torch.tensor(std, dtype=x.dtype)
    return x.permute(3, 0, 1, 2)


def spatial_sampling(frames: torch.Tensor, spatial_index: int = -1, min_scale: int = 256, max_scale: int = 320,
                     crop_size: int = 224, random_flip: bool = True,
                     generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Train (index -1): jitter scale, random crop, flip 0.5. Test: short side to min_scale, crop 0/1/2."""
    if spatial_index == -1:
        frames = random_short_side_scale(frames, min_scale, max_scale, generator)
        frames = random_crop(frames, crop_size, generator)
        return horizontal_flip(frames, 0.5, generator) if random_flip else frames
    if min_scale != max_scale:
        raise ValueError(f"test-time scaling needs min_scale == max_scale, got {min_scale} and {max_scale}")
    return uniform_crop(short_side_scale(frames, min_scale), crop_size, spatial_index)
