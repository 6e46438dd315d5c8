"""ImageNet-layout folders: <PATH_TO_DATA_DIR>/<split>/<class>/<image>, any class folder names.

Classes. A class index is the position of its folder among the sorted class folders of train/ (of val/
when there is no train/), so train and val agree even if val lacks a class. A class_index.json in
PATH_TO_DATA_DIR ({"<folder>": index, ...}, distinct integers in [0, MODEL.NUM_CLASSES)) fixes the
indices instead, e.g. to match a checkpoint's classifier. Without that file an empty class folder (no
image file) is an error at start-up, as in torchvision's ImageFolder: it would still take an index and
silently shift every later class, so a model trained on, or converted from, the full folder set would
score against the wrong labels. Remove the folder, or list it in class_index.json, whose indices do not
depend on which folders hold images. Names starting with "." (.ipynb_checkpoints, .DS_Store, macOS "._x.jpg"
resource forks) are not data: they are ignored, as folders and as files.

Images. A file with an image extension (any case) is decoded by PIL to 8-bit RGB with convert("RGB"), as
torchvision's and timm's folder loaders do: alpha is dropped (not composited on any background), palette,
CMYK, YCbCr, LAB and HSV use PIL's conversions, float images ("F") PIL's 0..255 scale, and the EXIF
orientation is not applied. The exception is 16-bit grey ("I;16*", and "I", which PIL's PGM/PPM reader scales
to 0..65535): PIL would clip it at 255 (almost all white), so it is scaled from 0..65535 instead. A file that
cannot be decoded (corrupt; truncated: half a picture is worse than none, so PIL's ImageFile.LOAD_TRUNCATED_IMAGES
is left off; over PIL's decompression-bomb limit Image.MAX_IMAGE_PIXELS, which is kept; a directory or a broken
link with an image name; an unsupported mode) is skipped with a warning naming it: the item is None, the collate
function drops it and the trainer and evaluation count it (skipped_images).
"""

import json
import logging
import os
import warnings
from typing import Dict, List, Optional, Tuple

import numpy as np
from iopath.common.file_io import g_pathmgr
from PIL import Image

from vitadapt.errors import VitadaptError

from .build import register_dataset
from .transforms import build_transform

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Modes whose convert("RGB") is right as PIL does it (each checked in tests/test_reliability_data.py).
_CONVERTIBLE_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "F"}
# What PIL raises for a file it cannot decode (a fuzzed PNG/JPEG/TIFF/BMP/WebP/PPM raised only these).
_UNDECODABLE = (OSError, ValueError, SyntaxError, EOFError)


class DataError(VitadaptError, RuntimeError):
    """A data set folder or file is missing or malformed."""


def _some(items, limit: int = 10) -> str:
    """The first `limit` items, comma-separated, with the count when there are more."""
    items = list(items)
    more = f", ... ({len(items)} in all)" if len(items) > limit else ""
    return ", ".join(str(i) for i in items[:limit]) + more


def _visible(names) -> List[str]:
    return sorted(n for n in names if not n.startswith("."))


