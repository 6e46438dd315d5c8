"""Issue 9, the tools cluster: tools/check_parity.py, tools/visualize.py and tools/benchmark.py as a first-time
user meets them: --help, bad arguments and files (one "error: ..." line, exit 2, no traceback), pictures that
explain themselves, and a clean stderr. Tiny models and generated files; the goldens where present."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import helpers_e2e as h
from vitadapt.models.evit import FUSED_ID
from vitadapt.parity import GOLDEN_KINDS, PARITY_CHECKS, detect_method

GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (h.REPO.parent / "shared" / "golden"))
TOOLS = h.REPO / "tools"


def run_tool(name, *args, env=None):
    """tools/<name>.py ARGS in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, str(TOOLS / f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, timeout=300, cwd=str(h.REPO), env={**os.environ, **(env or {})})


def goldens():
    paths = sorted(GOLDEN_ROOT.glob("*/*.pt"))
    if not paths:
        pytest.skip(f"no golden files under {GOLDEN_ROOT} (set VITADAPT_GOLDEN_DIR)")
    return paths


def kind_of(path) -> str:
    return detect_method(torch.load(path, map_location="cpu", weights_only=True))


def error_lines(text):
    return [line for line in text.splitlines() if line.startswith("error:")]


# ==============================================================================================================
# 1. tools/check_parity.py
# ==============================================================================================================

def test_check_parity_help():
    proc = run_tool("check_parity", "--help")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: check_parity.py") and "not supported yet" in proc.stdout
    assert "exit status" in proc.stdout and proc.stderr == ""


def test_check_parity_on_every_golden_compares_every_file():
    """shared/golden/*/*.pt: every kind of golden file (the five methods and the video backbones) has a parity check;
    every file is compared and matches (exit 0), none is left out as "not supported yet"."""
    paths = goldens()
    kinds = {p: kind_of(p) for p in paths}
    assert set(kinds.values()) == set(PARITY_CHECKS) == set(GOLDEN_KINDS)
    proc = run_tool("check_parity", *paths)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout and "not supported yet" not in proc.stdout
    assert f"all match ({len(paths)} file(s) compared)" in proc.stdout
    assert all(f"{p}\n" in proc.stdout + "\n" for p in paths)
    assert proc.stderr == ""


def test_check_parity_lists_unsupported_kinds_apart_and_nothing_compared_is_an_error(tmp_path, monkeypatch,
                                                                                      capsys):
    """A kind of golden file without a parity check (simulated: the video check taken out) is listed as not
    supported, one line per file plus a summary, never counted as a match; with nothing else compared the exit
    status is 2 with one error line. A folder stands for its .pt files."""
    video = [p for p in goldens() if kind_of(p) == "video"]
    if not video:
        pytest.skip("no video golden files")
    others = [p for p in goldens() if kind_of(p) == "evit"][:1]
    import vitadapt.parity as parity

    monkeypatch.delitem(parity.PARITY_CHECKS, "video")
    main = h.load_tool("check_parity").main
    assert main([str(video[0].parent)] + list(map(str, others))) == 0  # the EViT file still compares and matches
    out = capsys.readouterr().out
    for p in video:
        assert f"{p}: not supported yet ({GOLDEN_KINDS['video']} golden file), not compared" in out
    assert f"not supported yet, not compared: {len(video)} file(s)" in out and "all match (1 file(s) compared)" in out
    assert main([str(video[0].parent)]) == 2
    captured = capsys.readouterr()
    supported = ", ".join(GOLDEN_KINDS[k] for k in parity.PARITY_CHECKS)
    assert error_lines(captured.err) == [f"error: nothing compared: vitadapt has parity checks for {supported} "
                                         "golden files only"]
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2


def _not_goldens(tmp_path):
    """{name: (path, the problem the error line must name)} for files that are not golden files."""
    files = {}

    def add(name, problem, write=None):
        path = tmp_path / f"{name}.pt"
        if write is not None:
            write(path)
        files[name] = (path, problem)

    add("zero_bytes", "empty file (0 bytes)", lambda p: p.write_bytes(b""))
    add("pickled_list", "not a golden file: holds a list, not a dict", lambda p: torch.save([1, 2, 3], p))
    add("random_bytes", "not a torch.save file", lambda p: p.write_bytes(np.random.RandomState(0).bytes(300)))
    add("text", "not a torch.save file", lambda p: p.write_text("hello"))
    add("no_config", "not a golden file: no 'config' dict", lambda p: torch.save({"input": torch.zeros(1)}, p))
    add("unknown_config", "cannot tell which method", lambda p: torch.save({"config": {"x": 1}}, p))
    ats = {"config": {"ats_blocks": [1]}, "input": torch.zeros(1, 3, 32, 32), "state_dict": {}}
    add("no_input", "not a complete ATS golden file: no 'input' entry",
        lambda p: torch.save({k: v for k, v in ats.items() if k != "input"}, p))
    add("no_state_dict", "not a complete ATS golden file: no 'state_dict' entry",
        lambda p: torch.save({k: v for k, v in ats.items() if k != "state_dict"}, p))
    add("missing", "no such file")
    return files


