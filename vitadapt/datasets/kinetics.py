"""Kinetics-format video lists, as PySlowFast / TimeSformer read them (spec video.md 4.2-4.5, slowfast.md 3.3).

List files. {DATA.PATH_TO_DATA_DIR}/{split}.csv (split train, val or test), one video a line:
`<path><DATA.PATH_LABEL_SEPARATOR><label>`, the label an integer in [0, MODEL.NUM_CLASSES). The path is joined
with DATA.PATH_PREFIX; with an empty prefix a relative path is relative to PATH_TO_DATA_DIR. Blank lines are
ignored. A missing or empty list, or a malformed line, is a DataError naming the file and the line number.

Items. Decoding and sampling are vitadapt.datasets.decoder's (PyAV, the official formulas):
- train and val: one item per video; a random temporal start (view -1), then random short-side scale in
  DATA.TRAIN_JITTER_SCALES, random DATA.TRAIN_CROP_SIZE crop, horizontal flip (DATA.RANDOM_FLIP). Val is
  augmented like train on purpose: that is what PySlowFast / TimeSformer's Kinetics val does (slowfast.md 3.3),
  so val numbers match theirs; the deterministic multi-view evaluation is the test split. Random draws use torch's default
  generator: the loader's workers each get their own torch seed (derived from the main process's generator,
  which RNG_SEED seeds), so no Python/NumPy global state is involved.
- test: TEST.NUM_ENSEMBLE_VIEWS x TEST.NUM_SPATIAL_CROPS items per video. Item i is video
  i // (views * crops), temporal view (i // crops) % views and spatial crop i % crops (official order). With
  more than one crop the short side goes to DATA.TEST_CROP_SIZE and crops 0/1/2 (left/centre/right or
  top/centre/bottom) are taken; with one crop the short side goes to TRAIN_JITTER_SCALES[0], then a centre
  crop of TEST_CROP_SIZE. video_index(i) and num_videos let the evaluation ensemble a video's views.
An item is (float clip [C, T, H, W], normalised with DATA.MEAN / DATA.STD, int label).

Failures. A missing, corrupt or undecodable video is logged as a warning naming the file and the reason and
its item is None: the collate function drops it and the loop counts it as skipped. So is a video shorter than a
clip unless DATA.SHORT_VIDEO is "clamp" (PySlowFast's behaviour: its last frame repeats). Nothing is retried
(PySlowFast retries 100 other indices, then crashes, which hides the broken file).
"""

import logging
import os
from typing import List, Tuple

import av
from iopath.common.file_io import g_pathmgr

from vitadapt.config import ConfigError, register_validator

from .build import register_dataset
from .decoder import VideoDecodeError, clip_span, decode_clip, normalize, spatial_sampling
from .imagenet import DataError

logger = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
# How the views of a test video combine (vitadapt.engine.evaluate.ensemble): DATA.ENSEMBLE_METHOD of
# TEST.ENSEMBLE_SCORES.
ENSEMBLE_METHODS = ("sum", "max")
ENSEMBLE_SCORES = ("logits", "softmax")


def validate_video_config(cfg) -> None:
    """The video DATA / TEST keys; a ConfigError naming the key. Runs when a config is validated (registered
    below) and again when the data set is built."""
    d = cfg.DATA
    for key in ("DATA.NUM_FRAMES", "DATA.SAMPLING_RATE", "TEST.NUM_ENSEMBLE_VIEWS"):
        node, leaf = key.split(".")
        value = cfg[node][leaf]
        if value < 1:
            raise ConfigError(f"{key} must be a positive integer, got {value}")
    if not d.TARGET_FPS > 0:
        raise ConfigError(f"DATA.TARGET_FPS must be > 0, got {d.TARGET_FPS}")
    crops = cfg.TEST.NUM_SPATIAL_CROPS
    if crops not in (1, 2, 3):
        raise ConfigError(f"TEST.NUM_SPATIAL_CROPS must be 1, 2 or 3 (left/centre/right crops), got {crops}")
    scales = list(d.TRAIN_JITTER_SCALES)
    if len(scales) != 2 or not 0 < scales[0] <= scales[1]:
        raise ConfigError(f"DATA.TRAIN_JITTER_SCALES must be [min, max] with 0 < min <= max, got {scales}")
    if not d.PATH_LABEL_SEPARATOR:
        raise ConfigError("DATA.PATH_LABEL_SEPARATOR must not be empty (PySlowFast's default is a space ' ')")
    for key, choices in (("DATA.ENSEMBLE_METHOD", ENSEMBLE_METHODS), ("TEST.ENSEMBLE_SCORES", ENSEMBLE_SCORES)):
        node, leaf = key.split(".")
        if cfg[node][leaf] not in choices:
            raise ConfigError(f"{key} must be {' or '.join(choices)}, got '{cfg[node][leaf]}'")
    if d.SHORT_VIDEO not in ("skip", "clamp"):
        raise ConfigError(f"DATA.SHORT_VIDEO must be 'skip' or 'clamp', got '{d.SHORT_VIDEO}'")
    if d.DECODING_BACKEND != "pyav":
        hint = (": torchvision's video reader (torchvision.io._read_video_from_memory) no longer exists in "
                "torchvision 0.29" if d.DECODING_BACKEND == "torchvision" else "")
        raise ConfigError(f"DATA.DECODING_BACKEND must be 'pyav', got '{d.DECODING_BACKEND}'{hint}")


