#!/usr/bin/env python3
"""Saves, for a few images, the patches each block keeps:  python tools/visualize.py --cfg X.yaml [KEY VALUE ...]

Weights: TEST.CHECKPOINT_FILE_PATH, else the newest checkpoint in OUTPUT_DIR (as the test job chooses), or
`--init sharpened` for synthetic peaked-attention weights. Images: the first --num-images of TEST.SPLIT.
Output: OUTPUT_DIR/visualization/image_XXXX.png, one row per image: the input, then the input after every
block where the kept set changed, dropped patches greyed out (tinted blue where they were fused into one
token, EViT), with the kept count in the file's log line.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from vitadapt.config import load_config  # noqa: E402
from vitadapt.datasets import build_dataset  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.engine.trainer import test_checkpoint  # noqa: E402
from vitadapt.models import build_model  # noqa: E402
from vitadapt.models.evit import FUSED_ID  # noqa: E402
from vitadapt.models.synthetic import sharpen_  # noqa: E402
from vitadapt.utils.checkpoint import load_weights  # noqa: E402

logger = logging.getLogger("vitadapt.visualize")


def kept_patch_mask(ids: torch.Tensor, grid, patch: int) -> torch.Tensor:
    """[H, W] bool: pixels of the patches whose original id (1 + raster index) is in `ids`."""
    kept = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    patches = ids[ids > 0] - 1
    kept[patches] = True
    return kept.view(grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)


def render(image: torch.Tensor, ids_per_block, grid, patch: int):
    """The image, then one panel per block whose kept set changed (dropped patches grey)."""
    panels, previous, changes = [image], None, []
    for block, ids in enumerate(ids_per_block):
        kept = set(ids.tolist()) - {-1}  # original ids of the live tokens (-1: no token in this slot)
        if kept == previous:
            continue
        previous = kept
        if len(kept) == grid[0] * grid[1] + 1 and block < len(ids_per_block) - 1:
            continue  # nothing dropped yet
        mask = kept_patch_mask(ids, grid, patch)
        fused = FUSED_ID in kept
        # Dropped patches fade to grey; with a fused token (EViT) they live on in it, so they fade to blue instead.
        background = torch.tensor([0.25, 0.35, 0.75] if fused else [0.5, 0.5, 0.5])[:, None, None]
        panels.append(torch.where(mask, image, background + 0.2 * (image - 0.5)))
        changes.append((block, f"{len(kept - {FUSED_ID})}" + (" + 1 fused" if fused else "")))
    return panels, changes


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--init", choices=("checkpoint", "sharpened"), default="checkpoint")
    args, opts = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        cfg = load_config(args.cfg, opts)
        model = build_model(cfg).eval()
        if args.init == "sharpened":
            sharpen_(model)
        else:
            load_weights(model, test_checkpoint(cfg))
        dataset = build_dataset(cfg.TEST.DATASET, cfg, cfg.TEST.SPLIT)
        items = [dataset[i] for i in range(min(args.num_images, len(dataset)))]
    except VitadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = torch.stack([it[0] for it in items if it is not None])
    model.trace_token_ids = True
    with torch.no_grad():
        model(images)
    mean = torch.tensor(cfg.DATA.MEAN)[:, None, None]
    std = torch.tensor(cfg.DATA.STD)[:, None, None]
    grid, patch = tuple(model.patch_grid), cfg.VIT.PATCH_SIZE
    out_dir = os.path.join(cfg.OUTPUT_DIR, "visualization")
    os.makedirs(out_dir, exist_ok=True)
    for i, image in enumerate(images):
        rgb = (image * std + mean).clamp(0, 1)
        panels, changes = render(rgb, [ids[i] for ids in model.last_token_ids], grid, patch)
        path = os.path.join(out_dir, f"image_{i:04d}.png")
        scale = max(1, 160 // rgb.shape[-1])  # small inputs (the digits demo) are enlarged, pixels kept sharp
        panels = torch.stack(panels).repeat_interleave(scale, -1).repeat_interleave(scale, -2)
        save_image(panels, path, nrow=len(panels), padding=2, pad_value=1.0)
        logger.info("%s: kept tokens (CLS included) after blocks %s", path,
                    ", ".join(f"{b}: {n}" for b, n in changes) or "all blocks: all")
    return 0


if __name__ == "__main__":
    sys.exit(main())