def test_check_parity_names_each_file_that_is_not_a_golden(tmp_path, capsys):
    """One line per bad file, naming it and the problem, exit 2; in-process and as a user runs it."""
    main = h.load_tool("check_parity").main
    files = _not_goldens(tmp_path)
    for name, (path, problem) in files.items():
        capsys.readouterr()
        assert main([str(path)]) == 2, name
        out, err = capsys.readouterr()
        assert out == "" and len(err.splitlines()) == 1, (name, out, err)
        assert err.startswith(f"error: {path}: ") and problem in err, (name, err)
    proc = run_tool("check_parity", *(p for p, _ in files.values()))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(error_lines(proc.stderr)) == len(files) + 1
    assert error_lines(proc.stderr)[-1] == f"error: {len(files)} path(s) could not be checked (see above)"


def test_check_parity_golden_with_entries_that_do_not_fit_its_config(tmp_path, capsys):
    path = GOLDEN_ROOT / "evit" / "golden_dev.pt"
    golden = h.load_golden_or_skip(path)
    golden["input"] = torch.zeros(2, 3, 50, 50)  # 50 px: not a multiple of the 16 px patches of its config
    torch.save(golden, tmp_path / "g.pt")
    assert h.load_tool("check_parity").main([str(tmp_path / "g.pt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'g.pt'}: its entries do not fit its 'config' (AssertionError: ")
    assert len(err.splitlines()) == 1


# ==============================================================================================================
# 2. tools/visualize.py: arguments, data and model errors
# ==============================================================================================================

def vis_opts(data, out, model="ATSVisionTransformer", **extra):
    opts = h.tiny_opts(data, out, MODEL__NAME=model, **extra)
    if model == "ATSVisionTransformer":
        opts += ["ATS.BLOCKS", "[1]"]
    if model == "AViTVisionTransformer":
        opts += ["AVIT.PRIOR_TARGET_DEPTH", "1"]
    return opts


@pytest.fixture(scope="module")
def vis():
    return h.load_tool("visualize")


@pytest.mark.parametrize("value, message", [("0", "must be at least 1, got 0"), ("-3", "must be at least 1, got -3"),
                                            ("x", "not an integer: 'x'")])
def test_visualize_refuses_a_bad_num_images(vis, image_folder, tmp_path, capsys, value, message):
    with pytest.raises(SystemExit) as e:
        vis.main(["--cfg", "", "--num-images", value, "--init", "sharpened"] + vis_opts(image_folder, tmp_path))
    assert e.value.code == 2
    assert f"error: argument --num-images: {message}" in capsys.readouterr().err


def test_visualize_refuses_a_mistyped_option(vis, capsys):
    with pytest.raises(SystemExit) as e:
        vis.main(["--cfg", "", "--nmu-images", "3"])
    assert e.value.code == 2 and "error: unrecognized argument: --nmu-images" in capsys.readouterr().err


def test_visualize_all_images_undecodable(vis, tmp_path, capsys):
    """Every val image corrupt: one line naming TEST.SPLIT and the folder (it crashed in torch.stack)."""
    data = h.make_image_folder(tmp_path / "data", train_counts=(1, 1, 1), val_counts=(1, 1, 1))
    for png in (data / "val").rglob("*.png"):
        png.write_bytes(b"not a png")
    rc = vis.main(["--cfg", "", "--init", "sharpened"] + vis_opts(data, tmp_path / "out"))
    assert rc == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: no image of TEST.SPLIT 'val' could be decoded: 3 tried in {data / 'val'}, all failed "
        "(see the warnings above)"]


@pytest.mark.parametrize("data_dir, message", [
    ("", "DATA.PATH_TO_DATA_DIR is empty; point it at the data set folder"),
    ("/no/such/folder", "DATA.PATH_TO_DATA_DIR does not exist: /no/such/folder")])
def test_a_missing_data_folder_reads_the_same_in_every_tool(vis, tmp_path, capsys, run_net, data_dir, message):
    """visualize, benchmark --data and run_net: the same line, naming the key (visualize said 'no class folders
    found under /train')."""
    opts = vis_opts(data_dir, tmp_path / "out")
    assert vis.main(["--cfg", "", "--init", "sharpened"] + opts) == 2
    from_visualize = error_lines(capsys.readouterr().err)
    assert h.load_tool("benchmark").main(["--cfg", "", "--data"] + opts) == 2
    from_benchmark = error_lines(capsys.readouterr().err)
    assert run_net(["--cfg", "", "TRAIN.ENABLE", "False"] + opts) == 2
    from_run_net = error_lines(capsys.readouterr().err)
    assert from_visualize == from_benchmark == from_run_net == [f"error: {message}"]


def test_visualize_most_varied_needs_a_halting_model(vis, image_folder, tmp_path, capsys):
    assert vis.main(["--cfg", "", "--init", "sharpened", "--most-varied", "5"] + vis_opts(image_folder, tmp_path)) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: --most-varied picks images by how much their token depths vary: it needs a token-halting model "
        "(A-ViT), and MODEL.NAME ATSVisionTransformer has no token depths"]
    opts = vis_opts(image_folder, tmp_path, model="AViTVisionTransformer")
    assert vis.main(["--cfg", "", "--init", "halting", "--most-varied", "2", "--num-images", "3"] + opts) == 2
    assert "error: --most-varied 2 must be at least --num-images (3)" in capsys.readouterr().err


