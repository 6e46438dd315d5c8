#!/usr/bin/env python3
"""Pictures of the patches each block keeps, for a few images:  python tools/visualize.py --cfg X.yaml [KEY VALUE ...]

Weights: TEST.CHECKPOINT_FILE_PATH, else the newest checkpoint in OUTPUT_DIR (as the test job chooses), or
`--init sharpened` for synthetic peaked-attention weights (`--init halting`: plus a drift under which A-ViT tokens
halt at varied depths; vitadapt.models.synthetic). Synthetic weights show what the pictures look like, not what a
trained model keeps. Images: the first --num-images of TEST.SPLIT, or with
--most-varied K the --num-images of the first K whose token depths vary most (A-ViT's `--demo` choice).
Output: OUTPUT_DIR/visualization/image_XXXX.png, one picture per image: the input, then the input after every
block where the kept set changed, each panel titled with its block and the patches kept; dropped patches are
greyed out and hatched (tinted blue where they were fused into one token, EViT), as a legend below says.
Token-halting models (A-ViT) get the official demo's three pictures instead: image_XXXX_input.png, the
per-token depth map image_XXXX_depth.png ('hot' colours, white = full depth) and image_XXXX.png with input,
depth map and their blend side by side; both maps carry a colour bar labelled with the depth in blocks.
Small inputs (the 32 px digits demo) are enlarged to about 160 px, pixels kept sharp.
"""

import argparse
import logging
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402
from torchvision.transforms.functional import to_pil_image  # noqa: E402
from torchvision.utils import save_image  # noqa: E402

from vitadapt.config import ConfigError, check_paths, load_config  # noqa: E402
from vitadapt.datasets import build_dataset  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.engine.output_dir import ensure_writable_dir  # noqa: E402
from vitadapt.engine.trainer import test_checkpoint  # noqa: E402
from vitadapt.models import build_model  # noqa: E402
from vitadapt.models.evit import FUSED_ID  # noqa: E402
from vitadapt.models.synthetic import add_halting_drift_, sharpen_  # noqa: E402
from vitadapt.utils.checkpoint import load_weights  # noqa: E402

logger = logging.getLogger("vitadapt.visualize")

PANEL_SIZE = 160  # smaller inputs are enlarged (nearest neighbour) to about this many pixels
PAD = 4  # white space around and between panels
SWATCH = 14  # legend swatches and colour bar width, in pixels
DROPPED = (0.5, 0.5, 0.5)  # dropped patches fade to grey...
FUSED = (0.25, 0.35, 0.75)  # ...or to blue where they live on in EViT's fused token


def font(size: int = 13):
    """PIL's default font at `size` px (scalable with Pillow >= 10.1 and FreeType; else its fixed bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def line_height(f) -> int:
    return f.getbbox("Ag")[3] + 3


def enlarge(t: torch.Tensor, scale: int) -> torch.Tensor:
    return t.repeat_interleave(scale, -1).repeat_interleave(scale, -2)


def kept_patch_mask(ids: torch.Tensor, grid, patch: int) -> torch.Tensor:
    """[H, W] bool: pixels of the patches whose original id (1 + raster index) is in `ids`."""
    kept = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    patches = ids[ids > 0] - 1
    kept[patches] = True
    return kept.view(grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)


def fade(image: torch.Tensor, dropped: torch.Tensor, colour) -> torch.Tensor:
    """`image` with the `dropped` pixels faded towards `colour` and hatched with thin diagonal lines: plain grey
    alone would be mistaken for image content (the digits are grey on black)."""
    c = torch.tensor(colour)[:, None, None]
    h, w = dropped.shape
    hatch = (torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 6 == 0
    faded = torch.where(hatch, 0.55 * c, c + 0.2 * (image - 0.5))
    return torch.where(dropped, faded, image)


def render(image: torch.Tensor, ids_per_block, grid, patch: int):
    """(panels, titles, changes): the image, then one panel per block whose kept set changed (dropped patches faded,
    see fade); each panel's title lines; (block, kept tokens with CLS, whether one is a fused token) of every panel
    after the input."""
    n = grid[0] * grid[1]
    panels, titles, previous, changes = [image], [["input", f"{n} patches"]], None, []
    for block, ids in enumerate(ids_per_block):
        kept = set(ids.tolist()) - {-1}  # original ids of the live tokens (-1: no token in this slot)
        if kept == previous:
            continue
        previous = kept
        if len(kept) == n + 1 and block < len(ids_per_block) - 1:
            continue  # nothing dropped yet
        fused = FUSED_ID in kept
        mask = kept_patch_mask(ids, grid, patch)
        panels.append(fade(image, ~mask, FUSED if fused else DROPPED))
        kept_patches = sum(i > 0 for i in kept)  # CLS (0) and the fused token (FUSED_ID < 0) are no patches
        titles.append([f"after block {block}", f"{kept_patches}/{n} kept" + (" + 1 fused" if fused else "")])
        changes.append((block, len(kept - {FUSED_ID}), fused))
    return panels, titles, changes


def drop_legend(panels_fused, n: int):
    """Legend items (swatch or None, text) of a picture from `render`; panels_fused: per panel after the input,
    whether it has a fused token."""
    if not panels_fused:
        return [(None, f"no block dropped a token: all {n} patches kept")]

    def swatch(colour):
        return fade(torch.full((3, SWATCH, SWATCH), 0.5), torch.ones(SWATCH, SWATCH, dtype=torch.bool), colour)

    items = [(None, "kept: as in the input")]
    if not all(panels_fused):
        items.append((swatch(DROPPED), "dropped"))
    if any(panels_fused):
        items.append((swatch(FUSED), "dropped, merged into 1 fused token"))
    return items


def hot(t: torch.Tensor) -> torch.Tensor:
    """matplotlib's 'hot' colour map: [...] in [0, 1] -> [3, ...] black, red, yellow, white."""
    return torch.stack([(3 * t).clamp(0, 1), (3 * t - 1).clamp(0, 1), (3 * t - 2).clamp(0, 1)])


