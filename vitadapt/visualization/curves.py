"""Accuracy vs cost figure of DVT's budgeted batch classification and anytime exits (the test job's dvt_curves.png)."""

import math
from typing import Dict, List, Tuple

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from .plots import SIZE, new_figure, save_figure

X_LABEL, Y_LABEL = "GMACs per image (mean)", "top-1 accuracy (%)"


def curve_points(curve: dict) -> Tuple[List[Tuple[float, float]], List[Tuple[float, float]]]:
    """(budgeted points sorted by cost, anytime exits) as (GMACs, top-1) pairs of a `budget_curve` dict; pairs
    that are not finite numbers are left out rather than breaking the axes."""
    def finite(pairs) -> List[Tuple[float, float]]:
        return [(float(x), float(y)) for x, y in pairs if math.isfinite(x) and math.isfinite(y)]

    anytime = curve.get("anytime", {})
    return (sorted(finite(zip(curve.get("expected_gflops", []), curve.get("top1_acc", [])))),
            finite(zip(anytime.get("gflops", []), anytime.get("top1_acc", []))))


def plot_budget_curves(curves: Dict[str, dict], path: str, title: str = "") -> Figure:
    """Draws each named `budget_curve` result as a line through its budgeted points (labelled with its name) and
    its anytime exits as open squares (unlabelled), into a PNG of SIZE pixels at `path`; returns the Figure."""
    series = {name: curve_points(curve) for name, curve in curves.items()}
    if not any(budgeted or anytime for budgeted, anytime in series.values()):
        raise ValueError("plot_budget_curves: no curve with any point to draw")
    fig, ax = new_figure(SIZE)
    for name, (budgeted, anytime) in series.items():
        line, = ax.plot([x for x, _ in budgeted], [y for _, y in budgeted], marker="o", markersize=3, label=name)
        ax.plot([x for x, _ in anytime], [y for _, y in anytime], linestyle="none", marker="s", markersize=9,
                markerfacecolor="none", markeredgewidth=2, color=line.get_color())
    handles = ax.get_legend_handles_labels()[0]
    exits = Line2D([], [], linestyle="none", marker="s", markersize=9, markerfacecolor="none", markeredgewidth=2,
                   color="black", label="exits (anytime)")
    ax.legend(handles=handles + [exits], loc="best")
    ax.set(xlabel=X_LABEL, ylabel=Y_LABEL, title=title)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