def test_visualize_model_without_token_ids(vis, image_folder, tmp_path, capsys, monkeypatch):
    class NoTrace(torch.nn.Module):  # e.g. a future model that does not implement trace_token_ids
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x.mean((2, 3)))

    monkeypatch.setattr(vis, "build_model", lambda cfg: NoTrace())
    assert vis.main(["--cfg", "", "--init", "sharpened"] + vis_opts(image_folder, tmp_path)) == 2
    assert error_lines(capsys.readouterr().err) == [
        "error: MODEL.NAME ATSVisionTransformer does not record which tokens each block keeps (trace_token_ids): "
        "there is nothing to draw"]


def test_visualize_output_folder_and_weights_errors(vis, image_folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert vis.main(["--cfg", "", "--init", "sharpened"] + vis_opts(image_folder, blocker)) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: the picture folder OUTPUT_DIR/visualization cannot be created or written: {blocker}/visualization "
        "(Not a directory)"]
    assert vis.main(["--cfg", ""] + vis_opts(image_folder, tmp_path / "empty_run")) == 2
    err = capsys.readouterr().err
    assert "refusing to evaluate random weights" in err and err.rstrip().endswith("--init sharpened)")


# ==============================================================================================================
# 3. tools/visualize.py: pictures that explain themselves
# ==============================================================================================================

def test_render_titles_count_the_kept_patches(vis):
    """Grid 2x2, ids 1..4 (0 = CLS, -1 = empty slot): a panel only where the kept set changes, titled with its
    block and the patches kept (+ the fused token); dropped pixels faded, kept ones untouched."""
    image = torch.rand(3, 8, 8)
    ids = [torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 1, 3, -1, -1]), torch.tensor([0, 3, 1, -1, -1]),
           torch.tensor([0, 3, FUSED_ID, -1, -1])]
    panels, titles, changes = vis.render(image, ids, (2, 2), 4)
    assert titles == [["input", "4 patches"], ["after block 1", "2/4 kept"], ["after block 3", "1/4 kept + 1 fused"]]
    assert changes == [(1, 3, False), (3, 2, True)]  # CLS included, for the log line
    assert torch.equal(panels[1][:, :4, :4], image[:, :4, :4])  # patch 1 (top left) kept
    assert not torch.equal(panels[1][:, :4, 4:], image[:, :4, 4:])  # patch 2 dropped
    fused_rows = panels[2][:, :4, :4].reshape(3, -1)  # patch 1 dropped into the fused token: tinted blue
    assert (fused_rows[2] > fused_rows[0]).all()
    assert [t for _, t in vis.drop_legend([False, True], 4)] == ["kept: as in the input", "dropped",
                                                                 "dropped, merged into 1 fused token"]
    assert [t for _, t in vis.drop_legend([], 4)] == ["no block dropped a token: all 4 patches kept"]


def dark(region: np.ndarray) -> int:
    return int((region.min(axis=-1) < 128).sum())


