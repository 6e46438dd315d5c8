"""tools/compare_methods.py: the plan, and the comparison end to end (1 epoch, subprocesses, the digits data)."""

import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers_e2e import REPO, load_tool, read_stats

TOOL = REPO / "tools" / "compare_methods.py"
PLAN = REPO / "configs" / "compare" / "digits.yaml"


@pytest.fixture(scope="module")
def compare():
    return load_tool("compare_methods")


def last_test_final(output_dir) -> dict:
    return [r for r in read_stats(output_dir) if r["_type"] == "test_final"][-1]


def test_every_run_of_the_shipped_plan_is_a_valid_and_distinct_config(compare):
    plan = compare.load_plan(str(PLAN))
    assert plan.reference == "dense" and len(plan.runs) >= 11
    comparison = compare.Comparison(plan, "out", plan.epochs, plan.finetune_epochs, quick=False)
    configs = {}
    for run in plan.runs:
        cfg = compare.load_config(run.config, comparison.opts(run, "parent.pyth" if run.parent else ""))
        configs[run.name] = cfg
        assert cfg.RNG_SEED == plan.seed and cfg.OUTPUT_DIR == os.path.abspath(os.path.join("out", run.name))
        assert cfg.TRAIN.ENABLE == (not run.test_of)
        if run.test_of:
            assert cfg.TEST.CHECKPOINT_FILE_PATH == "parent.pyth"
        else:
            assert cfg.SOLVER.MAX_EPOCH == (plan.finetune_epochs if run.start_from else plan.epochs)
            assert cfg.TRAIN.CHECKPOINT_FILE_PATH == ("parent.pyth" if run.start_from else "")
    # Every method is there at two or three budgets, and no two runs are the same model.
    methods = [run.method for run in plan.runs if run.name != plan.reference]
    assert {m: methods.count(m) for m in methods} == {"ATS": 2, "EViT": 2, "A-ViT": 2, "AdaViT": 2, "DVT": 3}
    # DVT's budgeted / anytime curves are computed once per trained checkpoint: the runs that evaluate it at other
    # budget points turn them off (tools/plot.py then draws them once).
    curves = [run.test_of or run.name for run in plan.runs
              if configs[run.name].MODEL.NAME == "DVT" and configs[run.name].DVT.CURVES]
    assert curves == ["dvt_point10"]
    names = list(configs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            changed = compare.config_differences(configs[a], configs[b])
            assert [k for k in changed if k not in ("OUTPUT_DIR", "TEST.CHECKPOINT_FILE_PATH")], (a, b)


@pytest.mark.parametrize("edit, message", [
    (lambda p: p["runs"].append({"name": "x", "method": "A", "budget": "b", "config": "configs/demo/DeiT_Ti_digits.yaml",
                                 "from": "nope"}), "`from: nope` must name an earlier run"),
    (lambda p: p["runs"][0].update(overrides={"SOLVER.MAX_EPOCH": 3}), "SOLVER.MAX_EPOCH is set by the protocol"),
    (lambda p: p["runs"][1].update(name="dense"), "the name dense is used twice"),
    (lambda p: p["runs"][1].update(name="plots"), "the name plots is taken by a folder of the output"),
    (lambda p: p["runs"][0].update(config="configs/demo/nope.yaml"), "config configs/demo/nope.yaml not found"),
    (lambda p: p.update(reference="ats_nocap"), "`reference: ats_nocap` must name a run that trains from scratch"),
])
def test_plan_mistakes_are_named(compare, tmp_path, edit, message):
    plan = yaml.safe_load(PLAN.read_text())
    edit(plan)
    path = tmp_path / "plan.yaml"
    path.write_text(yaml.safe_dump(plan))
    with pytest.raises(compare.PlanError, match=re.escape(message)):
        compare.load_plan(str(path))


def finished_run(comparison, run, top1: float, parent_checkpoint: str = "", extra_line: str = "") -> Path:
    """The folder of `run` as tools/run_net.py leaves it when finished: config.yaml (the config the comparison would
    run), json_stats.log ending with a test_final record (then `extra_line`), a checkpoint."""
    folder = Path(comparison.run_dir(run.name))
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "checkpoints" / "checkpoint_epoch_00001.pyth").write_bytes(b"weights")
    (folder / "config.yaml").write_text(compare_tool().load_config(run.config, comparison.opts(run, parent_checkpoint))
                                        .dump())
    record = {"_type": "test_final", "top1_acc": top1, "gmacs_mean": 1.0, "checkpoint": str(folder / "checkpoints")}
    (folder / "json_stats.log").write_text(json.dumps(record) + "\n" + extra_line)
    return folder


def compare_tool():
    return load_tool("compare_methods")


def shipped_plan_comparison(compare, out):
    plan = compare.load_plan(str(PLAN))
    return plan, compare.Comparison(plan, str(out), 1, 1, quick=True)


