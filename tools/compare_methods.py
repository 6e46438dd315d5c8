#!/usr/bin/env python3
"""Every method against the dense model under one protocol, on a CPU: one table and the trade-off plots.

    python tools/compare_methods.py [--plan configs/compare/digits.yaml] [--out DIR] [--epochs N]
                                    [--finetune-epochs N] [--runs NAME,...] [--quick]

The plan (a YAML file, configs/compare/digits.yaml by default, whose comments describe it) lists the runs: the dense
reference and every method at a few budgets, with their configs and overrides. Every run trains and tests with
tools/run_net.py in its own OUTPUT_DIR, DIR/<name>, with the plan's seed and number of epochs, on the same data and
test split; then tools/benchmark.py measures each trained model side by side with the reference (interleaved, on
images of the test split) at the plan's batch sizes, and tools/plot.py draws the runs. Written to DIR:

  comparison.json, comparison.md  per run: val top-1 and GMACs per image (the run's own `test_final` record in
                                  DIR/<name>/json_stats.log), images/s at each batch size and the speedup over the
                                  reference measured in the same benchmark (DIR/benchmark/<name>.json; the
                                  reference's own images/s: measured alone)
  plots/                          tools/plot.py: accuracy_vs_gmacs.png and accuracy_vs_throughput.png (the frontier;
                                  throughput at the largest batch, DIR/benchmark/throughput.json), dvt_curves.png,
                                  per-run histograms of kept tokens and token depth (DIR/<name>/results.json)
  logs/<name>.log                 the console output of the run's tools/run_net.py and tools/benchmark.py

Running the command again reuses every finished run (a `test_final` record, and the config it would run now) and
every benchmark newer than the runs it measured; an interrupted run resumes from its last checkpoint. A run that
starts from another's checkpoint (`from`, `test_of`) is reused or resumed only when it started after that checkpoint
was written: when the other run was trained again, its folder is deleted and it runs again (the progress line says
why). A run that fails (a json_stats.log that is not JSON included) is reported by name, the runs that need it are
skipped, the others go on, and the table marks them; the exit status is then 1. --runs keeps the runs whose names
match (shell patterns, comma-separated), with the runs they start from and the reference. --quick: 1 epoch
everywhere, no warm-up, short benchmarks, in runs/compare_<plan>_quick.
"""

import argparse
import fnmatch
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from vitadapt.config import CfgNode, config_differences, load_config  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.utils.logging import last_record  # noqa: E402

RUN_NET = os.path.join(REPO, "tools", "run_net.py")
BENCHMARK = os.path.join(REPO, "tools", "benchmark.py")
PLOT = os.path.join(REPO, "tools", "plot.py")
DEFAULT_PLAN = os.path.join(REPO, "configs", "compare", "digits.yaml")
# Keys the protocol sets for every run; a run's overrides may not change them.
PROTOCOL_KEYS = ("OUTPUT_DIR", "RNG_SEED", "SOLVER.MAX_EPOCH", "TRAIN.ENABLE", "TRAIN.CHECKPOINT_FILE_PATH",
                 "TEST.CHECKPOINT_FILE_PATH", "TEST.SAVE_RESULTS_PATH")
QUICK_BENCHMARK = ["BENCHMARK.WARMUP_ITERS", "1", "BENCHMARK.NUM_REPEATS", "1", "BENCHMARK.ITERS_PER_REPEAT", "1"]
PLAN_KEYS = {"reference", "seed", "epochs", "finetune_epochs", "finetune_overrides", "benchmark_batch_sizes", "runs"}
RUN_KEYS = {"name", "method", "budget", "config", "overrides", "from", "test_of"}
RESERVED_NAMES = ("benchmark", "logs", "plots")  # folders of DIR besides the runs'
TRACEBACK_LINES = 3  # reported of a failure without an `error:` line: the exception and where it was raised


class PlanError(VitadaptError):
    """The plan file is malformed; the message names the file, the run and the key."""


