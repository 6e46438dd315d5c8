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
DVT models get one picture per image: the input, then every exit with its token grid drawn in yellow, titled with
its confidence and prediction and whether the image leaves there (under DVT.THRESHOLDS, or the stored thresholds
of DVT.BUDGET_POINT with DVT.THRESHOLD_SOURCE checkpoint); the exits it never reaches are faded and hatched.
AdaViT models get one picture per image with the input and every block (7 panels a row): the patch tokens that took
part in the block (the others greyed out and hatched), a title with the tokens, heads kept and attention / MLP branch
on or off, a strip of marks under it (one square per head, one for each branch: ran, dropped / off, or ran without a
decision), a skipped block (both branches off) crossed out in red, and a legend. With --init sharpened their
decision heads are rescaled on the first 16 images so that decisions differ between images
(vitadapt.models.synthetic.calibrate_decisions_).
Small inputs (the 32 px digits demo) are enlarged to about 160 px, pixels kept sharp.
"""

import argparse
import logging
import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

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
from vitadapt.models.adavit import AdaViTVisionTransformer  # noqa: E402
from vitadapt.models.evit import FUSED_ID  # noqa: E402
from vitadapt.models.synthetic import add_halting_drift_, calibrate_decisions_, sharpen_  # noqa: E402
from vitadapt.utils.checkpoint import load_weights  # noqa: E402

logger = logging.getLogger("vitadapt.visualize")

PANEL_SIZE = 160  # smaller inputs are enlarged (nearest neighbour) to about this many pixels
PAD = 4  # white space around and between panels
SWATCH = 14  # legend swatches and colour bar width, in pixels
DROPPED = (0.5, 0.5, 0.5)  # dropped patches fade to grey...
FUSED = (0.25, 0.35, 0.75)  # ...or to blue where they live on in EViT's fused token
GRID = (1.0, 0.85, 0.1)  # DVT: the borders of an exit's tokens


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
    """Top-left corner (x, y) of each panel in a one-row picture from `compose`."""
    return grid_origins(widths, [0] * len(widths), title_lines, 0, len(widths))


def compose(panels, titles, legend=(), bar=None, marks=None, columns=None) -> Image.Image:
    """One picture: the panels `columns` a row (default: all in one row), each under its title lines; with `marks`,
    a strip of marks under every panel but the first, the input (draw_strip; marks[k] belongs to panels[k + 1]);
    `bar` (e.g. a colour bar) right of the first row; the legend items (swatch tensor or None, text) in rows below."""
    f, small = font(), font(11)
    lh = line_height(f)
    widths, heights = [p.shape[-1] for p in panels], [p.shape[-2] for p in panels]
    lines, strip = max(map(len, titles)), strip_height(small) if marks is not None else 0
    origins = grid_origins(widths, heights, lines, strip, columns or len(panels))
    width = max(x + w for (x, _), w in zip(origins, widths)) + PAD
    bar_x = width
    width += bar.width + PAD if bar is not None else 0
    bottom = max(y + h for (_, y), h in zip(origins, heights)) + strip + PAD
    rows = legend_rows(legend, width, f)
    width = max([width] + [2 * PAD + sum(legend_item_width(s, t, f) for s, t in r) for r in rows])
    canvas = Image.new("RGB", (width, bottom + len(rows) * (lh + 2) + (PAD if rows else 0)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((x, y), panel, title) in enumerate(zip(origins, panels, titles)):
        canvas.paste(to_pil_image(panel.clamp(0, 1)), (x, y))
        # A thin frame, so that white patches (full depth, a white background) do not merge with the page.
        draw.rectangle((x - 1, y - 1, x + panel.shape[-1], y + panel.shape[-2]), outline=(160, 160, 160))
        for j, line in enumerate(title):
            draw.text((x + panel.shape[-1] / 2, y - (lines - j) * lh), line, fill=(0, 0, 0), font=f, anchor="ma")
        if marks is not None and k > 0:
            draw_strip(draw, x, y + panel.shape[-2] + 3, panel.shape[-1], marks[k - 1], small)
    if bar is not None:
        canvas.paste(bar, (bar_x, origins[0][1]))
    draw_legend(canvas, rows, bottom, f)
    return canvas


def legend_item_width(swatch, text: str, f) -> int:
    return (SWATCH + 4 if swatch is not None else 0) + int(f.getlength(text)) + 12


def legend_rows(legend, width: int, f):
    """The legend items (swatch tensor or None, text) flowed into as many rows as a picture `width` px wide needs
    (a single small panel gets a narrow picture)."""
    rows, row, used = [], [], 0
    for swatch, text in legend:
        w = legend_item_width(swatch, text, f)
        if row and used + w > width - 2 * PAD:
            rows.append(row)
            row, used = [], 0
        row.append((swatch, text))
        used += w
    return rows + ([row] if row else [])


def draw_legend(canvas: Image.Image, rows, top: int, f) -> None:
    draw = ImageDraw.Draw(canvas)
    lh = line_height(f)
    for r, items in enumerate(rows):
        x, y = PAD, top + r * (lh + 2)
        for swatch, text in items:
            if swatch is not None:
                canvas.paste(to_pil_image(swatch), (x, y + (lh - SWATCH) // 2))
                draw.rectangle((x, y + (lh - SWATCH) // 2, x + SWATCH - 1, y + (lh - SWATCH) // 2 + SWATCH - 1),
                               outline=(0, 0, 0))
                x += SWATCH + 4
            draw.text((x, y), text, fill=(0, 0, 0), font=f)
            x += int(f.getlength(text)) + 12


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


# ---------------------------------------------------------------------------------------------------------------
# AdaViT: per block, the patch tokens that took part, the heads kept and the attention / MLP branches on or off.

ON = (0.15, 0.4, 0.8)  # strip marks: a head or branch that ran...
FIXED = (0.7, 0.78, 0.92)  # ...that ran without a decision (blocks before ADAVIT.KEEP_LAYERS)...
OFF = (1.0, 1.0, 1.0)  # ...that was dropped or off
CROSS = (0.85, 0.1, 0.1)  # the cross over a skipped block
MARK = 10  # side of a strip mark in pixels, at most
CALIBRATION_IMAGES = 16  # --init sharpened on AdaViT: images that calibrate_decisions_ measures
COLUMNS = 7  # panels per row: the input and 4 blocks in one row, 12 blocks in two
# Share of decisions on, on the images of `calibrate_decisions_` (--init sharpened): tokens kept, heads kept, branches on.
SYNTHETIC_USAGE = {"tokens": 0.6, "heads": 0.7, "layer": 0.7}


@dataclass(frozen=True)
class BlockUse:
    """What one image decided in one AdaViT block; None where the block has no such decision (all of it runs)."""

    block: int
    tokens: Optional[torch.Tensor] = None  # [patches] bool: kept by the token decision (CLS always takes part)
    heads: Optional[torch.Tensor] = None  # [H] bool
    attn: Optional[bool] = None
    mlp: Optional[bool] = None

    @property
    def skipped(self) -> bool:
        return self.attn is False and self.mlp is False


def block_uses(decisions, index: int):
    """The BlockUse of image `index` in every block, from an AdaViT model's `last_decisions`."""
    return [BlockUse(b, None if d.tokens is None else d.tokens[index, 1:] > 0.5,
                     None if d.heads is None else d.heads[index] > 0.5,
                     None if d.layer is None else bool(d.layer[index, 0] > 0.5),
                     None if d.layer is None else bool(d.layer[index, 1] > 0.5)) for b, d in enumerate(decisions)]