def depth_colours(depth: torch.Tensor, full_depth: int) -> torch.Tensor:
    return hot((depth.float() - 1) / max(full_depth - 1, 1))


def depth_map(depth: torch.Tensor, grid, patch: int, full_depth: int) -> torch.Tensor:
    """[3, H, W] the per-patch depth (1..full_depth) of one image in 'hot' colours, one colour per patch."""
    return depth_colours(depth.view(grid), full_depth).repeat_interleave(patch, 1).repeat_interleave(patch, 2)


def depth_ticks(full_depth: int, most: int = 10):
    """The depths labelled on the colour bar: every one up to `most`, else 1, the full depth and multiples of a step."""
    step = math.ceil(full_depth / most)
    return sorted({1, full_depth, *range(step, full_depth, step)})


def depth_colour_bar(height: int, full_depth: int) -> Image.Image:
    """A vertical bar with one band per depth in the depth map's colours (full depth on top), its depths labelled,
    titled 'token depth (blocks)' along its side."""
    f = font()
    lh = line_height(f)
    band = (torch.arange(height) * full_depth // height)  # band index of each row, top = full depth
    colours = depth_colours(full_depth - band, full_depth)[:, :, None].expand(3, height, SWATCH)
    label_w = int(f.getlength(str(full_depth))) + 8
    canvas = Image.new("RGB", (SWATCH + 3 + label_w + lh, height), "white")
    canvas.paste(to_pil_image(colours.contiguous()), (0, 0))
    draw = ImageDraw.Draw(canvas)
    draw.rectangle((0, 0, SWATCH - 1, height - 1), outline=(0, 0, 0))
    for d in depth_ticks(full_depth):
        y = (full_depth - d + 0.5) * height / full_depth
        draw.line((SWATCH, y, SWATCH + 2, y), fill=(0, 0, 0))
        draw.text((SWATCH + 4, y), str(d), fill=(0, 0, 0), font=f, anchor="lm")
    title = Image.new("RGB", (height, lh), "white")
    ImageDraw.Draw(title).text((height / 2, lh / 2), "token depth (blocks)", fill=(0, 0, 0), font=f, anchor="mm")
    canvas.paste(title.rotate(90, expand=True), (SWATCH + 3 + label_w, 0))
    return canvas


def panel_origins(widths, title_lines: int):
    """Top-left corner (x, y) of each panel in a picture from `compose`."""
    y = PAD + title_lines * line_height(font())
    xs = [PAD + sum(widths[:i]) + i * PAD for i in range(len(widths))]
    return [(x, y) for x in xs]


def compose(panels, titles, legend=(), bar=None) -> Image.Image:
    """One picture: the panels side by side, each under its title lines, `bar` (e.g. a colour bar) on the right, the
    legend items (swatch tensor or None, text) in rows below."""
    f = font()
    lh = line_height(f)
    origins = panel_origins([p.shape[-1] for p in panels], max(map(len, titles)))
    top = origins[0][1]
    width = origins[-1][0] + panels[-1].shape[-1] + PAD + (bar.width + PAD if bar is not None else 0)
    bottom = top + max(p.shape[-2] for p in panels) + PAD
    # The legend flows into as many rows as the width needs (a single small panel gets a narrow picture).
    rows, row, used = [], [], 0
    for swatch, text in legend:
        w = (SWATCH + 4 if swatch is not None else 0) + int(f.getlength(text)) + 12
        if row and used + w > width - 2 * PAD:
            rows.append(row)
            row, used = [], 0
        row.append((swatch, text))
        used += w
    rows += [row] if row else []
    width = max([width] + [2 * PAD + sum((SWATCH + 4 if s is not None else 0) + int(f.getlength(t)) + 12 for s, t in r)
                           for r in rows])
    canvas = Image.new("RGB", (width, bottom + len(rows) * (lh + 2) + (PAD if rows else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for (x, y), panel, lines in zip(origins, panels, titles):
        canvas.paste(to_pil_image(panel.clamp(0, 1)), (x, y))
        # A thin frame, so that white patches (full depth, a white background) do not merge with the page.
        draw.rectangle((x - 1, y - 1, x + panel.shape[-1], y + panel.shape[-2]), outline=(160, 160, 160))
        for k, line in enumerate(lines):
            draw.text((x + panel.shape[-1] / 2, PAD + k * lh), line, fill=(0, 0, 0), font=f, anchor="ma")
    if bar is not None:
        canvas.paste(bar, (origins[-1][0] + panels[-1].shape[-1] + PAD, top))
    for r, items in enumerate(rows):
        x, y = PAD, bottom + r * (lh + 2)
        for swatch, text in items:
            if swatch is not None:
                canvas.paste(to_pil_image(swatch), (x, y + (lh - SWATCH) // 2))
                draw.rectangle((x, y + (lh - SWATCH) // 2, x + SWATCH - 1, y + (lh - SWATCH) // 2 + SWATCH - 1),
                               outline=(0, 0, 0))
                x += SWATCH + 4
            draw.text((x, y), text, fill=(0, 0, 0), font=f)
            x += int(f.getlength(text)) + 12
    return canvas


def save_depth_pictures(out_dir: str, index: int, rgb: torch.Tensor, depth: torch.Tensor, grid, patch: int,
                        full_depth: int) -> str:
    scale = max(1, PANEL_SIZE // rgb.shape[-1])
    rgb, heat = enlarge(rgb, scale), enlarge(depth_map(depth, grid, patch, full_depth), scale)
    stem = os.path.join(out_dir, f"image_{index:04d}")
    save_image(rgb, stem + "_input.png")
    bar = depth_colour_bar(heat.shape[1], full_depth)
    mean = f"mean {depth.float().mean().item():.2f} of {full_depth} blocks"
    compose([heat], [["token depth", mean]], bar=bar).save(stem + "_depth.png")
    compose([rgb, heat, 0.5 * rgb + 0.5 * heat], [["input", f"{grid[0] * grid[1]} patches"], ["token depth", mean],
                                                  ["blend", "depth over input"]], bar=bar).save(stem + ".png")
    return stem + ".png"


def pick_most_varied(model, images: torch.Tensor, count: int) -> torch.Tensor:
    """The `count` images whose per-token depths have the largest standard deviation (A-ViT --demo)."""
    with torch.no_grad():
        model(images)
    spread = model.last_depth[:, 1:].float().std(dim=1)
    return images[spread.argsort(descending=True)[:count]]


def count(minimum: int):
    """An argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def check_test_paths(cfg, with_checkpoint: bool) -> None:
    """The start-up checks of a test job (vitadapt.config.check_paths: the data folder, the checkpoint files),
    whatever TRAIN.ENABLE / TEST.ENABLE say, since this tool reads TEST.SPLIT: the same messages, naming the key,
    as tools/run_net.py gives."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TRAIN.ENABLE, cfg.TEST.ENABLE = False, True
    if not with_checkpoint:
        cfg.TEST.CHECKPOINT_FILE_PATH = cfg.TRAIN.CHECKPOINT_FILE_PATH = ""
    check_paths(cfg)


def first_images(dataset, wanted: int, split: str) -> torch.Tensor:
    """The first `wanted` decodable images of the split (an undecodable one is skipped, with the data set's own
    warning, and the next taken, up to 20 more), or an error when none decodes."""
    images, tried = [], 0
    while len(images) < wanted and tried < min(len(dataset), wanted + 20):
        item = dataset[tried]
        tried += 1
        if item is not None:
            images.append(item[0])
    if not images:
        where = getattr(dataset, "folder", None)
        raise VitadaptError(f"no image of TEST.SPLIT '{split}' could be decoded: {tried} tried in "
                            f"{where or 'the data set'}, all failed (see the warnings above)")
    return torch.stack(images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cfg", required=True)
    parser.add_argument("--num-images", type=count(1), default=4, help="pictures to write (default 4)")
    parser.add_argument("--init", choices=("checkpoint", "sharpened", "halting"), default="checkpoint",
                        help="weights: the test checkpoint, or synthetic ones (see above)")
    parser.add_argument("--most-varied", type=count(0), default=0, metavar="K",
                        help="token-halting models: of the first K images, show those whose depths vary most")
    args, opts = parser.parse_known_args(argv)
    flags = [o for o in opts if o.startswith("--")]
    if flags:  # a mistyped option would otherwise reach the config as a key
        parser.error(f"unrecognized argument: {flags[0]}")
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(message)s")
    try:
        cfg = load_config(args.cfg, opts)
        check_test_paths(cfg, with_checkpoint=args.init == "checkpoint")
        model = build_model(cfg).eval()
        halting = hasattr(model, "halting_scores")
        if args.most_varied and not halting:
            raise VitadaptError(f"--most-varied picks images by how much their token depths vary: it needs a "
                                f"token-halting model (A-ViT), and MODEL.NAME {cfg.MODEL.NAME} has no token depths")
        if args.most_varied and args.most_varied < args.num_images:
            raise VitadaptError(f"--most-varied {args.most_varied} must be at least --num-images ({args.num_images}): "
                                "it is the number of images to choose from")
        if args.init in ("sharpened", "halting"):
            sharpen_(model)
            if args.init == "halting":
                add_halting_drift_(model)
        else:
            try:
                checkpoint = test_checkpoint(cfg)
            except ConfigError as e:
                raise ConfigError(f"{e} (or draw with synthetic weights: --init sharpened)") from None
            load_weights(model, checkpoint)
        dataset = build_dataset(cfg.TEST.DATASET, cfg, cfg.TEST.SPLIT)
        images = first_images(dataset, max(args.num_images, args.most_varied), cfg.TEST.SPLIT)
        if len(images) > args.num_images:
            images = pick_most_varied(model, images, args.num_images)
        model.trace_token_ids = True
        with torch.no_grad():
            model(images)
        if not isinstance(getattr(model, "last_token_ids", None), list):
            raise VitadaptError(f"MODEL.NAME {cfg.MODEL.NAME} does not record which tokens each block keeps "
                                "(trace_token_ids): there is nothing to draw")
        out_dir = os.path.join(cfg.OUTPUT_DIR, "visualization")
        ensure_writable_dir(out_dir, "the picture folder OUTPUT_DIR/visualization")
    except VitadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if len(images) < args.num_images:
        logger.warning("TEST.SPLIT '%s' gave %d image(s), not --num-images %d", cfg.TEST.SPLIT, len(images),
                       args.num_images)
    mean = torch.tensor(cfg.DATA.MEAN)[:, None, None]
    std = torch.tensor(cfg.DATA.STD)[:, None, None]
    grid, patch = tuple(model.patch_grid), cfg.VIT.PATCH_SIZE
    for i, image in enumerate(images):
        rgb = (image * std + mean).clamp(0, 1)
        if halting:
            depth = model.last_depth[i, 1:]
            path = save_depth_pictures(out_dir, i, rgb, depth, grid, patch, len(model.blocks))
            logger.info("%s: token depth mean %.2f, min %d, max %d of %d blocks (CLS %d)", path, depth.mean().item(),
                        int(depth.min()), int(depth.max()), len(model.blocks), int(model.last_depth[i, 0]))
            continue
        scale = max(1, PANEL_SIZE // rgb.shape[-1])  # small inputs (the digits demo) are enlarged, pixels kept sharp
        panels, titles, changes = render(enlarge(rgb, scale), [ids[i] for ids in model.last_token_ids], grid,
                                         patch * scale)
        legend = drop_legend([fused for _, _, fused in changes], grid[0] * grid[1])
        path = os.path.join(out_dir, f"image_{i:04d}.png")
        compose(panels, titles, legend).save(path)
        kept = ", ".join(f"{b}: {n}" + (" + 1 fused" if fused else "") for b, n, fused in changes)
        logger.info("%s: %s", path, f"kept tokens (CLS included) after blocks {kept}" if changes
                    else f"no block dropped a token (all {grid[0] * grid[1] + 1}, CLS included, kept)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
