"""tools/plot.py and vitadapt/visualization/plots.py: trade-off figures of runs, DVT curves, token histograms, and
tools/benchmark.py --plot. Fake runs are written as tools/run_net.py writes them (config.yaml from the config's
dump, json_stats.log records); every figure is checked for what it draws, read back from the matplotlib Figure."""

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import helpers_e2e as h
from vitadapt.config import ConfigError, load_config
from vitadapt.engine.budgeted import budget_curve
from vitadapt.engine.evaluate import token_depth
from vitadapt.models import VisionTransformer, build_model
from vitadapt.models.build import MODEL_REGISTRY
from vitadapt.models.synthetic import add_halting_drift_, sharpen_
from vitadapt.visualization.curves import curve_points
from vitadapt.visualization.plots import REFERENCE, SIZE, Point, plot_throughput, plot_tradeoff

plot_tool = h.load_tool("plot")


def fake_run(root, name, model, tests=(), results_file="", opts=()):
    """root/name as tools/run_net.py leaves it: config.yaml, and json_stats.log with a train_epoch and a val record,
    then one test_final record per dict of `tests` (the last is the run's result)."""
    out = root / name
    out.mkdir(parents=True)
    extra = ["TEST.SAVE_RESULTS_PATH", results_file] if results_file else []
    cfg = load_config("", ["MODEL.NAME", model, "OUTPUT_DIR", str(out), *extra, *opts])
    (out / "config.yaml").write_text(cfg.dump())
    records = [{"_type": "train_epoch", "epoch": 1, "loss": 1.5, "top1_acc": 40.0},
               {"_type": "val", "epoch": 1, "top1_acc": 11.0, "gmacs_mean": 9.0}]
    records += [{"_type": "test_final", "split": "val", **t} for t in tests]
    (out / "json_stats.log").write_text("".join(json.dumps(r) + "\n" for r in records))
    return out


def draw(*argv):
    """tools/plot.py's draw in-process: ({file name: Figure}, missing lines)."""
    return plot_tool.draw(plot_tool.parse([str(a) for a in argv]))


NO_RESULTS = ("no per-image kept_tokens: its test job saved no results (run it with TEST.SAVE_RESULTS_PATH "
              "results.json, or results.pth for a video data set)")


def unsaved_histograms(*runs):
    """The missing lines of kept-token histograms of `runs` (paths) whose test job saved no per-image results."""
    return [f"kept-token histogram: run '{run.name}' ({run}): {NO_RESULTS}" for run in runs]


def lines_by_label(fig):
    return {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].lines}


def assert_png(path, size=SIZE):
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size
        image.verify()


@pytest.fixture
def method_runs(tmp_path):
    """A dense run, two EViT budgets (the first tested twice: its last test counts) and one ATS run."""
    runs = tmp_path / "runs"
    return {"deit": fake_run(runs, "deit", "VisionTransformer", [{"top1_acc": 81.25, "gmacs_mean": 1.25}]),
            "evit07": fake_run(runs, "evit07", "EViTVisionTransformer",
                               [{"top1_acc": 10.0, "gmacs_mean": 5.0}, {"top1_acc": 79.5, "gmacs_mean": 0.875}]),
            "evit05": fake_run(runs, "evit05", "EViTVisionTransformer", [{"top1_acc": 77.0, "gmacs_mean": 0.625}]),
            "ats": fake_run(runs, "ats", "ATSVisionTransformer", [{"top1_acc": 80.0, "gmacs_mean": 0.75}])}


def test_accuracy_vs_gmacs_has_a_line_per_method_and_the_dense_reference(method_runs, tmp_path, capsys):
    out = tmp_path / "figs"
    figures, missing = draw(*method_runs.values(), "--out", out)
    assert set(figures) == {"accuracy_vs_gmacs.png"}
    # Every run of a model that declares kept tokens (EViT, ATS) has a histogram, which needs its saved results.
    assert missing == unsaved_histograms(*[method_runs[k] for k in ("evit07", "evit05", "ats")])
    assert_png(out / "accuracy_vs_gmacs.png")
    assert f"wrote {out / 'accuracy_vs_gmacs.png'} (4 runs)" in capsys.readouterr().out
    fig = figures["accuracy_vs_gmacs.png"]
    # EViT's line runs through its budgets in order of cost; the last test_final of evit07 is the one drawn.
    assert lines_by_label(fig) == {"ATS": [[0.75, 80.0]], "EViT": [[0.625, 77.0], [0.875, 79.5]],
                                   REFERENCE: [[1.25, 81.25]]}
    ax = fig.axes[0]
    assert sorted(t.get_text() for t in ax.texts) == ["ats", "deit", "evit05", "evit07"]
    assert ax.get_xlabel() == "GMACs per image (mean)" and ax.get_ylabel() == "top-1 accuracy (%)"


