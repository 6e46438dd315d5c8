"""tools/benchmark.py and tools/visualize.py on tiny models (no timing thresholds: only what can be checked)."""

import json
import os
import platform
import re
import statistics

import pytest
import torch
from PIL import Image

from helpers_e2e import load_tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["NUM_GPUS", "0", "VIT.PATCH_SIZE", "8", "VIT.EMBED_DIM", "48", "VIT.DEPTH", "4", "VIT.NUM_HEADS", "3",
        "DATA.TRAIN_CROP_SIZE", "64", "DATA.TEST_CROP_SIZE", "64", "MODEL.NUM_CLASSES", "10"]


def write_config(tmp_path, name, model):
    path = tmp_path / f"{name}.yaml"
    ats = "ATS:\n  BLOCKS: [1, 2, 3]\n" if model == "ATSVisionTransformer" else ""
    path.write_text(f"MODEL:\n  NAME: {model}\n{ats}")
    return str(path)


def test_benchmark_compares_two_models_side_by_side(tmp_path):
    dense = write_config(tmp_path, "dense", "VisionTransformer")
    ats = write_config(tmp_path, "ats", "ATSVisionTransformer")
    out = tmp_path / "bench.json"
    rc = load_tool("benchmark").main(["--cfg", dense, "--compare", ats, "--init", "sharpened", "--out", str(out)] + TINY +
                                     ["BENCHMARK.BATCH_SIZES", "[1,4]", "BENCHMARK.NUM_REPEATS", "2",
                                      "BENCHMARK.ITERS_PER_REPEAT", "1", "BENCHMARK.WARMUP_ITERS", "1"])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["threads"] == torch.get_num_threads() and report["init"] == "sharpened"
    # Both models measured under an allocator that reuses freed memory (KEEP_FREED_CPU_MEMORY, on by default).
    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert report["cpu_allocator"] == ("keeps freed memory" if glibc else "system default")
    # And it asked for subnormal floats to be flushed to zero (FLUSH_DENORMAL, on by default; in tests the request is
    # only recorded, see conftest.py; the mode itself: tests/test_denormals.py).
    assert report["flush_denormal"] is True
    first, second = report["models"]
    assert [r["batch"] for r in first["results"]] == [1, 4]
    assert all(r["images_per_s"] > 0 and r["peak_mem_mib"] > 0 for m in (first, second) for r in m["results"])
    assert first["params_m"] == second["params_m"]  # ATS adds no parameters
    # Same sharpened weights: ATS drops tokens, so it costs fewer MACs; analytic and fvcore agree on one image.
    assert second["gmacs_mean"] < first["gmacs_mean"]
    for m in (first, second):
        assert m["gmacs_fvcore_first_image"] == pytest.approx(m["gmacs_first_image"], rel=0.03)
    assert report["compare"]["gmacs_ratio"] == pytest.approx(first["gmacs_mean"] / second["gmacs_mean"])
    assert set(report["compare"]["speedup"]) == {"1", "4"}
    for k, speedup in report["compare"]["speedup"].items():  # efficiency: speed-up over the GMACs reduction
        rates = [m["results"][int(k == "4")]["images_per_s_repeats"] for m in (first, second)]
        gmacs = [m["results"][int(k == "4")]["gmacs_mean"] for m in (first, second)]
        assert len(rates[0]) == len(rates[1]) == 2  # BENCHMARK.NUM_REPEATS
        assert [m["results"][int(k == "4")]["images_per_s"] for m in (first, second)] == [
            statistics.median(r) for r in rates]
        # The speed-up pairs the two models' rates of each repeat (timed back to back): the median of the ratios.
        assert speedup == pytest.approx(statistics.median([r1 / r0 for r0, r1 in zip(*rates)]))
        assert report["compare"]["efficiency"][k] == pytest.approx((gmacs[0] / gmacs[1]) / speedup)


def test_benchmark_times_training_steps(tmp_path):
    """--train: each timed iteration is a training step (losses, backward, optimizer step); the per-batch costs are
    the training forwards'."""
    dense = write_config(tmp_path, "dense", "VisionTransformer")
    ats = write_config(tmp_path, "ats", "ATSVisionTransformer")
    out = tmp_path / "bench.json"
    tool = load_tool("benchmark")
    subjects = []
    original = tool.Subject
    tool.Subject = lambda *a, **k: subjects.append(original(*a, **k)) or subjects[-1]
    try:
        rc = tool.main(["--train", "--cfg", dense, "--compare", ats, "--init", "sharpened", "--out", str(out)] + TINY +
                       ["BENCHMARK.BATCH_SIZES", "[2]", "BENCHMARK.NUM_REPEATS", "1", "BENCHMARK.ITERS_PER_REPEAT", "1",
                        "BENCHMARK.WARMUP_ITERS", "1"])
    finally:
        tool.Subject = original
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["mode"] == "train"
    for s in subjects:
        assert s.train and s.model.training  # the last thing run was a training step
        grads = [p.grad for p in s.model.parameters() if p.requires_grad]
        assert grads and all(g is not None for g in grads[:3])  # the backward reached the weights
    first, second = report["models"]
    assert second["results"][0]["gmacs_mean"] < first["results"][0]["gmacs_mean"]  # ATS drops tokens in training


def test_benchmark_reports_config_errors(tmp_path, capsys):
    rc = load_tool("benchmark").main(["--cfg", write_config(tmp_path, "d", "VisionTransformer"), "VIT.NOPE", "1"])
    assert rc == 2 and "VIT.NOPE" in capsys.readouterr().err


