#!/usr/bin/env python3
"""Trade-off figures of finished runs, as PNG files:

    python tools/plot.py RUN_DIR [RUN_DIR ...] [--labels L ...] [--reference RUN_DIR ...]
                         [--benchmark FILE.json ...] [--batch N] --out DIR

A RUN_DIR is an OUTPUT_DIR of tools/run_net.py: its config.yaml names the model, the last test_final record of its
json_stats.log gives its top-1 and GMACs. Runs are labelled by their folder name, or by --labels (one per RUN_DIR).
Which figures a run is in follows its model's class (MODEL.NAME in the model registry): the per-image statistics it
declares (`token_statistics`) and its exits. Written to DIR:

  accuracy_vs_gmacs.png       top-1 vs mean GMACs per image (videos: per view, and top-1 per video), one line per
                              method through its runs (its budgets; labelled by method, or by MODEL.NAME for a model
                              of no known method), the dense runs as black stars: a run whose model declares no
                              per-image token statistic and has one exit (VisionTransformer, T2TViT, TimeSformer,
                              XViT), or one given with --reference
  accuracy_vs_throughput.png  with --benchmark: top-1 vs the images (clips) per second tools/benchmark.py measured
                              at --batch (default: the largest batch size every benchmark measured)
  dvt_curves.png              the budgeted (lines) and anytime (squares) curves of the early-exit (DVT) runs whose
                              test job computed them (DVT.CURVES True)
  LABEL_token_depth.png       runs whose model declares token_depth (A-ViT): histogram of the per-image mean token
                              depth
  LABEL_kept_tokens.png       runs whose model declares kept_tokens (ATS, EViT, A-ViT, AdaViT): histograms of the
                              tokens each image kept, per block (EViT: one bar per block, its fixed count)

The histograms read the per-image values the test job saves with TEST.SAVE_RESULTS_PATH (a .json file, or a torch
file such as results.pth; videos: the torch file, per view). A benchmark result belongs to the run whose label or
folder name is the benchmarked config's name: the run's folder for RUN_DIR/config.yaml (benchmark a run with
`tools/benchmark.py --cfg RUN_DIR/config.yaml TEST.CHECKPOINT_FILE_PATH ...`), else the config file's name
without .yaml. A run that lacks what a figure needs is named on a "missing:" line and left out of that figure;
the exit code is then 1 (so is a run whose json_stats.log has a line that is not JSON); 2 for an error that stops
everything, such as a folder that is no run.
"""

import argparse
import os
import re
import sys
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from matplotlib.figure import Figure  # noqa: E402

from vitadapt.config import ConfigError  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.visualization.curves import plot_budget_curves  # noqa: E402
from vitadapt.visualization.plots import (MissingStats, load_run, largest_common_batch,  # noqa: E402
                                          match_benchmarks, plot_kept_tokens, plot_token_depth, plot_tradeoff,
                                          read_benchmarks, throughput)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="OUTPUT_DIR of a tools/run_net.py run")
    parser.add_argument("--out", required=True, help="folder the PNG files are written to")
    parser.add_argument("--labels", nargs="+", default=[], help="one label per RUN_DIR (default: folder names)")
    parser.add_argument("--reference", nargs="+", default=[], metavar="RUN_DIR",
                        help="runs drawn as the dense reference, besides those whose model reduces no token")
    parser.add_argument("--benchmark", nargs="+", default=[], metavar="FILE.json",
                        help="reports of tools/benchmark.py --out, for accuracy_vs_throughput.png")
    parser.add_argument("--batch", type=int, default=0, help="batch size of the throughput figure")
    return parser.parse_args(argv)


def load_runs(args) -> list:
    """The RUN_DIRs with their --labels, then the --reference runs not among them."""
    if args.labels and len(args.labels) != len(args.runs):
        raise ConfigError(f"--labels gives {len(args.labels)} label(s) for {len(args.runs)} RUN_DIR(s)")
    listed, references = ({os.path.realpath(p) for p in paths} for paths in (args.runs, args.reference))
    paths = list(args.runs) + [p for p in args.reference if os.path.realpath(p) not in listed]
    labels = list(args.labels) + [""] * (len(paths) - len(args.labels))
    runs = [load_run(p, label, os.path.realpath(p) in references) for p, label in zip(paths, labels)]
    files = [file_stem(r.label) for r in runs]
    for i, stem in enumerate(files):
        if stem in files[:i]:
            raise ConfigError(f"two runs are labelled {runs[i].label!r} ({runs[files.index(stem)].path} and "
                              f"{runs[i].path}); give distinct --labels")
    if len({r.video for r in runs}) > 1:
        raise ConfigError("image and video runs cannot share an accuracy axis: " + ", ".join(
            f"{r.label} ({'video' if r.video else 'images'})" for r in runs) + "; plot them separately")
    return runs


