"""Figures of finished runs and benchmarks, drawn with matplotlib into PNG files (its Figure API only: the Agg
canvas, no pyplot state, no GUI).

A run is an OUTPUT_DIR of tools/run_net.py: config.yaml, json_stats.log (the last `test_final` record is the run's
result), for DVT the dvt_curves.json of its test job, and, when TEST.SAVE_RESULTS_PATH was set, its per-image
results. What a run can be drawn with follows its model's class (MODEL.NAME in the model registry): the per-image
statistics it declares (`token_statistics`, as the test job reads them) and its exits. Every figure function
returns the Figure it saved, so that what was drawn can be read back.
"""

import json
import os
from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullLocator

from vitadapt.config import CfgNode, ConfigError, load_config
from vitadapt.errors import VitadaptError
from vitadapt.models import input_shape
from vitadapt.models.build import MODEL_REGISTRY
from vitadapt.utils.logging import JsonStatsError, last_record

SIZE = (800, 560)  # pixels of a one-panel figure
DPI = 100
# MODEL.NAME prefix -> the method's name on the figures' lines (labels only); any other model: its MODEL.NAME.
METHOD_LABELS = (("AdaViT", "AdaViT"), ("AViT", "A-ViT"), ("ATS", "ATS"), ("EViT", "EViT"), ("DVT", "DVT"))
REFERENCE = "reference"  # the line of the reference runs
DVT_CURVES_JSON = "dvt_curves.json"  # written by vitadapt.engine.exits


class MissingStats(VitadaptError, ValueError):
    """A run lacks what a figure needs; the message names the run and the file or key."""


def method_label(model_name: str) -> str:
    return next((label for prefix, label in METHOD_LABELS if model_name.startswith(prefix)), model_name)


def declared_statistics(model_name: str) -> Tuple[str, ...]:
    """The per-image statistics the class of MODEL.NAME declares in `token_statistics` (vitadapt.engine.evaluate.
    reports reads them from the model): "kept_tokens" where it changes which tokens exist, "token_depth" where
    tokens halt."""
    model_class = MODEL_REGISTRY.get(model_name)
    statistics = getattr(model_class, "token_statistics", ())
    if isinstance(statistics, property):  # forwarded from the frame backbone the model builds (XViT's methods)
        statistics = model_class.frame_model.token_statistics
    return tuple(statistics)


def is_multi_exit(model_name: str) -> bool:
    """Whether the class of MODEL.NAME is an early-exit cascade (DVT)."""
    return getattr(MODEL_REGISTRY.get(model_name), "num_exits", 1) > 1


def is_dense(model_name: str) -> bool:
    """Whether the model runs every token of every image: it declares no per-image token statistic and has one
    exit, so its runs are drawn as the reference."""
    return not declared_statistics(model_name) and not is_multi_exit(model_name)


@dataclass
class Run:
    """An OUTPUT_DIR of tools/run_net.py (see load_run)."""

    path: str
    label: str
    cfg: CfgNode
    reference: bool = False  # drawn as the dense reference

    @property
    def method(self) -> str:
        """The label of its line."""
        return method_label(self.cfg.MODEL.NAME)

    @property
    def statistics(self) -> Tuple[str, ...]:
        """The per-image statistics its model declares (see declared_statistics)."""
        return declared_statistics(self.cfg.MODEL.NAME)

    @property
    def has_curves(self) -> bool:
        """Whether its test job computed DVT's budgeted / anytime curves: an early-exit model with DVT.CURVES (a run
        that evaluates another's checkpoint at another budget point turns them off: they would be the same)."""
        return is_multi_exit(self.cfg.MODEL.NAME) and self.cfg.DVT.CURVES

    @property
    def video(self) -> bool:
        return len(input_shape(self.cfg)) == 5

    @property
    def name(self) -> str:
        return f"run {self.label!r} ({self.path})"

    def stat(self, key: str):
        """`key` of the last test_final record of json_stats.log (a log with a line that is not JSON: MissingStats
        naming the line, so that the run alone is left out)."""
        try:
            test = last_record(self.path, "test_final")
        except JsonStatsError as e:
            raise MissingStats(f"{self.name}: {e}") from None
        if test is None:
            raise MissingStats(f"{self.name}: json_stats.log has no test_final record (its test job has not run)")
        value = test.get(key)
        if value is None:
            why = "non-finite" if key in test.get("nonfinite", {}) else "absent"
            raise MissingStats(f"{self.name}: {key} of its test_final record in json_stats.log is {why}")
        return value

    def gmacs_and_top1(self) -> Tuple[float, float]:
        """(GMACs per image, top-1 %) of the test job; for videos GMACs per view and top-1 per video."""
        if self.video:
            return self.stat("gmacs_per_view_mean"), self.stat("video_top1_acc")
        return self.stat("gmacs_mean"), self.stat("top1_acc")

    def point(self, x: float, y: float) -> "Point":
        return Point(self.label, REFERENCE if self.reference else self.method, x, y)

    def dvt_curves(self) -> Dict[str, dict]:
        """The budgeted / anytime curves of the test job of a DVT run (DVT.CURVES)."""
        path = os.path.join(self.path, DVT_CURVES_JSON)
        if not os.path.isfile(path):
            raise MissingStats(f"{self.name}: no {DVT_CURVES_JSON} though DVT.CURVES is True (its test job has not "
                               "run, or stopped before writing them)")
        with open(path) as f:
            return json.load(f)

    def per_image(self, key: str) -> np.ndarray:
        """A per-image statistic the test job saved with its predictions (TEST.SAVE_RESULTS_PATH, a .json or torch
        file): "token_depth" [n] or "kept_tokens" [n, depth] (per view for videos, torch file only)."""
        if not self.cfg.TEST.SAVE_RESULTS_PATH:
            raise MissingStats(f"{self.name}: no per-image {key}: its test job saved no results (run it with "
                               "TEST.SAVE_RESULTS_PATH results.json, or results.pth for a video data set)")
        path = os.path.join(self.path, self.cfg.TEST.SAVE_RESULTS_PATH)
        if not os.path.isfile(path):
            raise MissingStats(f"{self.name}: TEST.SAVE_RESULTS_PATH {path} does not exist")
        if path.endswith(".csv"):
            raise MissingStats(f"{self.name}: {path} is a .csv file; per-image statistics are read from a .json or "
                               "torch results file")
        if path.endswith(".json"):
            with open(path) as f:
                rows = json.load(f)["rows"]
            values = [row[key] for row in rows] if rows and key in rows[0] else None
        else:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            values = saved[key].tolist() if key in saved else None
        if values is None:
            raise MissingStats(f"{self.name}: {path} has no per-image {key} (the .json rows of a video data set are "
                               "per video: save a torch results file, e.g. results.pth)")
        return np.asarray(values, dtype=np.float64)