def test_labels_and_reference_option(method_runs, tmp_path):
    runs = [method_runs[k] for k in ("evit07", "evit05", "ats")]
    figures, _ = draw(*runs, "--labels", "EViT 0.7", "EViT 0.5", "ATS", "--reference", method_runs["ats"],
                      method_runs["deit"], "--out", tmp_path / "figs")
    fig = figures["accuracy_vs_gmacs.png"]
    assert lines_by_label(fig) == {"EViT": [[0.625, 77.0], [0.875, 79.5]], REFERENCE: [[0.75, 80.0], [1.25, 81.25]]}
    assert sorted(t.get_text() for t in fig.axes[0].texts) == ["ATS", "EViT 0.5", "EViT 0.7", "deit"]
    with pytest.raises(ConfigError, match="2 label"):
        draw(*runs, "--labels", "a", "b", "--out", tmp_path / "figs")
    with pytest.raises(ConfigError, match="two runs are labelled 'x'"):
        draw(*runs[:2], "--labels", "x", "x", "--out", tmp_path / "figs")


def test_a_model_of_no_known_method_is_drawn_by_what_its_class_declares(method_runs, tmp_path, monkeypatch):
    """A newly registered model is labelled by its MODEL.NAME, and its class's token_statistics decide whether it is a
    dense reference and which histograms it has, not its name."""
    class TokenDropViT(VisionTransformer):
        token_statistics = ("kept_tokens",)

    class WideViT(VisionTransformer):  # a dense backbone
        pass

    for model in (TokenDropViT, WideViT):
        monkeypatch.setitem(MODEL_REGISTRY._obj_map, model.__name__, model)
    runs = tmp_path / "new"
    drop = fake_run(runs, "drop", "TokenDropViT", [{"top1_acc": 78.0, "gmacs_mean": 0.5}])
    wide = fake_run(runs, "wide", "WideViT", [{"top1_acc": 82.0, "gmacs_mean": 2.0}])
    figures, missing = draw(method_runs["deit"], drop, wide, "--out", tmp_path / "figs")
    assert lines_by_label(figures["accuracy_vs_gmacs.png"]) == {"TokenDropViT": [[0.5, 78.0]],
                                                                REFERENCE: [[1.25, 81.25], [2.0, 82.0]]}
    assert missing == unsaved_histograms(drop)


def test_video_runs_plot_per_view_gmacs_and_per_video_top1_and_refuse_mixing_with_images(method_runs, tmp_path):
    runs = tmp_path / "video"
    xvit = fake_run(runs, "xvit", "XViT", [{"top1_acc": 60.0, "video_top1_acc": 70.0, "gmacs_mean": 0.5,
                                            "gmacs_per_view_mean": 0.5, "gmacs_per_video_mean": 1.5}])
    evit = fake_run(runs, "evit", "EViTXViT", [{"top1_acc": 55.0, "video_top1_acc": 66.0, "gmacs_mean": 0.25,
                                                "gmacs_per_view_mean": 0.25, "gmacs_per_video_mean": 0.75}])
    figures, _ = draw(xvit, evit, "--out", tmp_path / "figs")
    fig = figures["accuracy_vs_gmacs.png"]
    assert lines_by_label(fig) == {"EViT": [[0.25, 66.0]], REFERENCE: [[0.5, 70.0]]}
    assert fig.axes[0].get_xlabel() == "GMACs per view (mean)"
    rc = plot_tool.main([str(xvit), str(method_runs["deit"]), "--out", str(tmp_path / "mixed")])
    assert rc == 2 and not (tmp_path / "mixed").exists()