def test_visualize_writes_one_png_per_image_showing_dropped_patches(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (80, 80), (40 * i, 200, 90)).save(root / split / c / f"{i}.png")
    cfg = write_config(tmp_path, "ats", "ATSVisionTransformer")
    out = tmp_path / "out"
    rc = load_tool("visualize").main(["--cfg", cfg, "--init", "sharpened", "--num-images", "3",
                                      "DATA.PATH_TO_DATA_DIR", str(root), "OUTPUT_DIR", str(out)] + TINY)
    assert rc == 0
    pngs = sorted(os.listdir(out / "visualization"))
    assert pngs == ["image_0000.png", "image_0001.png", "image_0002.png"]
    width, height = Image.open(out / "visualization" / pngs[0]).size
    assert width > 2 * height  # the input plus at least one panel where tokens were dropped


def test_visualize_refuses_random_weights(tmp_path, capsys):
    cfg = write_config(tmp_path, "ats", "ATSVisionTransformer")
    rc = load_tool("visualize").main(["--cfg", cfg, "TEST.DATASET", "digits", "OUTPUT_DIR", str(tmp_path / "o")] + TINY)
    assert rc == 2 and "random weights" in capsys.readouterr().err


def test_visualize_draws_the_fused_token_of_evit(tmp_path, caplog):
    root = tmp_path / "data"
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        Image.new("RGB", (80, 80), (10, 200, 90)).save(root / split / "a" / "0.png")
    cfg = tmp_path / "evit.yaml"
    cfg.write_text("MODEL:\n  NAME: EViTVisionTransformer\nEVIT:\n  LOCATIONS: [1, 2]\n  KEEP_RATE: 0.5\n")
    out = tmp_path / "out"
    with caplog.at_level("INFO", logger="vitadapt.visualize"):
        rc = load_tool("visualize").main(["--cfg", str(cfg), "--init", "sharpened", "--num-images", "1",
                                          "DATA.PATH_TO_DATA_DIR", str(root), "OUTPUT_DIR", str(out)] + TINY)
    assert rc == 0 and (out / "visualization" / "image_0000.png").is_file()
    # 64 patches -> CLS + 32 kept + 1 fused after block 1; then ceil(0.5 * 33) = 17 of the 33 (the old fused
    # token may be among them) + a new fused token after block 2. Counts include CLS, not the fused token.
    assert "1: 33 + 1 fused" in caplog.text
    assert re.search(r"2: 1[78] \+ 1 fused", caplog.text)
    image = torch.from_numpy(__import__("numpy").array(Image.open(out / "visualization" / "image_0000.png")))
    width = image.shape[1] // 3
    last_panel = image[:, 2 * width:].reshape(-1, 3).float()
    assert (last_panel[:, 2] > last_panel[:, 0] + 60).any()  # fused patches are tinted blue


def test_visualize_draws_avit_depth_maps_from_the_model_depths(tmp_path, caplog):
    from vitadapt.config import load_config
    from vitadapt.datasets import build_dataset
    from vitadapt.models import build_model
    from vitadapt.models.synthetic import add_halting_drift_, sharpen_

    root = tmp_path / "data"
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        (root / split / "a").mkdir(parents=True)
        for i in range(4):
            pixels = (torch.rand(64, 64, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / split / "a" / f"{i}.png")
    opts = TINY + ["MODEL.NAME", "AViTVisionTransformer", "AVIT.GATE_SCALE", "5", "AVIT.GATE_CENTER", "5",
                   "AVIT.PRIOR_TARGET_DEPTH", "2", "DATA.PATH_TO_DATA_DIR", str(root), "OUTPUT_DIR", str(tmp_path / "out")]
    cfg = load_config("", opts)
    model = add_halting_drift_(sharpen_(build_model(cfg).eval()), drift=1.0, spread=5.0)
    torch.save({"model": model.state_dict()}, tmp_path / "weights.pth")
    images = torch.stack([build_dataset("imagenet", cfg, "val")[i][0] for i in range(4)])
    with torch.no_grad():
        model(images)
    depths = model.last_depth[:, 1:]
    varied = depths.std(dim=1).argsort(descending=True)[:2]  # what --most-varied 4 must pick, in this order
    assert len(set(depths.flatten().tolist())) >= 3

    config = tmp_path / "avit.yaml"
    config.write_text("MODEL:\n  NAME: AViTVisionTransformer\n")
    with caplog.at_level("INFO", logger="vitadapt.visualize"):
        rc = load_tool("visualize").main(["--cfg", str(config), "--num-images", "2", "--most-varied", "4",
                                          "TEST.CHECKPOINT_FILE_PATH", str(tmp_path / "weights.pth")] + opts)
    assert rc == 0
    out = tmp_path / "out" / "visualization"
    assert sorted(os.listdir(out)) == [f"image_000{i}{s}.png" for i in range(2) for s in ("", "_depth", "_input")]
    vis = load_tool("visualize")
    hot = vis.hot
    for shown, index in enumerate(varied.tolist()):
        side_by_side = torch.from_numpy(__import__("numpy").array(Image.open(out / f"image_000{shown}.png"))).float()
        scale = 160 // 64  # the tool enlarges 64 px inputs 2x
        size = 64 * scale
        x, y = vis.panel_origins([size] * 3, title_lines=2)[1]  # the middle panel, under its two title lines
        heat = side_by_side[y:y + size, x:x + size]  # the depth map
        centres = heat[8 * scale // 2::8 * scale, 8 * scale // 2::8 * scale].reshape(-1, 3)
        expected = hot((depths[index] - 1) / 3).T * 255
        assert (centres - expected).abs().max() <= 1.0  # every patch coloured by its own token's depth
        assert f"token depth mean {depths[index].mean():.2f}" in caplog.text
