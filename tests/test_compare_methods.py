"""tools/compare_methods.py: the plan, and the comparison end to end (1 epoch, subprocesses, the digits data)."""

import json
import os
import re
import subprocess
import sys
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
        assert evit["speedup"][b] == pytest.approx(method["images_per_s"] / ref["images_per_s"])
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
