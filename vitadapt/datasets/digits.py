"""The built-in demo data set: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10 classes).

The images are grey levels 0..16; they become RGB images that the usual transforms upscale to the crop
size. The split is fixed: a seeded permutation, the first 300 images are val, the rest train.
"""

import numpy as np
from PIL import Image

from .build import register_dataset
from .imagenet import DataError
from .transforms import build_transform

NUM_VAL = 300


@register_dataset("digits")
class DigitsDataset:
    NEEDS_DATA_DIR = False

    def __init__(self, cfg, split: str):
        from sklearn.datasets import load_digits

        if split not in ("train", "val", "test"):
            raise DataError(f"the digits data set has the splits train and val (test = val), "
                            f"not '{split}' (TEST.SPLIT)")
        if cfg.MODEL.NUM_CLASSES < 10:
            raise DataError(f"the digits data set has 10 classes but MODEL.NUM_CLASSES is {cfg.MODEL.NUM_CLASSES}")
        data = load_digits()
        order = np.random.RandomState(0).permutation(len(data.target))
        chosen = order[:NUM_VAL] if split in ("val", "test") else order[NUM_VAL:]
        self.images = (data.images[chosen] * (255.0 / 16.0)).round().astype(np.uint8)
        self.labels = data.target[chosen].astype(np.int64)
        self.transform = build_transform(cfg, is_train=split == "train")

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index], mode="L").convert("RGB")
        return self.transform(image), int(self.labels[index])