def test_visualize_pictures_have_titles_with_kept_counts_and_a_legend(vis, image_folder, tmp_path, monkeypatch):
    """The real tool on a tiny ATS model: every panel has a title strip with text above it, giving the kept
    count that the model reports for that image, and a legend strip below; 32 px inputs are enlarged to 160."""
    drawn = []
    compose = vis.compose
    monkeypatch.setattr(vis, "compose", lambda panels, titles, *a: drawn.append(titles) or compose(panels, titles, *a))
    opts = vis_opts(image_folder, tmp_path / "out")
    assert vis.main(["--cfg", "", "--init", "sharpened", "--num-images", "2"] + opts) == 0
    from vitadapt.config import load_config
    from vitadapt.datasets import build_dataset
    from vitadapt.models import build_model
    from vitadapt.models.synthetic import sharpen_

    cfg = load_config("", opts)
    model = sharpen_(build_model(cfg).eval())
    model.trace_token_ids = True
    with torch.no_grad():
        model(torch.stack([build_dataset("imagenet", cfg, "val")[i][0] for i in range(2)]))
    for i, titles in enumerate(drawn):
        kept = int((model.last_token_ids[1][i] > 0).sum())  # ATS.BLOCKS [1]: the patches kept after block 1
        assert titles == [["input", "16 patches"], ["after block 1", f"{kept}/16 kept"]], titles
        picture = np.asarray(Image.open(tmp_path / "out" / "visualization" / f"image_000{i}.png").convert("RGB"))
        (x0, y0), (x1, _) = vis.panel_origins([160, 160], title_lines=2)
        assert y0 > 20 and x1 - x0 == 160 + vis.PAD
        for x in (x0, x1):
            assert dark(picture[:y0, x:x + 160]) > 30  # title text above each panel
        assert picture.shape[0] > y0 + 160 + 10 and dark(picture[y0 + 161:]) > 30  # the legend below
        assert picture.shape[1] == x1 + 160 + vis.PAD