class RunFailed(VitadaptError):
    """One run (or its benchmark) failed; the comparison goes on without it."""


def command_text(value) -> str:
    """A YAML value as tools/run_net.py reads it on its command line."""
    return value if isinstance(value, str) else repr(value)


@dataclass
class Run:
    name: str
    method: str
    budget: str
    config: str
    overrides: List[str] = field(default_factory=list)  # KEY VALUE ...
    start_from: str = ""  # fine-tune this run's final checkpoint
    test_of: str = ""  # evaluate this run's final checkpoint, no training

    @property
    def parent(self) -> str:
        return self.start_from or self.test_of


@dataclass
class Plan:
    path: str
    reference: str
    seed: int
    epochs: int
    finetune_epochs: int
    finetune_overrides: List[str]
    batch_sizes: List[int]
    runs: List[Run]


def load_plan(path: str) -> Plan:
    """The plan file, checked: known keys, unique folder-safe names, dependencies on earlier runs, configs found."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise PlanError(f"cannot read the plan {path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise PlanError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list) or not data["runs"]:
        raise PlanError(f"{path}: expected a mapping with a non-empty list `runs`")
    unknown = sorted(set(data) - PLAN_KEYS)
    if unknown:
        raise PlanError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(sorted(PLAN_KEYS))}")
    for key in ("epochs", "finetune_epochs", "seed"):
        if not isinstance(data.get(key), int) or data[key] < (0 if key == "seed" else 1):
            raise PlanError(f"{path}: `{key}` must be an integer >= {0 if key == 'seed' else 1}, got {data.get(key)!r}")
    batch_sizes = data.get("benchmark_batch_sizes")
    if not (isinstance(batch_sizes, list) and batch_sizes and all(isinstance(b, int) and b > 0 for b in batch_sizes)):
        raise PlanError(f"{path}: `benchmark_batch_sizes` must be a list of positive integers, got {batch_sizes!r}")
    runs: List[Run] = []
    for i, entry in enumerate(data["runs"]):
        runs.append(parse_run(entry, runs, f"{path}: run {i + 1}"))
    reference = data.get("reference")
    if reference not in [r.name for r in runs] or next(r for r in runs if r.name == reference).parent:
        raise PlanError(f"{path}: `reference: {reference}` must name a run that trains from scratch")
    return Plan(path, reference, data["seed"], data["epochs"], data["finetune_epochs"],
                overrides_list(data.get("finetune_overrides") or {}, f"{path}: finetune_overrides"), batch_sizes, runs)


def parse_run(entry, earlier: List[Run], where: str) -> Run:
    """One entry of the plan's `runs`, after the `earlier` ones."""
    if not isinstance(entry, dict):
        raise PlanError(f"{where}: expected a mapping, got {entry!r}")
    where += f" ({entry['name']})" if "name" in entry else ""
    unknown = sorted(set(entry) - RUN_KEYS)
    missing = sorted({"name", "method", "budget", "config"} - set(entry))
    if unknown or missing:
        raise PlanError(f"{where}: " + "; ".join(([f"unknown key(s) {', '.join(unknown)}"] if unknown else []) +
                                                 ([f"missing key(s) {', '.join(missing)}"] if missing else [])))
    name = str(entry["name"])
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", name):
        raise PlanError(f"{where}: name {name!r} must be a folder name (letters, digits, _ . -)")
    if name in RESERVED_NAMES:
        raise PlanError(f"{where}: the name {name} is taken by a folder of the output ({', '.join(RESERVED_NAMES)})")
    if any(r.name == name for r in earlier):
        raise PlanError(f"{where}: the name {name} is used twice")
    if "from" in entry and "test_of" in entry:
        raise PlanError(f"{where}: give `from` (fine-tune) or `test_of` (evaluate), not both")
    key = "from" if "from" in entry else "test_of"
    parent = str(entry.get(key, ""))
    if parent and not any(r.name == parent for r in earlier):
        raise PlanError(f"{where}: `{key}: {parent}` must name an earlier run")
    config = os.path.join(REPO, entry["config"])
    if not os.path.isfile(config):
        raise PlanError(f"{where}: config {entry['config']} not found (paths are relative to the repository root)")
    return Run(name, str(entry["method"]), str(entry["budget"]), config,
               overrides_list(entry.get("overrides") or {}, where),
               start_from=parent if key == "from" else "", test_of=parent if key == "test_of" else "")