def took_part(use: BlockUse, n: int, token_with_mlp: bool = True) -> torch.Tensor:
    """[n] bool: the patch tokens a block computed (its attention or MLP updated them)."""
    if use.skipped:
        return torch.zeros(n, dtype=torch.bool)
    if use.tokens is None or (use.attn is False and not token_with_mlp):  # MLP only, on every token
        return torch.ones(n, dtype=torch.bool)
    return use.tokens.cpu()


def block_marks(use: BlockUse, num_heads: int):
    """(head states, attention state, MLP state) of a block's strip, each 'on', 'off' or 'fixed' (ran, no
    decision): what ran, so nothing is 'on' in a skipped block."""
    def state(decision):
        return "fixed" if decision is None else "on" if decision else "off"

    if use.skipped:
        return ("off",) * num_heads, "off", "off"
    heads = ("fixed",) * num_heads if use.heads is None else tuple(state(bool(h)) for h in use.heads)
    return heads, state(use.attn), state(use.mlp)


def adavit_layout(uses, n: int, num_heads: int, token_with_mlp: bool = True, gmacs: Optional[float] = None):
    """(titles, marks, legend) of one image's AdaViT picture: the title lines of the input panel and of every
    block's panel, the strip marks under every block's panel (block_marks), and the legend items (swatch tensor
    or None, text)."""
    titles = [["input", f"{n} patches, {num_heads} heads", "" if gmacs is None else f"{gmacs:.3g} GMACs"]]
    for use in uses:
        if use.skipped:
            titles.append([f"block {use.block}: skipped", "attn off, MLP off", "nothing computed"])
            continue
        kept = int(took_part(use, n, token_with_mlp).sum())
        heads = num_heads if use.heads is None else int(use.heads.sum())
        on = {None: "on", True: "on", False: "off"}
        titles.append([f"block {use.block}: {kept}/{n} tokens", f"heads {heads}/{num_heads}",
                       f"attn {on[use.attn]}, MLP {on[use.mlp]}"])
    marks = [block_marks(use, num_heads) for use in uses]
    legend = [(None, "token took part: as in the input")]
    if any(not u.skipped and not bool(took_part(u, n, token_with_mlp).all()) for u in uses):
        legend.append((fade(torch.full((3, SWATCH, SWATCH), 0.5), torch.ones(SWATCH, SWATCH, dtype=torch.bool),
                            DROPPED), "token skipped the block" if token_with_mlp else "token skipped attention"))
    if any(u.skipped for u in uses):
        legend.append((skipped_panel(torch.full((3, SWATCH, SWATCH), 0.5), width=2), "block skipped"))
    legend.append((mark_swatch("on"), "head / branch ran"))
    legend.append((mark_swatch("off"), "dropped / off"))
    if any("fixed" in (*m[0], m[1], m[2]) for m in marks):
        legend.append((mark_swatch("fixed"), "ran, no decision in this block"))
    return titles, marks, legend


