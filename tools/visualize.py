#!/usr/bin/env python3
"""Saves, for a few images, the patches each block keeps:  python tools/visualize.py --cfg X.yaml [KEY VALUE ...]

Weights: TEST.CHECKPOINT_FILE_PATH, else the newest checkpoint in OUTPUT_DIR (as the test job chooses), or
`--init sharpened` for synthetic peaked-attention weights. Images: the first --num-images of TEST.SPLIT, or with
--most-varied K the --num-images of the first K whose token depths vary most (A-ViT's `--demo` choice).
Output: OUTPUT_DIR/visualization/image_XXXX.png, one row per image: the input, then the input after every
block where the kept set changed, dropped patches greyed out (tinted blue where they were fused into one
token, EViT), with the kept count in the file's log line.
Token-halting models (A-ViT) get the official demo's three pictures instead: image_XXXX_input.png, the
per-token depth map image_XXXX_depth.png ('hot' colours, white = full depth, with a colour bar), and
image_XXXX.png with input, depth map and their blend side by side.
"""

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import ImageDraw  # noqa: E402
from torchvision.transforms.functional import to_pil_image  # noqa: E402
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


def hot(t: torch.Tensor) -> torch.Tensor:
    """matplotlib's 'hot' colour map: [...] in [0, 1] -> [3, ...] black, red, yellow, white."""
    return torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)])


def depth_map(depth: torch.Tensor, grid, patch: int, full_depth: int) -> torch.Tensor:
    """[3, H, W] the per-patch depth (1..full_depth) of one image in 'hot' colours, one colour per patch."""
    t = (depth.float() - 1) / max(full_depth - 1, 1)
    return hot(t.view(grid)).repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def with_colour_bar(heat: torch.Tensor, full_depth: int):
    """The depth map with a labelled colour bar on its right, as a PIL image."""
    h = heat.shape[1]
    bar = hot(torch.linspace(1, 0, h)[:, None].expand(h, max(h // 12, 6)))
    gap = torch.ones(3, h, max(h // 24, 3))
    labels = torch.ones(3, h, 28)
    canvas = to_pil_image(torch.cat([heat, gap, bar, labels], dim=2))
    draw = ImageDraw.Draw(canvas)
    x = canvas.width - 26
    draw.text((x, 0), str(full_depth), fill=(0, 0, 0))
    draw.text((x, h - 11), "1", fill=(0, 0, 0))
    return canvas


def save_depth_pictures(out_dir: str, index: int, rgb: torch.Tensor, depth: torch.Tensor, grid, patch: int,
                        full_depth: int) -> str:
    scale = max(1, 160 // rgb.shape[-1])
    enlarge = lambda t: t.repeat_interleave(scale, -1).repeat_interleave(scale, -2)  # noqa: E731
    rgb, heat = enlarge(rgb), enlarge(depth_map(depth, grid, patch, full_depth))
    stem = os.path.join(out_dir, f"image_{index:04d}")
    save_image(rgb, stem + "_input.png")
    with_colour_bar(heat, full_depth).save(stem + "_depth.png")
    save_image(torch.stack([rgb, heat, 0.5 * rgb + 0.5 * heat]), stem + ".png", nrow=3, padding=2, pad_value=1.0)
    return stem + ".png"


def pick_most_varied(model, images: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` images whose per-token depths have the largest standard deviation (A-ViT --demo)."""
    with torch.no_grad():
        model(images)
    spread = model.last_depth[:, 1:].float().std(dim=1)
    return images[spread.argsort(descending=True)[:count]]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--init", choices=("checkpoint", "sharpened"), default="checkpoint")
    parser.add_argument("--most-varied", type=int, default=0, metavar="K",
                        help="token-halting models: of the first K images, show those whose depths vary most")
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
        halting = hasattr(model, "halting_scores")
        scanned = max(args.num_images, args.most_varied if halting else 0)
        items = [dataset[i] for i in range(min(scanned, len(dataset)))]
    except VitadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    images = torch.stack([it[0] for it in items if it is not None])
    if len(images) > args.num_images:
        images = pick_most_varied(model, images, args.num_images)
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
        if halting:
            depth = model.last_depth[i, 1:]
            path = save_depth_pictures(out_dir, i, rgb, depth, grid, patch, len(model.blocks))
            logger.info("%s: token depth mean %.2f, min %d, max %d of %d blocks (CLS %d)", path, depth.mean().item(),
                        int(depth.min()), int(depth.max()), len(model.blocks), int(model.last_depth[i, 0]))
            continue
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
