"""Accuracy vs cost figures (DVT budgeted batch classification), drawn with Pillow.

matplotlib is not a dependency, so the axes, ticks and legend are drawn by hand: small enough to read, and the
figure only has to show where each curve lies, not to be publication-grade."""

import math
import os
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

SIZE = (800, 560)
# Plot area margins: left, top, right, bottom (room for tick labels, axis labels and the title).
MARGINS = (78, 50, 24, 64)
COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
X_LABEL, Y_LABEL = "GMACs per image (mean)", "top-1 accuracy (%)"


def font(size: int) -> ImageFont.ImageFont:
    """Pillow's bundled font; sizes need Pillow >= 10.1, older ones get the fixed bitmap font."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def put_text(draw: ImageDraw.ImageDraw, xy: Tuple[float, float], text: str, text_font, anchor: str = "lt") -> None:
    """Text aligned on xy by anchor (horizontal l/m/r, vertical t/m/b), measured by hand because Pillow's own
    anchors are refused by the bitmap fallback font."""
    width, height = text_font.getbbox(text)[2:]
    dx = {"l": 0.0, "m": 0.5, "r": 1.0}[anchor[0]] * width
    dy = {"t": 0.0, "m": 0.5, "b": 1.0}[anchor[1]] * height
    draw.text((xy[0] - dx, xy[1] - dy), text, fill="black", font=text_font)


def nice_ticks(low: float, high: float, target: int = 6) -> List[float]:
    """About `target` round tick values (steps of 1, 2 or 5 x 10^k) covering [low, high]."""
    if high <= low:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / target
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw)
    first = math.floor(low / step) * step
    count = int(math.ceil((high - first) / step - 1e-9)) + 1
    return [round(first + i * step, 10) for i in range(count)]


def padded_range(values: Sequence[float]) -> Tuple[float, float]:
    """The values' range widened by 3% on each side, so points do not sit on the frame (never below 0 for
    non-negative values: costs and accuracies)."""
    low, high = min(values), max(values)
    pad = 0.03 * (high - low)
    return max(low - pad, min(low, 0.0)), high + pad


def tick_label(value: float, ticks: Sequence[float]) -> str:
    """As many decimals as the tick step needs."""
    step = ticks[1] - ticks[0] if len(ticks) > 1 else 1.0
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return f"{value:.{decimals}f}"


def curve_points(curve: dict) -> Tuple[List[Tuple[float, float]], List[Tuple[float, float]]]:
    """(budgeted points sorted by cost, anytime exits) as (GMACs, top-1) pairs of a `budget_curve` dict; pairs
    that are not finite numbers are left out rather than breaking the axes."""
    def finite(pairs) -> List[Tuple[float, float]]:
        return [(float(x), float(y)) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]

    anytime = curve.get("anytime", {})
    return (sorted(finite(zip(curve.get("expected_gflops", []), curve.get("top1_acc", [])))),
            finite(zip(anytime.get("gflops", []), anytime.get("top1_acc", []))))


def plot_budget_curves(curves: Dict[str, dict], path: str, title: str = "") -> None:
    """Draws each named `budget_curve` result as a polyline of its budgeted points, its anytime exits as
    squares, into a PNG at `path` (written to a temporary file first, so a reader never sees half a file)."""
    series = {name: curve_points(curve) for name, curve in curves.items()}
    xs = [x for budgeted, anytime in series.values() for x, _ in budgeted + anytime]
    ys = [y for budgeted, anytime in series.values() for _, y in budgeted + anytime]
    if not xs:
        raise ValueError("plot_budget_curves: no curve with any point to draw")
    x_ticks, y_ticks = nice_ticks(*padded_range(xs)), nice_ticks(*padded_range(ys))
    left, top, right, bottom = MARGINS[0], MARGINS[1], SIZE[0] - MARGINS[2], SIZE[1] - MARGINS[3]

    def to_pixel(x: float, y: float) -> Tuple[float, float]:
        fx = (x - x_ticks[0]) / (x_ticks[-1] - x_ticks[0])
        fy = (y - y_ticks[0]) / (y_ticks[-1] - y_ticks[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    image = Image.new("RGB", SIZE, "white")
    draw = ImageDraw.Draw(image)
    small, normal = font(13), font(15)
    for x in x_ticks:
        px = to_pixel(x, y_ticks[0])[0]
        draw.line([(px, top), (px, bottom)], fill="#e6e6e6")
        put_text(draw, (px, bottom + 6), tick_label(x, x_ticks), small, "mt")
    for y in y_ticks:
        py = to_pixel(x_ticks[0], y)[1]
        draw.line([(left, py), (right, py)], fill="#e6e6e6")
        put_text(draw, (left - 6, py), tick_label(y, y_ticks), small, "rm")
    draw.rectangle([left, top, right, bottom], outline="black")
    put_text(draw, ((left + right) / 2, SIZE[1] - 10), X_LABEL, normal, "mb")
    draw_vertical_text(image, (14, (top + bottom) / 2), Y_LABEL, normal)
    if title:
        put_text(draw, (SIZE[0] / 2, top / 2), title, font(17), "mm")

    for i, (budgeted, anytime) in enumerate(series.values()):
        color = COLORS[i % len(COLORS)]
        pixels = [to_pixel(x, y) for x, y in budgeted]
        if len(pixels) > 1:
            draw.line(pixels, fill=color, width=2, joint="curve")
        for px, py in pixels:
            draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=color)
        for px, py in (to_pixel(x, y) for x, y in anytime):
            draw.rectangle([px - 5, py - 5, px + 5, py + 5], outline=color, width=2)
    plotted = [to_pixel(x, y) for budgeted, anytime in series.values() for x, y in budgeted + anytime]
    draw_legend(draw, list(series), (left, top, right, bottom), plotted, small)

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)


def draw_vertical_text(image: Image.Image, center: Tuple[float, float], text: str, text_font) -> None:
    """Text rotated 90 degrees (reading bottom to top), centred on `center`."""
    box = text_font.getbbox(text)
    label = Image.new("RGB", (box[2] + 4, box[3] + 4), "white")
    ImageDraw.Draw(label).text((2, 2), text, fill="black", font=text_font)
    label = label.rotate(90, expand=True)
    image.paste(label, (int(center[0] - label.width / 2), int(center[1] - label.height / 2)))


def draw_legend(draw: ImageDraw.ImageDraw, names: List[str], box: Tuple[float, float, float, float],
                points: List[Tuple[float, float]], text_font) -> None:
    """A boxed legend, one line per curve and then the anytime-exit marker, in the corner of the plot `box`
    (left, top, right, bottom) that covers the fewest of the plotted `points` (pixels)."""
    rows = [(name, COLORS[i % len(COLORS)]) for i, name in enumerate(names)] + [("exits (anytime)", None)]
    row_height = 20
    width, height = 46 + max(text_font.getbbox(name)[2] for name, _ in rows), row_height * len(rows) + 8
    left, top, right, bottom = box
    corners = [(right - 10 - width, bottom - 10 - height), (right - 10 - width, top + 10),
               (left + 10, top + 10), (left + 10, bottom - 10 - height)]

    def covered(corner: Tuple[float, float]) -> int:
        return sum(corner[0] - 6 <= x <= corner[0] + width + 6 and corner[1] - 6 <= y <= corner[1] + height + 6
                   for x, y in points)

    x0, y0 = min(corners, key=covered)  # the first corner (bottom right) wins ties
    draw.rectangle([x0, y0, x0 + width, y0 + height], fill="white", outline="#999999")
    for i, (name, color) in enumerate(rows):
        y = y0 + 4 + row_height * i + row_height / 2
        if color is None:
            draw.rectangle([x0 + 17, y - 5, x0 + 27, y + 5], outline="black", width=2)
        else:
            draw.line([(x0 + 8, y), (x0 + 36, y)], fill=color, width=2)
        put_text(draw, (x0 + 40, y), name, text_font, "lm")