def overrides_list(overrides, where: str) -> List[str]:
    if not isinstance(overrides, dict):
        raise PlanError(f"{where}: overrides must be a mapping KEY: VALUE, got {overrides!r}")
    taken = sorted(k for k in overrides if k in PROTOCOL_KEYS)
    if taken:
        raise PlanError(f"{where}: {', '.join(taken)} is set by the protocol (seed, epochs, checkpoints, OUTPUT_DIR), "
                        "not by a run's overrides")
    return [text for key, value in overrides.items() for text in (str(key), command_text(value))]


def select(plan: Plan, patterns: str) -> List[Run]:
    """The runs matching the comma-separated shell patterns, with the runs they need and the reference, in plan order."""
    if not patterns:
        return list(plan.runs)
    by_name = {r.name: r for r in plan.runs}
    wanted = {plan.reference}
    for pattern in patterns.split(","):
        matched = fnmatch.filter(by_name, pattern.strip())
        if not matched:
            raise PlanError(f"--runs: {pattern.strip()!r} matches no run of {plan.path} ({', '.join(by_name)})")
        wanted.update(matched)
    for run in reversed(plan.runs):  # a parent comes before its children
        if run.name in wanted and run.parent:
            wanted.add(run.parent)
    return [r for r in plan.runs if r.name in wanted]


# ---------------------------------------------------------------- training and testing, one run at a time
@dataclass
class Result:
    run: Run
    status: str = "ok"  # ok | failed | skipped
    error: str = ""
    record: Optional[dict] = None  # the run's test_final
    opts: List[str] = field(default_factory=list)  # its tools/run_net.py overrides
    seconds: Optional[float] = None  # training + test time; None when reused
    benchmark: Optional[dict] = None  # tools/benchmark.py's report (the reference: alone; the others: side by side)
    benchmark_path: str = ""