def test_avit_depth_pictures_carry_a_labelled_colour_bar(vis, tmp_path):
    assert vis.depth_ticks(4) == [1, 2, 3, 4]
    assert vis.depth_ticks(12) == [1, 2, 4, 6, 8, 10, 12]
    assert vis.depth_ticks(24) == [1, 3, 6, 9, 12, 15, 18, 21, 24]
    bar = np.asarray(vis.depth_colour_bar(160, 4)).astype(float)
    for d in range(1, 5):  # one band per depth, coloured as the depth map colours that depth
        y = int((4 - d + 0.5) * 160 / 4)
        assert np.abs(bar[y, vis.SWATCH // 2] - vis.hot(torch.tensor((d - 1) / 3)).numpy() * 255).max() <= 1
    assert dark(bar[:, vis.SWATCH + 3:]) > 40  # tick labels and the rotated title
    depth = torch.tensor([1, 2, 3, 4] * 4)
    path = vis.save_depth_pictures(str(tmp_path), 0, torch.rand(3, 32, 32), depth, (4, 4), 8, 4)
    side_by_side = np.asarray(Image.open(path).convert("RGB"))
    x, y = vis.panel_origins([160] * 3, title_lines=2)[2]
    assert side_by_side.shape[1] == x + 160 + vis.PAD + bar.shape[1] + vis.PAD  # the bar right of the panels
    assert dark(side_by_side[:y]) > 60  # the three titles
    assert Image.open(tmp_path / "image_0000_depth.png").size == (vis.PAD + 160 + vis.PAD + bar.shape[1] + vis.PAD,
                                                                  side_by_side.shape[0])


# ==============================================================================================================
# 4. tools/benchmark.py
# ==============================================================================================================

BENCH = ["BENCHMARK.BATCH_SIZES", "[2]", "BENCHMARK.NUM_REPEATS", "1", "BENCHMARK.ITERS_PER_REPEAT", "1",
         "BENCHMARK.WARMUP_ITERS", "0"]


def test_benchmark_on_cpu_has_a_clean_stderr_and_full_config_names(image_folder, tmp_path):
    """No profiler noise (kineto's 'gpuGetDeviceCount failed', 'USDT ... profiler_start', c10's 'CPUAllocator ...
    unknown size') on a CPU-only machine, the peak memory still measured, and the config named in full even when
    its path is longer than the old 44-character column."""
    long_dir = tmp_path / ("a_long_folder_name_" * 3)
    long_dir.mkdir()
    cfg = long_dir / "dense.yaml"
    cfg.write_text("MODEL:\n  NAME: VisionTransformer\n")
    assert len(str(cfg)) > 44
    proc = run_tool("benchmark", "--cfg", cfg, "--out", tmp_path / "b.json",
                    *h.tiny_opts(image_folder, tmp_path / "out"), *BENCH, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stderr
    for noise in ("gpuGetDeviceCount", "USDT", "CPUAllocator", "unknown size", "profiler"):
        assert noise not in proc.stderr, proc.stderr
    rows = [line for line in proc.stdout.splitlines() if line.startswith(str(cfg))]
    assert len(rows) == 1 and float(rows[0].split()[-1]) > 0  # peak MiB


def test_benchmark_table_tells_apart_configs_with_the_same_tail(capsys):
    bench = h.load_tool("benchmark")
    row = {"params_m": 1.0, "gmacs_mean": 1.0, "gmacs_fvcore_first_image": 1.0,
           "results": [{"batch": 1, "gmacs_mean": 1.0, "images_per_s": 1.0, "peak_mem_mib": 1.0}]}
    names = ["/runs/" + "x" * 50 + "/A/configs/ImageNet/EViT/EViT_DeiT_S_keep0.7.yaml",
             "/runs/" + "x" * 50 + "/B/configs/ImageNet/EViT/EViT_DeiT_S_keep0.7.yaml"]
    bench.print_table({"device": "cpu", "threads": 1, "torch": "x", "repeats": 1, "iters_per_repeat": 1,
                       "warmup_iters": 0, "models": [{"cfg": n, **row} for n in names]})
    out = capsys.readouterr().out
    assert all(any(line.startswith(n + " ") for line in out.splitlines()) for n in names), out


@pytest.fixture
def never_measure(monkeypatch):
    """The tool module, with measuring made to fail: what a test expects must happen before any measurement."""
    bench = h.load_tool("benchmark")

    def refuse(*args, **kwargs):
        raise AssertionError("the benchmark started measuring")

    monkeypatch.setattr(bench, "Subject", refuse)
    return bench


def test_benchmark_checks_out_before_measuring(never_measure, image_folder, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    opts = h.tiny_opts(image_folder, tmp_path / "out") + BENCH
    assert never_measure.main(["--cfg", "", "--out", str(blocker / "x.json")] + opts) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: --out {blocker}/x.json (its folder) cannot be created or written: {blocker} (Not a directory)"]
    assert never_measure.main(["--cfg", "", "--out", str(tmp_path)] + opts) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: --out {tmp_path} is a folder, not a file: {tmp_path}"]
    opts = h.tiny_opts(image_folder, blocker / "run") + BENCH  # the default report: OUTPUT_DIR/benchmark.json
    assert never_measure.main(["--cfg", ""] + opts) == 2
    assert f"report file {blocker}/run/benchmark.json" in capsys.readouterr().err


def test_benchmark_checks_configs_and_files_before_measuring(never_measure, image_folder, tmp_path, capsys):
    opts = h.tiny_opts(image_folder, tmp_path / "out") + BENCH
    assert never_measure.main(["--cfg", "", "--compare", str(tmp_path / "nope.yaml")] + opts) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: config file not found: {tmp_path / 'nope.yaml'}"]
    missing = tmp_path / "nope.pth"
    assert never_measure.main(["--cfg", "", "TEST.CHECKPOINT_FILE_PATH", str(missing)] + opts) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: TEST.CHECKPOINT_FILE_PATH does not exist: {missing}"]
    with pytest.raises(SystemExit) as e:
        never_measure.main(["--cfg", "", "--comapre", "b.yaml"] + opts)
    assert e.value.code == 2 and "error: unrecognized argument: --comapre" in capsys.readouterr().err


def test_benchmark_data_fills_every_batch_and_refuses_an_undecodable_split(tmp_path, capsys):
    """--data: undecodable images are skipped and the batch filled with the decodable ones (it silently shrank);
    none decodable is an error naming the split and folder."""
    from vitadapt.config import load_config

    bench = h.load_tool("benchmark")
    data = h.make_image_folder(tmp_path / "data", train_counts=(1, 1, 1), val_counts=(2, 1, 1))
    first = sorted((data / "val").rglob("*.png"))[0]
    first.write_bytes(b"not a png")
    cfg = load_config("", h.tiny_opts(data, tmp_path / "out"))
    assert bench.make_inputs(cfg, 5, True).shape == (5, 3, 32, 32)
    for png in (data / "val").rglob("*.png"):
        png.write_bytes(b"not a png")
    opts = h.tiny_opts(data, tmp_path / "o") + BENCH
    assert bench.main(["--cfg", "", "--data", "--out", str(tmp_path / "b.json")] + opts) == 2
    assert error_lines(capsys.readouterr().err) == [
        f"error: --data: no image of TEST.SPLIT 'val' could be decoded: 4 tried in {data / 'val'}, all failed "
        "(see the warnings above)"]