def mark_swatch(state: str) -> torch.Tensor:
    colour = {"on": ON, "off": OFF, "fixed": FIXED}[state]
    return torch.tensor(colour)[:, None, None].expand(3, SWATCH, SWATCH).contiguous()


def skipped_panel(image: torch.Tensor, width: int = 4) -> torch.Tensor:
    """A skipped block's panel: every patch faded and hatched, a red cross over it."""
    h, w = image.shape[-2:]
    out = fade(image, torch.ones(h, w, dtype=torch.bool), DROPPED)
    rows, cols = torch.arange(h)[:, None].float() / max(h - 1, 1), torch.arange(w)[None, :].float() / max(w - 1, 1)
    band = width / max(h, w)
    cross = ((rows - cols).abs() < band) | ((rows + cols - 1).abs() < band)
    return torch.where(cross, torch.tensor(CROSS)[:, None, None], out)


def render_adavit(image: torch.Tensor, uses, grid, patch: int, token_with_mlp: bool = True):
    """Panels: the image, then one per block with the patches that did not take part faded and hatched (fade); a
    skipped block's panel entirely so, crossed out (skipped_panel)."""
    n = grid[0] * grid[1]
    panels = [image]
    for use in uses:
        if use.skipped:
            panels.append(skipped_panel(image))
            continue
        kept = took_part(use, n, token_with_mlp)
        mask = kept.view(grid).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
        panels.append(fade(image, ~mask, DROPPED))
    return panels