def file_stem(label: str) -> str:
    """A label as part of a file name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", label)


def gather(figure: str, runs, value, missing: list) -> list:
    """(run, value(run)) for every run that has what `figure` needs; the others are named in `missing`."""
    found = []
    for run in runs:
        try:
            found.append((run, value(run)))
        except MissingStats as e:
            missing.append(f"{figure}: {e}")
    return found


def draw(args) -> Tuple[Dict[str, Figure], List[str]]:
    """Writes every figure the runs allow: ({file name: the Figure written}, the runs left out of a figure, each
    named with the reason)."""
    runs = load_runs(args)
    unit = "view" if runs[0].video else "image"
    top1 = "top-1 accuracy per video (%)" if runs[0].video else "top-1 accuracy (%)"
    figures, missing = {}, []

    def write(name: str, plot, *plot_args, what: str = "", **kwargs) -> None:
        path = os.path.join(args.out, name)
        figures[name] = plot(*plot_args, path, **kwargs)
        print(f"wrote {path}{what}")

    found = gather("accuracy_vs_gmacs.png", runs, lambda r: r.gmacs_and_top1(), missing)
    if found:
        write("accuracy_vs_gmacs.png", plot_tradeoff, [r.point(*xy) for r, xy in found], what=f" ({len(found)} runs)",
              xlabel=f"GMACs per {unit} (mean)", ylabel=top1, title="accuracy vs cost")
    if args.benchmark:
        entries = read_benchmarks(args.benchmark)
        matched, unused = match_benchmarks(runs, entries)
        missing += [f"accuracy_vs_throughput.png: the benchmark of {e['cfg']} ({e['file']}) fits no run (labels: "
                    f"{', '.join(r.label for r in runs)})" for e in unused]

        def benchmark_of(run):
            if run.label not in matched:
                raise MissingStats(f"{run.name}: no benchmark of a config named {run.label!r} or after its folder")
            return matched[run.label]

        batch = args.batch or (largest_common_batch(list(matched.values())) if matched else 0)
        found = gather("accuracy_vs_throughput.png", runs,
                       lambda r: (throughput(benchmark_of(r), batch), r.gmacs_and_top1()[1]), missing)
        if found:
            devices = ", ".join(sorted({matched[r.label]["device"] for r, _ in found}))
            write("accuracy_vs_throughput.png", plot_tradeoff, [r.point(*xy) for r, xy in found],
                  what=f" ({len(found)} runs, batch {batch})", xlabel=f"{unit}s/s at batch {batch} ({devices})",
                  ylabel=top1, title="accuracy vs measured throughput")
    found = gather("dvt_curves.png", [r for r in runs if r.has_curves], lambda r: r.dvt_curves(), missing)
    if found:
        curves = {f"{r.label}: {name}": curve for r, run_curves in found for name, curve in run_curves.items()}
        write("dvt_curves.png", plot_budget_curves, curves, what=f" ({len(found)} runs)",
              title="DVT: budgeted batch (lines) and anytime (squares)")
    for run, depths in gather("token-depth histogram", [r for r in runs if "token_depth" in r.statistics],
                              lambda r: r.per_image("token_depth"), missing):
        write(f"{file_stem(run.label)}_token_depth.png", plot_token_depth, depths, what=f" ({len(depths)} {unit}s)",
              title=f"{run.label}: token depth")
    for run, counts in gather("kept-token histogram", [r for r in runs if "kept_tokens" in r.statistics],
                              lambda r: r.per_image("kept_tokens"), missing):
        write(f"{file_stem(run.label)}_kept_tokens.png", plot_kept_tokens, counts, what=f" ({len(counts)} {unit}s)",
              title=f"{run.label}: kept tokens per block", unit=unit)
    for line in missing:
        print(f"missing: {line}", file=sys.stderr)
    return figures, missing


def main(argv=None) -> int:
    args = parse(argv)
    try:
        missing = draw(args)[1]
    except VitadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
