"""ImageNet-layout folders: <PATH_TO_DATA_DIR>/<split>/<class>/<image>, any class folder names.

Classes are the sorted sub-folder names of the train split (so val and train agree even if val lacks a
class); an optional class_index.json in PATH_TO_DATA_DIR ({"<folder>": index}) fixes the order instead,
e.g. to match a checkpoint's classifier.
"""

import json
import logging
import os

from iopath.common.file_io import g_pathmgr
from PIL import Image, UnidentifiedImageError

from vitadapt.errors import VitadaptError

from .build import register_dataset
from .transforms import build_transform

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(VitadaptError, RuntimeError):
    """A data set folder or file is missing or malformed."""


def read_classes(root: str):
    index_file = os.path.join(root, "class_index.json")
    if g_pathmgr.isfile(index_file):
        with g_pathmgr.open(index_file) as f:
            return {str(k): int(v) for k, v in json.load(f).items()}
    for split in ("train", "val"):
        folder = os.path.join(root, split)
        if g_pathmgr.isdir(folder):
            names = sorted(n for n in g_pathmgr.ls(folder) if g_pathmgr.isdir(os.path.join(folder, n)))
            if names:
                return {name: i for i, name in enumerate(names)}
    raise DataError(f"no class folders found under {root}/train or {root}/val (expected <split>/<class>/<image>)")


@register_dataset("imagenet")
class ImageFolderDataset:
    NEEDS_DATA_DIR = True

    def __init__(self, cfg, split: str):
        root = cfg.DATA.PATH_TO_DATA_DIR
        self.split = split
        self.classes = read_classes(root)
        if len(self.classes) > cfg.MODEL.NUM_CLASSES:
            raise DataError(f"{root} has {len(self.classes)} classes but MODEL.NUM_CLASSES is "
                            f"{cfg.MODEL.NUM_CLASSES}")
        folder = os.path.join(root, split)
        if not g_pathmgr.isdir(folder):
            raise DataError(f"split folder not found: {folder} (DATA.PATH_TO_DATA_DIR={root})")
        self.samples = []
        for name in sorted(g_pathmgr.ls(folder)):
            class_dir = os.path.join(folder, name)
            if not g_pathmgr.isdir(class_dir):
                continue
            if name not in self.classes:
                raise DataError(f"class folder {class_dir} is not one of the {len(self.classes)} classes")
            self.samples += [(os.path.join(class_dir, f), self.classes[name]) for f in sorted(g_pathmgr.ls(class_dir))
                             if f.lower().endswith(IMAGE_EXTENSIONS)]
        if not self.samples:
            raise DataError(f"no images found in {folder}")
        self.transform = build_transform(cfg, is_train=split == "train")

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        try:
            with g_pathmgr.open(path, "rb") as f:
                image = Image.open(f).convert("RGB")
        except (OSError, UnidentifiedImageError, ValueError) as e:
            # One bad file must not kill an epoch: the collate function drops it and the loop counts it.
            logger.warning("skipping undecodable image %s: %s", path, e)
            return None
        return self.transform(image), label