# Checked with every config (e.g. a PySlowFast YAML with DECODING_BACKEND torchvision fails at load time).
register_validator(validate_video_config)


def read_list(path: str, prefix: str, root: str, separator: str, num_classes: int) -> List[Tuple[str, int]]:
    """[(video path, label)] of a list file; DataError naming the file and the line for any problem."""
    if not g_pathmgr.isfile(path):
        raise DataError(f"video list not found: {path} (expected <DATA.PATH_TO_DATA_DIR>/<split>.csv, lines "
                        f"'<path>{separator}<label>')")
    with g_pathmgr.open(path, "r") as f:
        lines = f.read().splitlines()
    samples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split(separator)
        where = f"{path} line {number}"
        if len(fields) != 2:
            raise DataError(f"{where}: expected '<path>{separator}<label>' (DATA.PATH_LABEL_SEPARATOR "
                            f"{separator!r}), got {len(fields)} field(s): {line[:200]!r}")
        video, label = fields
        try:
            label = int(label)
        except ValueError:
            raise DataError(f"{where}: the label must be an integer, got {label!r}") from None
        if not 0 <= label < num_classes:
            raise DataError(f"{where}: label {label} is outside [0, MODEL.NUM_CLASSES={num_classes})")
        if prefix:
            video = os.path.join(prefix, video)
        elif not os.path.isabs(video):
            video = os.path.join(root, video)
        samples.append((video, label))
    if not samples:
        raise DataError(f"video list {path} is empty")
    return samples


@register_dataset("kinetics")
class Kinetics:
    NEEDS_DATA_DIR = True

    def __init__(self, cfg, split: str):
        if split not in SPLITS:
            raise DataError(f"Kinetics split must be one of {SPLITS}, got '{split}'")
        validate_video_config(cfg)
        d = cfg.DATA
        self.split = split
        self.folder = root = d.PATH_TO_DATA_DIR
        self.list_file = os.path.join(root, f"{split}.csv")
        self.videos = read_list(self.list_file, d.PATH_PREFIX, root, d.PATH_LABEL_SEPARATOR, cfg.MODEL.NUM_CLASSES)
        self.num_frames, self.sampling_rate, self.target_fps = d.NUM_FRAMES, d.SAMPLING_RATE, d.TARGET_FPS
        self.mean, self.std = list(d.MEAN), list(d.STD)
        self.short_video, self.random_flip = d.SHORT_VIDEO, d.RANDOM_FLIP
        self.test = split == "test"
        if self.test:
            self.num_views, self.num_crops = cfg.TEST.NUM_ENSEMBLE_VIEWS, cfg.TEST.NUM_SPATIAL_CROPS
            if self.num_crops > 1:
                self.min_scale = self.max_scale = self.crop_size = d.TEST_CROP_SIZE
            else:
                self.min_scale = self.max_scale = d.TRAIN_JITTER_SCALES[0]
                self.crop_size = d.TEST_CROP_SIZE
        else:
            self.num_views = self.num_crops = 1
            self.min_scale, self.max_scale = d.TRAIN_JITTER_SCALES
            self.crop_size = d.TRAIN_CROP_SIZE
        self._warned_short = set()  # per process (each loader worker warns once per file)
        logger.info("%s: %d videos, %d view(s) each", self.list_file, len(self.videos),
                    self.num_views * self.num_crops)

    @property
    def num_videos(self) -> int:
        return len(self.videos)

    def __len__(self) -> int:
        return len(self.videos) * self.num_views * self.num_crops

    def video_index(self, item: int) -> int:
        """The video (line of the list) that item `item` is a view of."""
        return item // (self.num_views * self.num_crops)

    def view(self, item: int) -> Tuple[int, int, int]:
        """(video index, temporal view, spatial index) of an item; views -1, -1 for the random train/val view."""
        if not self.test:
            return item, -1, -1
        return self.video_index(item), (item // self.num_crops) % self.num_views, item % self.num_crops

    def __getitem__(self, item: int):
        if not 0 <= item < len(self):
            raise IndexError(f"item {item} out of range for {len(self)} items")
        video, temporal, spatial = self.view(item)
        path, label = self.videos[video]
        if self.test and self.num_crops == 1:
            spatial = 1  # the centre crop (official)
        try:
            clip = decode_clip(path, self.num_frames, self.sampling_rate, self.target_fps,
                               view_index=temporal, num_views=self.num_views)
        except (VideoDecodeError, av.error.FFmpegError, OSError, ValueError) as e:
            # Skipped, never retried: the collate function drops the None and the loop counts it.
            logger.warning("skipping video %s: %s", path, e)
            return None
        span = clip_span(self.num_frames, self.sampling_rate, clip.fps, self.target_fps)
        if clip.video_frames < span:
            what = (f"video {path} has {clip.video_frames} frames, shorter than a clip ({span:.1f} frames at "
                    f"{clip.fps:.3g} fps)")
            if self.short_video == "skip":
                logger.warning("skipping %s (DATA.SHORT_VIDEO skip)", what)
                return None
            if path not in self._warned_short:  # clamp: the indices repeat the last frame, as PySlowFast's
                self._warned_short.add(path)
                logger.warning("%s; its last frame is repeated (DATA.SHORT_VIDEO clamp)", what)
        frames = normalize(clip.frames, self.mean, self.std)  # [C, T, H, W], normalised before cropping (official)
        frames = spatial_sampling(frames, spatial, self.min_scale, self.max_scale, self.crop_size,
                                  random_flip=self.random_flip)
        return frames.contiguous(), label