def test_a_run_with_a_corrupt_log_fails_alone(compare, tmp_path, monkeypatch, capsys):
    """A finished run whose json_stats.log ends with a line cut short fails, named; the run that starts from it is
    skipped; another finished run is reused; nothing trains."""
    plan, comparison = shipped_plan_comparison(compare, tmp_path / "out")
    runs = compare.select(plan, "evit_keep0.7,avit_ponder5e-3")
    assert [r.name for r in runs] == ["dense", "evit_keep0.7", "avit_ponder5e-3"]
    dense = finished_run(comparison, runs[0], 80.0, extra_line='{"_type": "test_final", "top1_acc": 8')
    finished_run(comparison, runs[2], 70.0)
    monkeypatch.setattr(compare, "call", lambda *args: pytest.fail(f"nothing should run: {args}"))
    comparison.train_and_test(runs)
    results = comparison.results
    assert [results[r.name].status for r in runs] == ["failed", "skipped", "ok"]
    assert results["dense"].error.startswith(f"{dense / 'json_stats.log'}, line 2: not a JSON record (")
    assert results["avit_ponder5e-3"].record["top1_acc"] == 70.0
    assert f"FAILED: {dense / 'json_stats.log'}, line 2" in capsys.readouterr().out


@pytest.mark.parametrize("child", ["evit_keep0.7", "dvt_point5"])  # fine-tunes / evaluates its parent's checkpoint
def test_a_run_started_before_its_parent_was_trained_again_runs_again(compare, tmp_path, monkeypatch, capsys, child):
    plan, comparison = shipped_plan_comparison(compare, tmp_path / "out")
    run = next(r for r in plan.runs if r.name == child)
    parent = tmp_path / "out" / run.parent / "checkpoints" / "checkpoint_epoch_00001.pyth"
    parent.parent.mkdir(parents=True)
    parent.write_bytes(b"parent weights")
    comparison.results[run.parent] = compare.Result(run, record={"checkpoint": str(parent)})
    folder = finished_run(comparison, run, 50.0, str(parent))
    started = time.time() - 100
    os.utime(folder / "config.yaml", (started, started))
    calls = []

    def run_net(log, args, what):  # a fresh run: the old one's checkpoints are gone
        calls.append(args)
        assert not folder.exists() and str(parent) in args
        finished_run(comparison, run, 60.0, str(parent))

    monkeypatch.setattr(compare, "call", run_net)
    os.utime(parent, (started - 50, started - 50))  # written before the run started: reused
    assert comparison.execute(run).record["top1_acc"] == 50.0 and calls == []
    os.utime(parent, (started + 50, started + 50))  # the parent trained again, at the same path
    assert comparison.execute(run).record["top1_acc"] == 60.0 and len(calls) == 1
    assert (f"{run.parent} was trained again after this run started ({parent} is newer than {folder}/config.yaml): "
            "deleting the run and running it again") in capsys.readouterr().out
    assert comparison.execute(run).record["top1_acc"] == 60.0 and len(calls) == 1  # the new run is reused


def test_a_failure_reports_what_this_attempt_wrote(compare, tmp_path):
    log = tmp_path / "logs" / "run.log"
    log.parent.mkdir()
    log.write_text("$ python tools/run_net.py\nerror: a stale error of an earlier attempt\n")

    def failure(code: str) -> str:
        with pytest.raises(compare.RunFailed) as raised:
            compare.call(str(log), ["-c", code], "the tool")
        return str(raised.value)

    # A crash: the last lines of its traceback, not the earlier attempt's error line.
    said = failure("def f():\n    raise ValueError('boom')\nprint('epoch 1')\nf()")
    assert said.startswith("the tool exited with status 1: ") and said.endswith(f"ValueError: boom (log: {log})")
    assert "line 2, in f" in said and "stale" not in said and "epoch 1" not in said
    # A tool's own error line, among its other output.
    said = failure("import sys\nprint('error: MODEL.NAME is wrong')\nprint('bye')\nsys.exit(2)")
    assert said == f"the tool exited with status 2: error: MODEL.NAME is wrong (log: {log})"
    assert failure("raise SystemExit(3)") == f"the tool exited with status 3: (no output) (log: {log})"
    assert log.read_text().count("error: a stale error") == 1  # the log keeps every attempt
    assert log.read_text().count("$ ") == 4


def run_tool(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], capture_output=True, text=True, timeout=900)