class Comparison:
    def __init__(self, plan: Plan, out: str, epochs: int, finetune_epochs: int, quick: bool):
        self.plan, self.out, self.quick = plan, os.path.abspath(out), quick
        self.epochs, self.finetune_epochs = epochs, finetune_epochs
        self.results: Dict[str, Result] = {}

    def run_dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    def opts(self, run: Run, parent_checkpoint: str = "") -> List[str]:
        """KEY VALUE overrides of tools/run_net.py for `run`: its own, then the protocol's."""
        # Per-image results (kept tokens, token depth) for the histograms of tools/plot.py.
        opts = list(run.overrides) + ["OUTPUT_DIR", self.run_dir(run.name), "RNG_SEED", str(self.plan.seed),
                                      "TEST.SAVE_RESULTS_PATH", "results.json"]
        if run.test_of:
            return opts + ["TRAIN.ENABLE", "False", "TEST.CHECKPOINT_FILE_PATH", parent_checkpoint]
        if run.start_from:
            return (list(self.plan.finetune_overrides) + opts +
                    ["SOLVER.MAX_EPOCH", str(self.finetune_epochs), "TRAIN.CHECKPOINT_FILE_PATH", parent_checkpoint])
        # --quick: a one-epoch run has no room for the demos' warm-up epochs
        return opts + ["SOLVER.MAX_EPOCH", str(self.epochs)] + (["SOLVER.WARMUP_EPOCHS", "0.0"] if self.quick else [])

    def training(self, run: Run) -> str:
        if run.test_of:
            return f"checkpoint of {run.test_of}"
        if run.start_from:
            return f"fine-tuned from {run.start_from}, {epochs(self.finetune_epochs)}"
        return f"from scratch, {epochs(self.epochs)}"

    def log(self, name: str) -> str:
        return os.path.join(self.out, "logs", f"{name}.log")

    def execute(self, run: Run) -> Result:
        """Trains and tests `run` (or reuses it when finished with the same config, after its parent's checkpoint);
        raises VitadaptError (RunFailed, a json_stats.log that is not JSON)."""
        parent = self.results[run.parent].record["checkpoint"] if run.parent else ""
        opts = self.opts(run, parent)
        wanted = load_config(run.config, opts)
        folder = self.run_dir(run.name)
        if parent and started_before(folder, parent):
            # The parent was trained again at the same path: this run (finished or not) used its old weights.
            print(f"  {run.parent} was trained again after this run started ({parent} is newer than "
                  f"{folder}/config.yaml): deleting the run and running it again", flush=True)
            shutil.rmtree(folder)
        record = last_record(folder, "test_final")
        if record is not None:
            check_same_config(folder, wanted)
            print(f"  reusing the finished run in {folder}", flush=True)
            return Result(run, record=record, opts=opts)
        start = time.perf_counter()
        call(self.log(run.name), [RUN_NET, "--cfg", run.config] + opts, "tools/run_net.py")
        seconds = time.perf_counter() - start
        record = last_record(folder, "test_final")
        if record is None:
            raise RunFailed(f"tools/run_net.py left no test_final record in {folder}/json_stats.log")
        return Result(run, record=record, opts=opts, seconds=seconds)

    def train_and_test(self, runs: List[Run]) -> None:
        # Every config is loaded before the first training, so that a mistake shows in seconds, not minutes (the
        # parent's checkpoint, not yet known, is a placeholder: its path is checked when the run starts).
        for run in runs:
            try:
                load_config(run.config, self.opts(run, f"{run.parent}.pyth" if run.parent else ""))
            except VitadaptError as e:
                self.results[run.name] = Result(run, "failed", f"config: {e}")
        for i, run in enumerate(runs):
            print(f"[{i + 1}/{len(runs)}] {run.name} ({run.method}, {run.budget}; {self.training(run)})", flush=True)
            if run.name in self.results:
                print(f"  FAILED: {self.results[run.name].error}", flush=True)
                continue
            if run.parent and self.results[run.parent].status != "ok":
                self.results[run.name] = Result(run, "skipped", f"needs {run.parent}, which did not finish")
                print(f"  skipped: {self.results[run.name].error}", flush=True)
                continue
            try:
                result = self.execute(run)
            except VitadaptError as e:
                result = Result(run, "failed", str(e))
                print(f"  FAILED: {e}", flush=True)
            else:
                took = "" if result.seconds is None else f" in {result.seconds:.0f} s"
                print(f"  val top-1 {result.record['top1_acc']:.2f}%, {result.record['gmacs_mean']:.4f} GMACs per image"
                      f"{took}", flush=True)
            self.results[run.name] = result

    # ------------------------------------------------------------ benchmarks
    def benchmark_all(self, runs: List[Run]) -> None:
        reference = self.results[self.plan.reference]
        for run in runs:
            result = self.results[run.name]
            if result.status != "ok":
                continue
            if run.name != self.plan.reference and reference.status != "ok":
                self.fail(result, f"benchmark: needs the reference {self.plan.reference}, which did not finish")
                continue
            print(f"benchmark {run.name}" + ("" if run.name == self.plan.reference else
                                              f" against {self.plan.reference}"), flush=True)
            try:
                self.benchmark(result, reference)
            except VitadaptError as e:
                self.fail(result, f"benchmark: {e}")
                print(f"  FAILED: {result.error}", flush=True)

    def fail(self, result: Result, error: str) -> None:
        result.status, result.error = "failed", error

    def benchmark(self, result: Result, reference: Result) -> None:
        """tools/benchmark.py on the run's test checkpoint (side by side with the reference's), or its earlier report
        when that is newer than the runs it measured."""
        folder = os.path.join(self.out, "benchmark")
        name = result.run.name
        out = os.path.join(folder, f"{name}.json")
        measured = [result] if result is reference else [reference, result]
        sources = [os.path.join(self.run_dir(r.run.name), "json_stats.log") for r in measured]
        if not (is_newer(out, sources) and measured_batches(out) == self.plan.batch_sizes):
            os.makedirs(folder, exist_ok=True)
            configs = [self.benchmark_config(r, os.path.join(folder, f"{r.run.name}.yaml")) for r in measured]
            args = [BENCHMARK, "--cfg", configs[0]] + (["--compare", configs[1]] if len(configs) == 2 else [])
            args += ["--data", "--out", out, "BENCHMARK.BATCH_SIZES", repr(self.plan.batch_sizes)]
            call(self.log(name), args + (QUICK_BENCHMARK if self.quick else []), "tools/benchmark.py")
        else:
            print(f"  reusing {out}", flush=True)
        with open(out) as f:
            result.benchmark = json.load(f)
        result.benchmark_path = out
        rates = {r["batch"]: r["images_per_s"] for r in result.benchmark["models"][-1]["results"]}
        print("  img/s " + ", ".join(f"batch {b}: {v:.0f}" for b, v in rates.items()), flush=True)

    def benchmark_config(self, result: Result, path: str) -> str:
        """The run's config with its tested checkpoint, as a file for tools/benchmark.py."""
        record = result.record
        opts = result.opts + ["TEST.CHECKPOINT_FILE_PATH", record["checkpoint"], "TRAIN.CHECKPOINT_FILE_PATH", ""]
        if "thresholds" in record:  # an early-exit model (DVT): the thresholds the test job evaluated
            opts += ["DVT.BUDGET_POINT", "0", "DVT.BUDGET_GMACS", "0.0", "DVT.THRESHOLDS", repr(record["thresholds"])]
        cfg = load_config(result.run.config, opts)
        with open(path, "w") as f:
            f.write(cfg.dump())
        return path

    # ------------------------------------------------------------ the table
    def rows(self, runs: List[Run]) -> List[dict]:
        reference = self.results[self.plan.reference]
        rows = []
        for run in runs:
            r = self.results[run.name]
            row = {"name": run.name, "method": run.method, "budget": run.budget, "training": self.training(run),
                   "status": r.status, "error": r.error or None, "output_dir": self.run_dir(run.name),
                   "seconds": r.seconds, "top1_acc": None, "gmacs_mean": None, "gmacs_ratio": None,
                   "images_per_s": None, "speedup": None, "benchmark": r.benchmark_path or None}
            if r.record is not None:
                row.update(top1_acc=r.record["top1_acc"], gmacs_mean=r.record["gmacs_mean"])
                if reference.record is not None:
                    row["gmacs_ratio"] = reference.record["gmacs_mean"] / r.record["gmacs_mean"]
            if r.benchmark is not None:
                measured = r.benchmark["models"][-1]["results"]
                row["images_per_s"] = {str(m["batch"]): m["images_per_s"] for m in measured}
                row["speedup"] = (r.benchmark["compare"]["speedup"] if r is not reference
                                  else {str(m["batch"]): 1.0 for m in measured})
            rows.append(row)
        return rows

    def plot(self, runs: List[Run]) -> bool:
        """tools/plot.py on the finished runs and their throughput (DIR/plots); False when it failed or left a
        run out of a figure (named in its log)."""
        tested = [run.name for run in runs if self.results[run.name].record is not None]
        measured = [self.results[name].benchmark for name in tested if self.results[name].benchmark is not None]
        if not tested:
            print("plot: no run finished", flush=True)
            return False
        args = [PLOT] + [self.run_dir(name) for name in tested] + ["--out", os.path.join(self.out, "plots")]
        if measured:
            # Each run's own entry (the reference's measured alone, the others' side by side with it), one report.
            path = os.path.join(self.out, "benchmark", "throughput.json")
            with open(path, "w") as f:
                json.dump({**{k: v for k, v in measured[0].items() if k not in ("models", "compare")},
                           "models": [report["models"][-1] for report in measured]}, f, indent=2)
            args += ["--benchmark", path, "--batch", str(max(self.plan.batch_sizes))]
        print(f"plots of {len(tested)} runs", flush=True)
        try:
            call(self.log("plot"), args, "tools/plot.py")
        except RunFailed as e:
            print(f"  plot incomplete: {e}", flush=True)
            return False
        return True

    def protocol(self) -> dict:
        reference = self.results[self.plan.reference].benchmark or {}
        return {"plan": os.path.relpath(self.plan.path),
                "reference": self.plan.reference, "seed": self.plan.seed, "epochs": self.epochs,
                "finetune_epochs": self.finetune_epochs, "batch_sizes": self.plan.batch_sizes, "quick": self.quick,
                **{k: reference[k] for k in ("device", "threads", "cpu", "torch") if k in reference}}


def epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def call(log: str, args: List[str], what: str) -> None:
    """Runs a tool in a subprocess, its output appended to `log`; raises RunFailed with the last `error:` line it
    wrote (the tools' message for bad input), else the last lines it wrote (a traceback's exception). Only this
    call's output is read: the log keeps the earlier attempts."""
    os.makedirs(os.path.dirname(log), exist_ok=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join([os.path.basename(sys.executable)] + args)}\n")
        f.flush()
        start = os.fstat(f.fileno()).st_size  # what the tool writes comes after
        rc = subprocess.run([sys.executable] + args, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc:
        with open(log, "rb") as f:
            f.seek(start)
            lines = [line.strip() for line in f.read().decode(errors="replace").splitlines()
                     if line.strip(" ^~")]  # not the markers under a traceback's code
        errors = [line for line in lines if line.startswith("error:")]
        said = errors[-1] if errors else " | ".join(lines[-TRACEBACK_LINES:]) or "(no output)"
        raise RunFailed(f"{what} exited with status {rc}: {said} (log: {log})")


def check_same_config(folder: str, wanted) -> None:
    """A finished run is reused only for the config it would run now."""
    try:
        with open(os.path.join(folder, "config.yaml")) as f:
            saved = CfgNode.load_cfg(f)
    except OSError as e:
        raise RunFailed(f"{folder} holds a finished run but its config.yaml cannot be read ({e.strerror or e}); "
                        "delete the folder to run it again, or choose another --out") from None
    changed = config_differences(saved, wanted)
    if changed:
        raise RunFailed(f"{folder} holds a finished run with another config ({', '.join(changed)}); delete the "
                        "folder to run it again, or choose another --out")


def is_newer(path: str, sources: List[str]) -> bool:
    return os.path.isfile(path) and all(os.path.getmtime(path) >= os.path.getmtime(s) for s in sources)


def started_before(folder: str, checkpoint: str) -> bool:
    """Whether the run in `folder` started (wrote its config.yaml) before `checkpoint` was last written."""
    return (os.path.isdir(folder) and os.path.isfile(checkpoint)
            and not is_newer(os.path.join(folder, "config.yaml"), [checkpoint]))


def measured_batches(report_path: str) -> List[int]:
    with open(report_path) as f:
        return [r["batch"] for r in json.load(f)["models"][-1]["results"]]


def write_table(rows: List[dict], protocol: dict, out: str) -> None:
    with open(os.path.join(out, "comparison.json"), "w") as f:
        json.dump({"protocol": protocol, "rows": rows}, f, indent=2)
    batches = [str(b) for b in protocol["batch_sizes"]]

    def number(value, fmt, unit=""):
        return "-" if value is None else format(value, fmt) + unit

    lines = [f"Plan {protocol['plan']}: {epochs(protocol['epochs'])} from scratch, {epochs(protocol['finetune_epochs'])} "
             f"to fine-tune, seed {protocol['seed']}; images/s on {protocol.get('device', '?')} ({protocol.get('cpu', '?')}, "
             f"{protocol.get('threads', '?')} threads), speedups measured side by side with {protocol['reference']}.", "",
             "| method | budget | val top-1 (%) | GMACs / image | GMACs, dense / method | "
             + " | ".join(f"img/s (batch {b})" for b in batches) + " | "
             + " | ".join(f"speedup (batch {b})" for b in batches) + " | training |",
             "|---|---|---:|---:|---:|" + "---:|" * (2 * len(batches)) + "---|"]
    for row in rows:
        mark = "" if row["status"] == "ok" else f" **{row['status']}**"
        rates, speedups = row["images_per_s"] or {}, row["speedup"] or {}
        lines.append(f"| {row['method']}{mark} | {row['budget']} | {number(row['top1_acc'], '.1f')} | "
                     f"{number(row['gmacs_mean'], '.4f')} | {number(row['gmacs_ratio'], '.2f', 'x')} | "
                     + " | ".join(number(rates.get(b), ".0f") for b in batches) + " | "
                     + " | ".join(number(speedups.get(b), ".2f", "x") for b in batches) + f" | {row['training']} |")
    failed = [row for row in rows if row["status"] != "ok"]
    if failed:
        lines += [""] + [f"- **{row['status']}** {row['name']}: {row['error']}" for row in failed]
    with open(os.path.join(out, "comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", default=DEFAULT_PLAN, help="the runs to compare (YAML; default: %(default)s)")
    parser.add_argument("--out", default="", help="output folder (default: runs/compare_<plan name>[_quick])")
    parser.add_argument("--epochs", type=int, default=None,
                        help="epochs of the runs trained from scratch (default: the plan's `epochs`; at least the "
                             "configs' SOLVER.WARMUP_EPOCHS, which --quick sets to 0)")
    parser.add_argument("--finetune-epochs", type=int, default=None, help="epochs of the runs that fine-tune another "
                                                                          "(default: the plan's `finetune_epochs`)")
    parser.add_argument("--runs", default="", help="comma-separated shell patterns of run names (default: all)")
    parser.add_argument("--quick", action="store_true", help="1 epoch everywhere and short benchmarks (a smoke test)")
    args = parser.parse_args(argv)
    for key in ("epochs", "finetune_epochs"):
        if getattr(args, key) is not None and getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    try:
        plan = load_plan(args.plan)
        runs = select(plan, args.runs)
    except VitadaptError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    scratch_epochs = args.epochs or (1 if args.quick else plan.epochs)
    finetune_epochs = args.finetune_epochs or (1 if args.quick else plan.finetune_epochs)
    stem = os.path.splitext(os.path.basename(plan.path))[0]
    out = args.out or os.path.join("runs", f"compare_{stem}" + ("_quick" if args.quick else ""))
    comparison = Comparison(plan, out, scratch_epochs, finetune_epochs, args.quick)
    os.makedirs(comparison.out, exist_ok=True)
    start = time.perf_counter()
    comparison.train_and_test(runs)
    comparison.benchmark_all(runs)
    rows = comparison.rows(runs)
    protocol = comparison.protocol()
    write_table(rows, protocol, comparison.out)
    plotted = comparison.plot(runs)
    with open(os.path.join(comparison.out, "comparison.md")) as f:
        print(f.read())
    failed = [row["name"] for row in rows if row["status"] != "ok"]
    print(f"written to {os.path.join(out, 'comparison.md')}, comparison.json and plots/ in "
          f"{time.perf_counter() - start:.0f} s" + (f"; not finished: {', '.join(failed)}" if failed else ""))
    return 1 if failed or not plotted else 0


if __name__ == "__main__":
    sys.exit(main())