def strip_height(f) -> int:
    return 2 * line_height(f) + 2


def draw_strip(draw, x: int, y: int, width: int, marks, f) -> None:
    """Two rows under a block's panel: 'heads' and one square per head; 'attn' and 'MLP' with theirs."""
    heads, attn, mlp = marks
    lh = line_height(f)
    label = int(f.getlength("heads ")) + 2
    side = max(3, min(MARK, (width - label) // max(len(heads), 1) - 2))

    def square(x0, y0, state):
        colour = tuple(int(255 * c) for c in {"on": ON, "off": OFF, "fixed": FIXED}[state])
        top = y0 + (lh - side) // 2
        draw.rectangle((x0, top, x0 + side - 1, top + side - 1), fill=colour, outline=(0, 0, 0))

    draw.text((x, y), "heads", fill=(0, 0, 0), font=f)
    for j, state in enumerate(heads):
        square(x + label + j * (side + 2), y, state)
    y += lh + 2
    cx = x
    for name, state in (("attn", attn), ("MLP", mlp)):
        draw.text((cx, y), name, fill=(0, 0, 0), font=f)
        cx += int(f.getlength(name)) + 3
        square(cx, y, state)
        cx += side + 12


def grid_origins(widths, heights, title_lines: int, strip: int, columns: int = COLUMNS):
    """Top-left corner (x, y) of each panel of a picture from `compose`: `columns` panels a row, each row
    under its title lines and above its strips."""
    lh = line_height(font())
    origins, y = [], PAD
    for start in range(0, len(widths), columns):
        row = range(start, min(start + columns, len(widths)))
        x = PAD
        for i in row:
            origins.append((x, y + title_lines * lh))
            x += widths[i] + PAD
        y += title_lines * lh + max(heights[i] for i in row) + strip + PAD
    return origins


def compose_blocks(panels, titles, marks, legend=(), columns: int = COLUMNS) -> Image.Image:
    """One AdaViT picture: `compose` with `columns` panels a row and each block's strip of marks."""
    return compose(panels, titles, legend, marks=marks, columns=columns)


def save_adavit_picture(path: str, rgb: torch.Tensor, uses, grid, patch: int, num_heads: int,
                        token_with_mlp: bool = True, gmacs: Optional[float] = None) -> Image.Image:
    scale = max(1, PANEL_SIZE // rgb.shape[-1])  # small inputs (the digits demo) are enlarged, pixels kept sharp
    panels = render_adavit(enlarge(rgb, scale), uses, grid, patch * scale, token_with_mlp)
    titles, marks, legend = adavit_layout(uses, grid[0] * grid[1], num_heads, token_with_mlp, gmacs)
    picture = compose_blocks(panels, titles, marks, legend)
    picture.save(path)
    return picture


@torch.no_grad()
def token_grid(image: torch.Tensor, side: int) -> torch.Tensor:
    """`image` with the borders of a side x side token grid drawn in yellow (a DVT exit's tokens)."""
    out = image.clone()
    h, w = image.shape[-2:]
    for k in range(side + 1):
        y, x = min(round(k * h / side), h - 1), min(round(k * w / side), w - 1)
        out[:, y, :] = torch.tensor(GRID)[:, None]
        out[:, :, x] = torch.tensor(GRID)[:, None]
    return out


def dvt_layout(image: torch.Tensor, sides, probs: torch.Tensor, exit_at: Optional[int]):
    """(panels, titles) of one image through the DVT cascade: per exit, the image with that exit's token grid, its
    confidence and prediction; exits after the one the image leaves at (never run) are faded and hatched."""
    panels, titles = [], []
    for k, (side, p) in enumerate(zip(sides, probs)):
        panel = token_grid(image, side)
        confidence, label = p.max(dim=0)
        state = ("no thresholds: every exit runs" if exit_at is None else "answers here" if k == exit_at
                 else "not run" if k > exit_at else "not confident, goes on")
        if exit_at is not None and k > exit_at:
            panel = fade(panel, torch.ones(panel.shape[-2:], dtype=torch.bool), DROPPED)
        panels.append(panel)
        run = exit_at is None or k <= exit_at
        titles.append([f"exit {k + 1}: {side}x{side} tokens",
                       f"p={confidence:.3f}, class {int(label)}" + ("" if run else " if run"), state])
    return panels, titles


def save_dvt_pictures(cfg, model, images, out_dir: str, mean, std, checkpoint: str) -> None:
    """One picture per image: its way through the cascade (dvt_layout), under DVT.THRESHOLDS, or the thresholds an
    official checkpoint stores for DVT.BUDGET_POINT (DVT.THRESHOLD_SOURCE checkpoint); other budget points need
    the test job's threshold search, so the picture then shows every exit without choosing."""
    from vitadapt.engine.exits import choose_thresholds, stored_thresholds
    from vitadapt.models.dvt import stage_side

    stored = stored_thresholds(checkpoint) if checkpoint else None
    if stored is None and cfg.DVT.THRESHOLD_SOURCE == "checkpoint":
        cfg = cfg.clone()
        cfg.DVT.BUDGET_POINT = 0  # no stored thresholds: every exit, without choosing
    thresholds = choose_thresholds(cfg, None, stored, [0.0] * model.num_exits)  # no search here
    model.set_thresholds(None)
    with torch.no_grad():
        model(images)
    probs = torch.stack([logits.softmax(dim=-1) for logits in model.last_exit_logits], dim=1)  # [B, K, C]
    sides = [stage_side(stage, images.shape[-1]) for stage in model.stages]
    for i, image in enumerate(images):
        rgb = (image * std + mean).clamp(0, 1)
        exit_at = None
        if thresholds is not None:
            confident = [bool(probs[i, k].max() >= thresholds[k]) for k in range(len(thresholds))] + [True]
            exit_at = confident.index(True)
        scale = max(1, PANEL_SIZE // rgb.shape[-1])
        panels, titles = dvt_layout(enlarge(rgb, scale), sides, probs[i], exit_at)
        path = os.path.join(out_dir, f"image_{i:04d}.png")
        compose([enlarge(rgb, scale)] + panels, [["input", "", ""]] + titles).save(path)
        logger.info("%s: %s", path, "every exit run (no thresholds)" if exit_at is None else
                    f"leaves at exit {exit_at + 1} ({sides[exit_at]}x{sides[exit_at]} tokens)")


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


def save_clip_pictures(cfg, model, clips: torch.Tensor, out_dir: str) -> None:
    """OUTPUT_DIR/visualization/clip_XXXX_frame_YY.png: each frame of each clip, then its kept patches after every
    block that changed them (as for images), from the model's per-frame token ids (`frame_token_ids`)."""
    mean = torch.tensor(cfg.DATA.MEAN)[:, None, None]
    std = torch.tensor(cfg.DATA.STD)[:, None, None]
    grid, patch = tuple(getattr(model, "base_model", model).patch_grid), cfg.VIT.PATCH_SIZE
    ids = model.frame_token_ids()  # per block [B, T, N + 1]
    for i, clip in enumerate(clips):
        summary = []
        for t in range(clip.shape[1]):
            rgb = (clip[:, t] * std + mean).clamp(0, 1)
            scale = max(1, PANEL_SIZE // rgb.shape[-1])
            panels, titles, changes = render(enlarge(rgb, scale), [block[i, t] for block in ids], grid, patch * scale)
            titles[0][0] = f"frame {t}"
            legend = drop_legend([fused for _, _, fused in changes], grid[0] * grid[1])
            compose(panels, titles, legend).save(os.path.join(out_dir, f"clip_{i:04d}_frame_{t:02d}.png"))
            summary.append(str(changes[-1][1] - 1 if changes else grid[0] * grid[1]))
        logger.info("%s: patches kept per frame after the last block: %s", os.path.join(out_dir, f"clip_{i:04d}_*"),
                    " ".join(summary))


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
        adavit = isinstance(model, AdaViTVisionTransformer)
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
        wanted = max(args.num_images, args.most_varied)
        calibrate = adavit and args.init != "checkpoint"  # decisions that vary: measured on the first images
        images = first_images(dataset, max(wanted, CALIBRATION_IMAGES) if calibrate else wanted, cfg.TEST.SPLIT)
        if calibrate:
            if len(images) >= 2:
                calibrate_decisions_(model, images, SYNTHETIC_USAGE)
            images = images[:wanted]
        if len(images) > args.num_images:
            images = pick_most_varied(model, images, args.num_images)
        if getattr(model, "num_exits", 1) > 1:  # DVT: the cascade, exit by exit
            out_dir = os.path.join(cfg.OUTPUT_DIR, "visualization")
            ensure_writable_dir(out_dir, "the picture folder OUTPUT_DIR/visualization")
            mean, std = torch.tensor(cfg.DATA.MEAN)[:, None, None], torch.tensor(cfg.DATA.STD)[:, None, None]
            save_dvt_pictures(cfg, model, images, out_dir, mean, std, checkpoint if args.init == "checkpoint" else "")
            return 0
        model.trace_token_ids = True
        if hasattr(model, "base_model"):  # XViT: the per-frame backbone keeps the tokens
            model.base_model.trace_token_ids = True
        with torch.no_grad():
            model(images)
        if images.dim() == 5:  # clips: one picture per frame of each clip
            if not model.token_statistics:
                raise VitadaptError(f"MODEL.NAME {cfg.MODEL.NAME} keeps every token of every frame: there is nothing "
                                    "to draw")
            out_dir = os.path.join(cfg.OUTPUT_DIR, "visualization")
            ensure_writable_dir(out_dir, "the picture folder OUTPUT_DIR/visualization")
            save_clip_pictures(cfg, model, images, out_dir)
            return 0
        if not adavit and not isinstance(getattr(model, "last_token_ids", None), list):
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
    heads = cfg.VIT.NUM_HEADS
    for i, image in enumerate(images):
        rgb = (image * std + mean).clamp(0, 1)
        if halting:
            depth = model.last_depth[i, 1:]
            path = save_depth_pictures(out_dir, i, rgb, depth, grid, patch, len(model.blocks))
            logger.info("%s: token depth mean %.2f, min %d, max %d of %d blocks (CLS %d)", path, depth.mean().item(),
                        int(depth.min()), int(depth.max()), len(model.blocks), int(model.last_depth[i, 0]))
            continue
        if adavit:
            uses = block_uses(model.last_decisions, i)
            path = os.path.join(out_dir, f"image_{i:04d}.png")
            gmacs = float(model.macs_per_image()[i]) / 1e9
            save_adavit_picture(path, rgb, uses, grid, patch, heads, model.token_with_mlp, gmacs)
            n = grid[0] * grid[1]
            logger.info("%s: %.4g GMACs; per block tokens / heads / attn, MLP: %s", path, gmacs, "; ".join(
                f"{u.block}: skipped" if u.skipped else
                f"{u.block}: {int(took_part(u, n, model.token_with_mlp).sum())}/{n} / "
                f"{heads if u.heads is None else int(u.heads.sum())}/{heads} / "
                f"{'off' if u.attn is False else 'on'}, {'off' if u.mlp is False else 'on'}" for u in uses))
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