def load_run(path: str, label: str = "", reference: bool = False) -> Run:
    """The run in `path`, labelled `label` (default: the folder's name); drawn as the reference when `reference`
    or when its model is dense (is_dense)."""
    for name in ("config.yaml", "json_stats.log"):
        if not os.path.isfile(os.path.join(path, name)):
            raise MissingStats(f"{path} is not a run of tools/run_net.py: it has no {name}")
    cfg = load_config(os.path.join(path, "config.yaml"))
    label = label or os.path.basename(os.path.normpath(path))
    return Run(path, label, cfg, reference or is_dense(cfg.MODEL.NAME))


# ---------------------------------------------------------------------------------------------------- benchmarks


def benchmark_name(cfg_file: str) -> str:
    """The name a benchmarked config answers to: the run's folder for a run's config.yaml, else the file name
    without .yaml (configs/demo/EViT_digits.yaml -> EViT_digits)."""
    if os.path.basename(cfg_file) == "config.yaml":
        return os.path.basename(os.path.dirname(os.path.abspath(cfg_file)))
    return os.path.splitext(os.path.basename(cfg_file))[0]


def read_benchmarks(paths: Sequence[str]) -> List[dict]:
    """The model entries of tools/benchmark.py reports, each with the "file" and "device" of its report."""
    entries = []
    for path in paths:
        if not os.path.isfile(path):
            raise MissingStats(f"benchmark file {path} does not exist")
        with open(path) as f:
            try:
                report = json.load(f)
            except json.JSONDecodeError as e:
                raise MissingStats(f"benchmark file {path}: not JSON ({e.msg})") from None
        if not isinstance(report, dict) or "models" not in report:
            raise MissingStats(f"benchmark file {path} has no 'models': not a report of tools/benchmark.py --out")
        entries += [{**model, "file": path, "device": report.get("device", "?")} for model in report["models"]]
    return entries


def match_benchmarks(runs: Sequence[Run], entries: Sequence[dict]) -> Tuple[Dict[str, dict], List[dict]]:
    """({run label: its benchmark entry}, entries of no run). An entry belongs to the run whose label or folder
    name is the entry's benchmark_name; a name that fits two runs, or a run that two entries fit, is an error."""
    matched: Dict[str, dict] = {}
    unmatched = []
    for entry in entries:
        name = benchmark_name(entry["cfg"])
        fits = [r for r in runs if name in (r.label, os.path.basename(os.path.normpath(r.path)))]
        if len(fits) > 1:
            raise ConfigError(f"benchmark of {entry['cfg']} ({entry['file']}) fits several runs: "
                              f"{', '.join(r.name for r in fits)}; give them distinct --labels")
        if not fits:
            unmatched.append(entry)
        elif fits[0].label in matched:
            raise ConfigError(f"{fits[0].name} has two benchmark results: {matched[fits[0].label]['file']} and "
                              f"{entry['file']}")
        else:
            matched[fits[0].label] = entry
    return matched, unmatched


def largest_common_batch(entries: Sequence[dict]) -> int:
    """The largest batch size every benchmark entry measured."""
    common = set.intersection(*({r["batch"] for r in e["results"]} for e in entries))
    if not common:
        raise MissingStats("the benchmark files share no batch size: " + "; ".join(
            f"{e['cfg']}: {[r['batch'] for r in e['results']]}" for e in entries))
    return max(common)