def test_comparison_end_to_end_reuses_finished_runs_and_marks_failures(tmp_path):
    # Two runs of the shipped plan (the dense reference and EViT fine-tuned from it), a run with a mistyped key and a
    # run that starts from it.
    plan = yaml.safe_load(PLAN.read_text())
    plan["runs"] = [r for r in plan["runs"] if r["name"] in ("dense", "evit_keep0.7")] + [
        {"name": "typo", "method": "ATS", "budget": "typo", "config": "configs/demo/ATS_DeiT_Ti_digits.yaml",
         "overrides": {"ATS.BUDGET": [17.0]}},
        {"name": "after_typo", "method": "ATS", "budget": "b", "config": "configs/demo/ATS_DeiT_Ti_digits.yaml",
         "from": "typo"}]
    plan_file, out = tmp_path / "plan.yaml", tmp_path / "out"
    plan_file.write_text(yaml.safe_dump(plan))

    first = run_tool("--plan", plan_file, "--out", out, "--quick")
    assert first.returncode == 1, first.stdout + first.stderr  # not every run finished
    assert "typo" in first.stdout and "ATS.BUDGET" in first.stdout
    table = json.loads((out / "comparison.json").read_text())
    rows = {row["name"]: row for row in table["rows"]}
    assert list(rows) == ["dense", "evit_keep0.7", "typo", "after_typo"]
    assert [rows[n]["status"] for n in rows] == ["ok", "ok", "failed", "skipped"]
    assert "ATS.BUDGET" in rows["typo"]["error"] and "typo" in rows["after_typo"]["error"]
    assert not (out / "typo").exists() and not (out / "after_typo").exists()
    markdown = (out / "comparison.md").read_text()
    assert "| ATS **failed** | typo |" in markdown and "**skipped** after_typo: needs typo" in markdown

    # Accuracy and GMACs are each run's own test_final; the runs follow the protocol.
    dense, evit = rows["dense"], rows["evit_keep0.7"]
    finals = {name: last_test_final(out / name) for name in ("dense", "evit_keep0.7")}
    for name in finals:
        assert rows[name]["top1_acc"] == finals[name]["top1_acc"]
        assert rows[name]["gmacs_mean"] == finals[name]["gmacs_mean"]
    assert evit["gmacs_mean"] < dense["gmacs_mean"]  # EViT keeps 70% of the tokens in blocks 1-3
    assert evit["gmacs_ratio"] == pytest.approx(dense["gmacs_mean"] / evit["gmacs_mean"])
    saved = {name: yaml.safe_load((out / name / "config.yaml").read_text()) for name in finals}
    assert saved["evit_keep0.7"]["TRAIN"]["CHECKPOINT_FILE_PATH"] == finals["dense"]["checkpoint"]
    assert saved["evit_keep0.7"]["MODEL"]["NAME"] == "EViTVisionTransformer"
    for cfg in saved.values():
        assert cfg["SOLVER"]["MAX_EPOCH"] == 1 and cfg["RNG_SEED"] == plan["seed"] and cfg["TEST"]["SPLIT"] == "val"

    # Speedups are those tools/benchmark.py measured side by side with the dense model.
    pair = json.loads((out / "benchmark" / "evit_keep0.7.json").read_text())
    alone = json.loads((out / "benchmark" / "dense.json").read_text())
    assert [Path(m["cfg"]).stem for m in pair["models"]] == ["dense", "evit_keep0.7"]
    batches = [str(b) for b in plan["benchmark_batch_sizes"]]
    for b, (ref, method) in zip(batches, zip(pair["models"][0]["results"], pair["models"][1]["results"])):
        assert evit["speedup"][b] == pytest.approx(statistics.median(
            m / r for m, r in zip(method["images_per_s_repeats"], ref["images_per_s_repeats"])))
        assert evit["speedup"][b] == pair["compare"]["speedup"][b]
        assert evit["images_per_s"][b] == method["images_per_s"]
    assert dense["speedup"] == {b: 1.0 for b in batches}
    assert dense["images_per_s"] == {str(r["batch"]): r["images_per_s"] for r in alone["models"][0]["results"]}
    for name in ("accuracy_vs_gmacs.png", "accuracy_vs_throughput.png"):
        assert (out / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Again: the finished runs and benchmarks are reused, nothing retrains.
    watched = [out / n / "json_stats.log" for n in finals] + [out / "benchmark" / f"{n}.json" for n in finals]
    watched += list((out / "dense" / "checkpoints").iterdir()) + list((out / "evit_keep0.7" / "checkpoints").iterdir())
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    second = run_tool("--plan", plan_file, "--out", out, "--quick")
    assert second.returncode == 1
    assert second.stdout.count("reusing the finished run") == 2 and "typo" in second.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched} == before
    again = json.loads((out / "comparison.json").read_text())["rows"]
    assert [row["seconds"] for row in again] == [None] * 4  # nothing ran
    assert [{**row, "seconds": None} for row in again] == [{**row, "seconds": None} for row in table["rows"]]

    # A finished run is not reused for another protocol: it is named, not silently mixed.
    third = run_tool("--plan", plan_file, "--out", out, "--quick", "--epochs", "2", "--runs", "dense")
    assert third.returncode == 1
    assert "holds a finished run with another config (SOLVER.MAX_EPOCH)" in third.stdout
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched} == before