def test_a_run_without_test_record_is_named_and_left_out(method_runs, tmp_path, capsys):
    untested = fake_run(tmp_path / "runs", "untested", "ATSVisionTransformer")
    rc = plot_tool.main([str(method_runs["deit"]), str(untested), "--out", str(tmp_path / "figs")])
    assert rc == 1
    err = capsys.readouterr().err
    assert f"missing: accuracy_vs_gmacs.png: run 'untested' ({untested}): json_stats.log has no test_final" in err
    assert_png(tmp_path / "figs" / "accuracy_vs_gmacs.png")
    # A record whose accuracy was non-finite (logged as null) is named as such.
    bad = fake_run(tmp_path / "runs", "nan", "VisionTransformer",
                   [{"top1_acc": None, "gmacs_mean": 1.0, "nonfinite": {"top1_acc": "nan"}}])
    assert "top1_acc of its test_final record in json_stats.log is non-finite" in draw(bad, "--out", tmp_path)[1][0]


def test_a_folder_that_is_no_run_is_an_error_and_a_corrupt_log_leaves_out_its_run(method_runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    rc = plot_tool.main([str(method_runs["deit"]), str(tmp_path / "empty"), "--out", str(tmp_path / "figs")])
    assert rc == 2 and "has no config.yaml" in capsys.readouterr().err
    # A test_final record, then a line cut short (a run killed while writing): that run alone is left out, named.
    log = method_runs["evit05"] / "json_stats.log"
    log.write_text(log.read_text() + '{"_type": "test_final", "top1_a')
    figures, missing = draw(method_runs["deit"], method_runs["evit05"], method_runs["evit07"], "--out", tmp_path / "f")
    assert missing[0].startswith(f"accuracy_vs_gmacs.png: run 'evit05' ({method_runs['evit05']}): {log}, line 4: not "
                                 "a JSON record (")
    assert lines_by_label(figures["accuracy_vs_gmacs.png"]) == {"EViT": [[0.875, 79.5]], REFERENCE: [[1.25, 81.25]]}


def bench_model(cfg, rates):
    return {"cfg": str(cfg), "model": "m", "input": "image",
            "results": [{"batch": b, "images_per_s": r, "images_per_s_min": r - 1, "images_per_s_max": r + 1}
                        for b, r in rates.items()]}


def test_accuracy_vs_throughput_matches_benchmarks_to_runs_by_config_name(method_runs, tmp_path, capsys):
    first = tmp_path / "a.json"  # benchmarked the runs' own config.yaml, as --compare pairs
    first.write_text(json.dumps({"device": "cpu", "threads": 2, "models": [
        bench_model(method_runs["deit"] / "config.yaml", {1: 100.0, 8: 400.0, 32: 500.0}),
        bench_model(method_runs["evit07"] / "config.yaml", {1: 150.0, 8: 600.0, 32: 800.0})]}))
    second = tmp_path / "b.json"  # a config file named after the run, and one of no run
    second.write_text(json.dumps({"device": "cpu", "threads": 2, "models": [
        bench_model(tmp_path / "configs" / "evit05.yaml", {1: 160.0, 8: 700.0}),
        bench_model(tmp_path / "configs" / "other.yaml", {8: 1.0})]}))
    runs = [method_runs[k] for k in ("deit", "evit07", "evit05", "ats")]
    figures, missing = draw(*runs, "--benchmark", first, second, "--out", tmp_path / "figs")
    # The largest batch every matched benchmark measured: 8.
    fig = figures["accuracy_vs_throughput.png"]
    assert lines_by_label(fig) == {"EViT": [[600.0, 79.5], [700.0, 77.0]], REFERENCE: [[400.0, 81.25]]}
    assert fig.axes[0].get_xlabel() == "images/s at batch 8 (cpu)"
    assert_png(tmp_path / "figs" / "accuracy_vs_throughput.png")
    assert len(missing) == 5 and missing[2:] == unsaved_histograms(*runs[1:])
    assert missing[1] == (f"accuracy_vs_throughput.png: run 'ats' ({method_runs['ats']}): no benchmark of a config "
                          "named 'ats' or after its folder")
    assert missing[0] == (f"accuracy_vs_throughput.png: the benchmark of {tmp_path / 'configs' / 'other.yaml'} "
                          f"({second}) fits no run (labels: deit, evit07, evit05, ats)")
    assert "accuracy_vs_throughput.png (3 runs, batch 8)" in capsys.readouterr().out
    figures, missing = draw(*runs[:2], "--benchmark", first, "--batch", "32", "--out", tmp_path / "figs")
    assert lines_by_label(figures["accuracy_vs_throughput.png"]) == {"EViT": [[800.0, 79.5]],
                                                                      REFERENCE: [[500.0, 81.25]]}
    _, missing = draw(*runs[:2], "--benchmark", first, "--batch", "4", "--out", tmp_path / "figs")
    assert len(missing) == 3 and all("has no batch 4: measured [1, 8, 32]" in m for m in missing[:2])


def dvt_curve(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    probs = torch.randn(3, 40, 5, generator=g).mul(2).softmax(-1)
    labels = torch.randint(0, 5, (40,), generator=g)
    return budget_curve(probs, probs, labels, [0.5, 1.0, 2.0], points=range(1, 60, 6))


def test_dvt_curves_of_every_dvt_run_that_computed_them_and_a_dvt_run_without_curves_named(tmp_path):
    runs = tmp_path / "runs"
    dvt = fake_run(runs, "dvt", "DVT", [{"top1_acc": 70.0, "gmacs_mean": 1.0}])
    curves = {"budgeted (threshold search)": dvt_curve(1), "budgeted (checkpoint thresholds)": dvt_curve(2)}
    (dvt / "dvt_curves.json").write_text(json.dumps(curves))
    bare = fake_run(runs, "dvt_no_curves", "DVT", [{"top1_acc": 69.0, "gmacs_mean": 0.75}])
    # Other budget points of dvt's checkpoint, evaluated without curves (as tools/compare_methods.py's plan does):
    # their accuracy is drawn, dvt's curves once.
    points = [fake_run(runs, f"dvt_point{p}", "DVT", [{"top1_acc": 60.0 + p, "gmacs_mean": p / 10}],
                       opts=["DVT.BUDGET_POINT", str(p), "DVT.CURVES", "False"]) for p in (5, 30)]
    figures, missing = draw(dvt, bare, *points, "--out", tmp_path / "figs")
    assert missing == [f"dvt_curves.png: run 'dvt_no_curves' ({bare}): no dvt_curves.json though DVT.CURVES is True "
                       "(its test job has not run, or stopped before writing them)"]
    # An early-exit model is no dense reference, whatever it declares.
    assert lines_by_label(figures["accuracy_vs_gmacs.png"]) == {"DVT": [[0.5, 65.0], [0.75, 69.0], [1.0, 70.0],
                                                                        [3.0, 90.0]]}
    assert_png(tmp_path / "figs" / "dvt_curves.png")
    lines = figures["dvt_curves.png"].axes[0].lines
    budgeted = {line.get_label(): line.get_xydata().tolist() for line in lines if line.get_marker() == "o"}
    anytime = [line.get_xydata().tolist() for line in lines if line.get_marker() == "s"]
    assert budgeted == {f"dvt: {name}": [list(p) for p in curve_points(c)[0]] for name, c in curves.items()}
    assert anytime == [[list(p) for p in curve_points(c)[1]] for c in curves.values()]
    assert [x for x, _ in anytime[0]] == [0.5, 1.0, 2.0]


def per_image_tokens(n: int, depth: int, seed: int = 0):
    """Kept tokens [n, depth] that never grow along the blocks (17 tokens in), and each image's mean depth."""
    rng = np.random.default_rng(seed)
    kept = np.minimum.accumulate(rng.integers(3, 18, size=(n, depth)), axis=1)
    kept[:, 0] = 17
    return kept, kept.sum(1) / kept[:, 0]


def test_token_histograms_draw_the_saved_per_image_values(tmp_path):
    kept, depths = per_image_tokens(30, 4)
    opts = ["VIT.DEPTH", "4"]
    test = {"top1_acc": 70.0, "gmacs_mean": 1.0}
    avit = fake_run(tmp_path, "avit", "AViTVisionTransformer", [test], "results.json",
                    opts + ["AVIT.PRIOR_TARGET_DEPTH", "2"])
    rows = [{"index": i, "label": 0, "pred": 0, "top5": [0], "kept_tokens": k.tolist(), "token_depth": d}
            for i, (k, d) in enumerate(zip(kept, depths))]
    (avit / "results.json").write_text(json.dumps({"rows": rows}))
    ats = fake_run(tmp_path, "ats", "ATSVisionTransformer", [test], "results.pth", opts + ["ATS.BLOCKS", "[1,2]"])
    torch.save({"index": torch.arange(30), "kept_tokens": torch.from_numpy(kept[::-1].copy())}, ats / "results.pth")
    evit = fake_run(tmp_path, "evit", "EViTVisionTransformer", [test], "results.json",
                    opts + ["EVIT.LOCATIONS", "[1,2]"])
    fixed = [17, 17, 12, 9]  # EViT keeps the same count in every image: one bar per block
    (evit / "results.json").write_text(json.dumps({"rows": [{**row, "kept_tokens": fixed} for row in rows]}))
    dense = fake_run(tmp_path, "dense", "VisionTransformer", [test], "results.json", opts)  # declares none: no figure
    figures, missing = draw(avit, ats, evit, dense, "--out", tmp_path / "figs")
    assert missing == [] and set(figures) == {"accuracy_vs_gmacs.png", "avit_token_depth.png", "avit_kept_tokens.png",
                                              "ats_kept_tokens.png", "evit_kept_tokens.png"}
    evit_panels = figures["evit_kept_tokens.png"].axes
    assert [[(round(p.get_x() + p.get_width() / 2), p.get_height()) for p in ax.patches if p.get_height()]
            for ax in evit_panels] == [[(count, 30)] for count in fixed]
    depth_ax = figures["avit_token_depth.png"].axes[0]
    assert sum(p.get_height() for p in depth_ax.patches) == 30
    assert depth_ax.lines[0].get_xdata()[0] == pytest.approx(depths.mean())  # the mean marked
    for name in ("avit_kept_tokens.png", "ats_kept_tokens.png"):
        assert_png(tmp_path / "figs" / name, (4 * 260, 200 + 40))
        panels = figures[name].axes
        assert [ax.get_title() for ax in panels] == [f"block {b}: mean {kept[:, b].mean():.1f}" for b in range(4)]
        for block, ax in enumerate(panels):  # one-token-wide bars: the histogram of that block's counts
            drawn = {round(p.get_x() + p.get_width() / 2): p.get_height() for p in ax.patches if p.get_height()}
            assert drawn == dict(Counter(kept[:, block].tolist())), block


def test_histograms_without_saved_per_image_values_are_named(tmp_path):
    test = {"top1_acc": 70.0, "gmacs_mean": 1.0}
    unsaved = fake_run(tmp_path, "unsaved", "AViTVisionTransformer", [test])
    gone = fake_run(tmp_path, "gone", "ATSVisionTransformer", [test], "results.json")
    csv_file = fake_run(tmp_path, "csv", "AdaViTVisionTransformer", [test], "r.csv")
    (csv_file / "r.csv").write_text("index,label\n0,1\n")
    old = fake_run(tmp_path, "old", "AdaViTVisionTransformer", [test], "r.json")  # saved before the statistics
    (old / "r.json").write_text(json.dumps({"rows": [{"index": 0, "label": 1, "pred": 1, "top5": [1]}]}))
    _, missing = draw(unsaved, gone, csv_file, old, "--out", tmp_path / "figs")
    advice = "(run it with TEST.SAVE_RESULTS_PATH results.json, or results.pth for a video data set)"
    assert missing == [
        f"token-depth histogram: run 'unsaved' ({unsaved}): no per-image token_depth: its test job saved no results "
        + advice,
        f"kept-token histogram: run 'unsaved' ({unsaved}): no per-image kept_tokens: its test job saved no results "
        + advice,
        f"kept-token histogram: run 'gone' ({gone}): TEST.SAVE_RESULTS_PATH {gone / 'results.json'} does not exist",
        f"kept-token histogram: run 'csv' ({csv_file}): {csv_file / 'r.csv'} is a .csv file; per-image statistics are "
        "read from a .json or torch results file",
        f"kept-token histogram: run 'old' ({old}): {old / 'r.json'} has no per-image kept_tokens (the .json rows of a "
        "video data set are per video: save a torch results file, e.g. results.pth)"]


def test_plot_tradeoff_refuses_nothing_and_writes_no_partial_file(tmp_path):
    with pytest.raises(ValueError, match="no point"):
        plot_tradeoff([], str(tmp_path / "a.png"), "x", "y")
    fig = plot_tradeoff([Point("a", "EViT", 1.0, 2.0)], str(tmp_path / "sub" / "a.png"), "x", "y")
    assert lines_by_label(fig) == {"EViT": [[1.0, 2.0]]}
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["a.png"]


# ------------------------------------------------------------------------------------------ tools/benchmark.py


def test_benchmark_plot_draws_throughput_vs_batch_per_config(tmp_path):
    configs = []
    for name, text in (("dense", "MODEL:\n  NAME: VisionTransformer\n"),
                       ("ats", "MODEL:\n  NAME: ATSVisionTransformer\nATS:\n  BLOCKS: [1]\n")):
        configs.append(tmp_path / f"{name}.yaml")
        configs[-1].write_text(text)
    out, png = tmp_path / "bench.json", tmp_path / "plots" / "throughput.png"
    tiny = ["NUM_GPUS", "0", "VIT.PATCH_SIZE", "8", "VIT.EMBED_DIM", "32", "VIT.DEPTH", "2", "VIT.NUM_HEADS", "2",
            "DATA.TEST_CROP_SIZE", "32", "MODEL.NUM_CLASSES", "3", "BENCHMARK.BATCH_SIZES", "[1,2,4]",
            "BENCHMARK.NUM_REPEATS", "2", "BENCHMARK.ITERS_PER_REPEAT", "1", "BENCHMARK.WARMUP_ITERS", "1"]
    rc = h.load_tool("benchmark").main(["--cfg", str(configs[0]), "--compare", str(configs[1]), "--out", str(out),
                                        "--plot", str(png)] + tiny)
    assert rc == 0
    assert_png(png)
    report = json.loads(out.read_text())
    # --plot drew the report it wrote: the same pixels as plot_throughput on the saved report, whose data are read back.
    fig = plot_throughput(report, str(tmp_path / "again.png"))
    with Image.open(png) as written, Image.open(tmp_path / "again.png") as again:
        assert np.array_equal(np.asarray(written), np.asarray(again))
    ax = fig.axes[0]
    assert lines_by_label(fig) == {str(c): [[b, r["images_per_s"]] for b, r in zip([1, 2, 4], m["results"])]
                                   for c, m in zip(configs, report["models"])}
    assert ax.get_xscale() == "log" and [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    assert ax.get_ylabel() == "images/s"
    # The min-max band of the repeats around each line.
    for band, model in zip(ax.collections, report["models"]):
        y = band.get_paths()[0].vertices[:, 1]
        assert min(y) == pytest.approx(min(r["images_per_s_min"] for r in model["results"]))
        assert max(y) == pytest.approx(max(r["images_per_s_max"] for r in model["results"]))


def test_benchmark_plot_into_a_folder_is_refused_before_measuring(tmp_path, capsys):
    cfg = tmp_path / "d.yaml"
    cfg.write_text("MODEL:\n  NAME: VisionTransformer\n")
    rc = h.load_tool("benchmark").main(["--cfg", str(cfg), "--out", str(tmp_path / "b.json"), "--plot",
                                        str(tmp_path)])
    assert rc == 2 and "--plot" in capsys.readouterr().err and not (tmp_path / "b.json").exists()


# ------------------------------------------------------------------------------------------ end to end


@pytest.fixture(scope="module")
def trained_runs(tmp_path_factory, image_folder):
    """Two tiny runs of tools/run_net.py: a dense ViT trained for one epoch, and the test job of an A-ViT on synthetic
    weights under which its tokens halt at depths that differ per image (saving its results as .json)."""
    root = tmp_path_factory.mktemp("plot_runs")
    runs = {"dense": root / "dense", "avit": root / "avit"}
    assert h.load_run_net().main(["--cfg", ""] + h.tiny_opts(image_folder, runs["dense"], SOLVER__MAX_EPOCH=1)) == 0
    opts = h.tiny_opts(image_folder, runs["avit"], MODEL__NAME="AViTVisionTransformer", VIT__DEPTH=4,
                       AVIT__PRIOR_TARGET_DEPTH=2, TEST__SAVE_RESULTS_PATH="results.json", TRAIN__ENABLE=False)
    model = add_halting_drift_(sharpen_(build_model(load_config("", opts))))
    weights = root / "halting.pth"
    torch.save({"model": model.state_dict()}, weights)
    assert h.load_run_net().main(["--cfg", ""] + opts + ["TEST.CHECKPOINT_FILE_PATH", str(weights)]) == 0
    return {**runs, "model": model.eval(), "data": image_folder}


def test_the_test_job_saves_per_image_token_statistics(trained_runs):
    """Each saved row holds its own image's kept tokens and depth (that image run alone), and they add up to the
    logged statistics."""
    from PIL import Image

    out = trained_runs["avit"]
    (record,) = h.records(out, "test_final")
    rows = json.loads((out / "results.json").read_text())["rows"]
    items = h.list_split(trained_runs["data"], "val")
    assert [r["index"] for r in rows] == list(range(len(items))) and len(rows) == record["num_images"]
    model, tf = trained_runs["model"], h.timm_eval_transform()
    with torch.no_grad():
        for row, (path, _) in zip(rows, items):
            model(tf(Image.open(path).convert("RGB"))[None])
            assert row["kept_tokens"] == model.last_token_counts[0, :, 1].tolist()
            assert row["token_depth"] == pytest.approx(token_depth(model.last_token_counts).item(), rel=1e-6)
    kept = np.array([r["kept_tokens"] for r in rows])
    depths = np.array([r["token_depth"] for r in rows])
    assert len(set(depths.tolist())) > 2 and kept.shape == (len(rows), 4)  # the images differ
    assert kept.mean(0).tolist() == pytest.approx(record["tokens_per_block_mean"], abs=1e-3)
    assert kept.min(0).tolist() == record["tokens_per_block_min"]
    assert kept.max(0).tolist() == record["tokens_per_block_max"]
    assert depths.mean() == pytest.approx(record["token_depth_mean"], rel=1e-5)


def test_plot_on_real_runs(trained_runs, tmp_path):
    dense, avit = trained_runs["dense"], trained_runs["avit"]
    out = tmp_path / "figs"
    proc = subprocess.run([sys.executable, str(h.REPO / "tools" / "plot.py"), str(dense), str(avit), "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout.splitlines() == [f"wrote {out / 'accuracy_vs_gmacs.png'} (2 runs)",
                                        f"wrote {out / 'avit_token_depth.png'} (7 images)",
                                        f"wrote {out / 'avit_kept_tokens.png'} (7 images)"]
    assert_png(out / "accuracy_vs_gmacs.png")
    assert_png(out / "avit_token_depth.png")
    assert_png(out / "avit_kept_tokens.png", (4 * 260, 240))
    # What the figures hold, drawn in-process: the runs' test results and the saved per-image values.
    figures, missing = draw(dense, avit, "--out", tmp_path / "again")
    (d,), (a,) = h.records(dense, "test_final"), h.records(avit, "test_final")
    assert missing == [] and lines_by_label(figures["accuracy_vs_gmacs.png"]) == {
        "A-ViT": [[a["gmacs_mean"], a["top1_acc"]]], REFERENCE: [[d["gmacs_mean"], d["top1_acc"]]]}
    depth_ax = figures["avit_token_depth.png"].axes[0]
    assert sum(p.get_height() for p in depth_ax.patches) == 7
    assert depth_ax.lines[0].get_xdata()[0] == pytest.approx(a["token_depth_mean"], rel=1e-5)
    # Without its results file, the A-ViT run's histograms are named as missing.
    (avit / "results.json").rename(avit / "moved.json")
    try:
        proc = subprocess.run([sys.executable, str(h.REPO / "tools" / "plot.py"), str(avit), "--out",
                               str(tmp_path / "third")], capture_output=True, text=True, timeout=300)
    finally:
        (avit / "moved.json").rename(avit / "results.json")
    assert proc.returncode == 1
    assert proc.stderr.count(f"run 'avit' ({avit}): TEST.SAVE_RESULTS_PATH {avit / 'results.json'} does not") == 2