def throughput(entry: dict, batch: int) -> float:
    """Median images (clips) per second of a benchmark entry at `batch`."""
    for result in entry["results"]:
        if result["batch"] == batch:
            return result["images_per_s"]
    raise MissingStats(f"benchmark of {entry['cfg']} ({entry['file']}) has no batch {batch}: measured "
                       f"{[r['batch'] for r in entry['results']]}")


# ---------------------------------------------------------------------------------------------------- figures


def new_figure(size: Tuple[int, int] = SIZE, grid: Optional[Tuple[int, int]] = None):
    """(Figure of `size` pixels, its Axes; with `grid` (rows, cols) an array of Axes [rows, cols])."""
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, layout="constrained")
    return fig, fig.subplots(*grid, squeeze=False) if grid else fig.subplots()


def save_figure(fig: Figure, path: str) -> Figure:
    """Writes `fig` as a PNG, through a temporary file (a reader never sees half a file)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    fig.savefig(tmp, format="png", dpi=DPI)
    os.replace(tmp, path)
    return fig


class Point(NamedTuple):
    """One run on a trade-off figure: its line is its method's (REFERENCE for the dense reference)."""

    label: str
    method: str
    x: float
    y: float


def plot_tradeoff(points: Sequence[Point], path: str, xlabel: str, ylabel: str, title: str = "") -> Figure:
    """One line per method through its runs in order of x, each run marked and labelled; the reference runs as
    black stars. Lines carry the method as their label (the reference: REFERENCE)."""
    if not points:
        raise ValueError("plot_tradeoff: no point to draw")
    fig, ax = new_figure()
    methods = sorted({p.method for p in points} - {REFERENCE})
    for method in methods + ([REFERENCE] if any(p.method == REFERENCE for p in points) else []):
        group = sorted((p for p in points if p.method == method), key=lambda p: p.x)
        style = dict(color="black", marker="*", markersize=12, linestyle="--") if method == REFERENCE else \
            dict(marker="o", linestyle="-")
        ax.plot([p.x for p in group], [p.y for p in group], label=method, **style)
        for p in group:
            ax.annotate(p.label, (p.x, p.y), xytext=(5, 4), textcoords="offset points", fontsize=8)
    ax.margins(0.08)  # room for the labels of the outermost runs
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_token_depth(depths: np.ndarray, path: str, title: str = "") -> Figure:
    """Histogram of the per-image mean token depth (A-ViT: blocks a token runs through before it halts)."""
    fig, ax = new_figure()
    ax.hist(depths, bins=20, color="#1f77b4", edgecolor="white")
    ax.axvline(depths.mean(), color="black", linestyle="--", label=f"mean {depths.mean():.3f}")
    ax.set(xlabel="mean token depth of an image (blocks)", ylabel="images", title=title)
    ax.legend(loc="best")
    return save_figure(fig, path)


def plot_kept_tokens(counts: np.ndarray, path: str, title: str = "", unit: str = "image") -> Figure:
    """One histogram per block of the tokens (CLS included) each image kept there, counts [n, depth]; bars are
    one token wide. Panels are titled with the block index (0-based, as ATS.BLOCKS and EVIT.LOCATIONS)."""
    depth = counts.shape[1]
    cols = min(4, depth)
    rows = -(-depth // cols)
    fig, axes = new_figure((260 * cols, 200 * rows + 40), (rows, cols))
    for block, ax in enumerate(axes.flat):
        if block >= depth:
            ax.set_axis_off()
            continue
        values = counts[:, block].astype(np.int64)
        ax.hist(values, bins=np.arange(values.min() - 0.5, values.max() + 1.5), color="#2ca02c")
        ax.set_title(f"block {block}: mean {values.mean():.1f}", fontsize=9)
        for axis in (ax.xaxis, ax.yaxis):  # token and image counts
            axis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.tick_params(labelsize=8)
    for ax in axes[-1]:
        ax.set_xlabel(f"kept tokens per {unit}", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"{unit}s", fontsize=8)
    fig.suptitle(title)
    return save_figure(fig, path)


def plot_throughput(report: dict, path: str) -> Figure:
    """Images (clips) per second vs batch size, one line per model of a tools/benchmark.py report (the median,
    with the min-max range of the repeats shaded)."""
    fig, ax = new_figure()
    batches = sorted({r["batch"] for m in report["models"] for r in m["results"]})
    for model in report["models"]:
        results = sorted(model["results"], key=lambda r: r["batch"])
        x = [r["batch"] for r in results]
        line, = ax.plot(x, [r["images_per_s"] for r in results], marker="o", label=model["cfg"])
        ax.fill_between(x, [r["images_per_s_min"] for r in results], [r["images_per_s_max"] for r in results],
                        color=line.get_color(), alpha=0.15)
    unit = "clips" if report["models"][0].get("input") == "clip" else "images"
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set(xlabel="batch size", ylabel=f"{unit}/s", ylim=(0, None),
           title=f"throughput on {report['device']} ({report['threads']} threads)")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)