def scan_split(folder: str) -> Dict[str, List[str]]:
    """{class folder name: its image file names}, both sorted, of a split folder."""
    out = {}
    for name in _visible(g_pathmgr.ls(folder)):
        path = os.path.join(folder, name)
        if g_pathmgr.isdir(path):
            out[name] = [f for f in _visible(g_pathmgr.ls(path)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _loose_images_hint(folder: str) -> str:
    loose = [f for f in _visible(g_pathmgr.ls(folder)) if f.lower().endswith(IMAGE_EXTENSIONS)]
    return f"; it holds {len(loose)} image file(s) directly: put them in one sub-folder per class" if loose else ""


def read_class_index(path: str, num_classes: int) -> Dict[str, int]:
    """class_index.json, checked: every problem is a DataError naming the file and the entries."""
    expected = 'expected {"<class folder>": <index>, ...}'
    try:
        with g_pathmgr.open(path) as f:
            data = json.load(f)
    except ValueError as e:  # bad JSON or bad UTF-8
        raise DataError(f"{path} is not valid JSON ({e}); {expected}") from None
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path} must be a non-empty JSON object, {expected}; got {json.dumps(data)[:80]}")
    bad = [f"{k!r}: {json.dumps(v)}" for k, v in data.items() if type(v) is not int or v < 0]  # not bool, not 3.0
    if bad:
        raise DataError(f"{path}: class indices must be integers >= 0; bad entries: {_some(bad)}")
    over = [f"{k!r}: {v}" for k, v in data.items() if v >= num_classes]
    if over:
        raise DataError(f"{path}: class indices must be < MODEL.NUM_CLASSES ({num_classes}); out of range: "
                        f"{_some(over)}")
    by_index: Dict[int, List[str]] = {}
    for k, v in data.items():
        by_index.setdefault(v, []).append(repr(k))
    shared = [f"{i}: {' and '.join(names)}" for i, names in sorted(by_index.items()) if len(names) > 1]
    if shared:
        raise DataError(f"{path}: each class needs its own index, these would be merged: {_some(shared)}")
    return data


def read_classes(root: str, num_classes: int,
                 listings: Optional[Dict[str, Dict[str, List[str]]]] = None) -> Tuple[Dict[str, int], str]:
    """({class folder name: index}, the file or folder that defined them). `listings` holds splits already
    scanned ({split folder: scan_split(folder)}), so that no split is listed twice."""
    index_file = os.path.join(root, "class_index.json")
    if g_pathmgr.isfile(index_file):
        return read_class_index(index_file, num_classes), index_file
    listings = listings or {}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if not g_pathmgr.isdir(folder):
            continue
        listing = listings[folder] if folder in listings else scan_split(folder)
        if not listing:
            continue
        empty = [name for name, files in listing.items() if not files]
        if empty:
            raise DataError(
                f"empty class folder(s) in {folder}: {_some(empty)} (no {'/'.join(IMAGE_EXTENSIONS)} file). An empty "
                f"folder would still take a class index and shift every later class: remove it, or fix the indices "
                f"with {index_file}")
        if len(listing) > num_classes:
            raise DataError(f"{folder} has {len(listing)} class folders but MODEL.NUM_CLASSES is {num_classes}; "
                            f"set MODEL.NUM_CLASSES to at least {len(listing)}")
        return {name: i for i, name in enumerate(listing)}, folder
    hints = "".join(_loose_images_hint(os.path.join(root, s)) for s in ("train", "val")
                    if g_pathmgr.isdir(os.path.join(root, s)))
    raise DataError(f"no class folders found under {root}/train or {root}/val (expected <split>/<class>/<image>, "
                    f"DATA.PATH_TO_DATA_DIR={root}){hints}")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB, as torchvision's loader gives it, except 16-bit grey (see the module docstring)."""
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float64) / 257.0  # 0..65535 -> 0..255
        image = Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8))
    elif mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the same colours, without PIL's warning per image about its transparency
    elif mode not in _CONVERTIBLE_MODES:
        raise ValueError(f"image mode {mode!r} is not supported")
    return image.convert("RGB")


def decode_rgb(path: str) -> Image.Image:
    """The file as 8-bit RGB; raises what PIL raises for an undecodable file."""
    with g_pathmgr.open(path, "rb") as f, warnings.catch_warnings():
        # PIL refuses images over 2 * MAX_IMAGE_PIXELS but only warns above MAX_IMAGE_PIXELS, then decodes
        # (gigabytes for a crafted file); one limit, PIL's, is simpler to state: both are skipped.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        image = Image.open(f)
        image.load()  # decodes now, while the file is open
    return to_rgb(image)


@register_dataset("imagenet")
class ImageFolderDataset:
    NEEDS_DATA_DIR = True

    def __init__(self, cfg, split: str):
        root = cfg.DATA.PATH_TO_DATA_DIR
        self.split = split
        # The split folder, for messages (e.g. an epoch in which every image failed to decode).
        self.folder = folder = os.path.join(root, split)
        if not g_pathmgr.isdir(folder):
            raise DataError(f"split folder not found: {folder} (DATA.PATH_TO_DATA_DIR={root}, split '{split}')")
        listing = scan_split(folder)
        self.classes, source = read_classes(root, cfg.MODEL.NUM_CLASSES, {folder: listing})
        unknown = [name for name in listing if name not in self.classes]
        if unknown:
            fix = f"add it to {source}" if source.endswith(".json") else f"add a folder {source}/<class> for it"
            raise DataError(f"class folder(s) in {folder} not among the {len(self.classes)} classes of {source}: "
                            f"{_some(unknown)}; {fix} or remove it")
        self.samples = [(os.path.join(folder, name, f), self.classes[name]) for name, files in listing.items()
                        for f in files]
        if not self.samples:
            raise DataError(f"no images found in the class folders of {folder}{_loose_images_hint(folder)}")
        logger.info("%s: %d images in %d class folders", folder, len(self.samples), len(listing))
        self.transform = build_transform(cfg, is_train=split == "train")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        # One bad file must not kill an epoch: the collate function drops the None and the loop counts it.
        try:
            image = decode_rgb(path)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            logger.warning("skipping image %s: %s (PIL's decompression-bomb limit, Image.MAX_IMAGE_PIXELS=%s; "
                           "shrink the image, or raise PIL.Image.MAX_IMAGE_PIXELS if it is genuine)",
                           path, e, Image.MAX_IMAGE_PIXELS)
            return None
        except _UNDECODABLE as e:
            logger.warning("skipping undecodable image %s: %s", path, e)
            return None
        return self.transform(image), label
