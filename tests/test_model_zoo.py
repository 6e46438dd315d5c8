"""The model zoo as data (configs/model_zoo.yaml, vitadapt/zoo.py) and tools/model_zoo.py: the manifest validates,
the tool evaluates the rows whose files are present exactly as tools/run_net.py tests them (a tiny DeiT in the
official DeiT layout on a generated ImageNet folder; a tiny TimeSformer in the official layout on generated
Kinetics-format videos), refuses a file whose hash is not the release's, lists missing files and rows without data,
and writes the published numbers and deltas; MODEL_ZOO.md's section is what the generator writes."""

import contextlib
import hashlib
import io
import json
import os
import re
from pathlib import Path

import pytest
import torch
import yaml

import helpers_e2e as h
from vitadapt import zoo
from vitadapt.api import model_name

MANIFEST = h.REPO / "configs" / "model_zoo.yaml"
DEIT_S = str(h.REPO / "configs" / "ImageNet" / "DeiT_S.yaml")
TIMESFORMER = str(h.REPO / "configs" / "Kinetics" / "TimeSformer_divST_8x32_224.yaml")
# DeiT_S.yaml shrunk to helpers_e2e's tiny ViT (what h.reference_logits builds in timm), for the generated images.
TINY_DEIT = {"MODEL.NUM_CLASSES": 3, "VIT.PATCH_SIZE": 8, "VIT.EMBED_DIM": 48, "VIT.DEPTH": 2, "VIT.NUM_HEADS": 3,
             "DATA.TRAIN_CROP_SIZE": 32, "DATA.TEST_CROP_SIZE": 32, "DATA.MEAN": [0.5] * 3, "DATA.STD": [0.5] * 3}
# TimeSformer_divST_8x32_224.yaml shrunk to one block on 4-frame clips of 32 px (its 1 x 3 test views kept).
TINY_TIMESFORMER = {"MODEL.NUM_CLASSES": 2, "VIT.EMBED_DIM": 24, "VIT.DEPTH": 1, "VIT.NUM_HEADS": 2,
                    "DATA.TRAIN_CROP_SIZE": 32, "DATA.TEST_CROP_SIZE": 32, "DATA.TRAIN_JITTER_SCALES": [32, 40],
                    "DATA.NUM_FRAMES": 4, "DATA.SAMPLING_RATE": 2, "DATA.TARGET_FPS": 8}
# KEY VALUE overrides given to the tool (and to run_net) for every row.
CPU_RUN = ["NUM_GPUS", "0", "DATA_LOADER.NUM_WORKERS", "0", "DATA_LOADER.PIN_MEMORY", "False", "LOG_MODEL_INFO",
           "False", "TEST.BATCH_SIZE", "4"]


def as_opts(overrides: dict) -> list:
    return [part for key, value in overrides.items() for part in (key, str(value))]


def row(name: str, file: str, config: str, overrides: dict, dataset: str = "imagenet", hash=None, published=None,
        **extra) -> dict:
    """A manifest row (as YAML would give it) with every required field; its model is its config's name."""
    entry = {"name": name, "file": file, "file_from_release": True, "url": "https://example.org/" + file,
             "hash": hash, "config": config, "model": model_name(Path(config).stem), "overrides": overrides,
             "dataset": dataset,
             "published": published or {"top1": None, "top5": None, "gmacs": None}, "source": "a test"}
    if dataset == "kinetics":
        entry["views"] = "1x3"
    return {**entry, **extra}


def write_manifest(path, rows) -> str:
    path.write_text(yaml.safe_dump({"rows": rows}, sort_keys=False))
    return str(path)


def run_tool(*argv):
    """tools/model_zoo.py's main in this process: (return code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = h.load_tool("model_zoo").main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


def run_net_test(cfg: str, overrides: dict, checkpoint, data, output_dir) -> dict:
    """The test_final record of `tools/run_net.py --cfg cfg ... TRAIN.ENABLE False TEST.CHECKPOINT_FILE_PATH ...`."""
    argv = ["--cfg", cfg] + as_opts(overrides) + CPU_RUN + [
        "TRAIN.ENABLE", "False", "TEST.CHECKPOINT_FILE_PATH", str(checkpoint), "DATA.PATH_TO_DATA_DIR", str(data),
        "OUTPUT_DIR", str(output_dir)]
    assert h.load_run_net().main(argv) == 0
    (final,) = h.records(output_dir, "test_final")
    return final


def save_with_hash_name(obj, folder, stem: str):
    """torch.save(obj) as folder/<stem>-<first 8 hex digits of its sha256>.pth (the DeiT / torch.hub naming)."""
    folder.mkdir(exist_ok=True)
    tmp = folder / "unnamed.pth"
    torch.save(obj, tmp)
    digest = h.sha256(tmp)
    path = folder / f"{stem}-{digest[:8]}.pth"
    tmp.rename(path)
    return path, digest


# ================================================================================= the shipped manifest
def test_manifest_rows_validate_and_their_configs_load():
    rows = zoo.load_manifest(str(MANIFEST))
    zoo.check_configs(rows)  # every config loads with its overrides and matches the row's data set and views
    names = [r.name for r in rows]
    assert len(set(names)) == len(names)
    # The ten EViT releases are ten different models: every keep rate 0.9..0.5 with and without fusion, once.
    evit = [zoo.load_row_config(r) for r in rows if r.name.startswith("evit_")]
    combos = [(round(cfg.EVIT.KEEP_RATE, 2), cfg.EVIT.FUSE_TOKEN) for cfg in evit]
    assert sorted(combos) == sorted((k, f) for k in (0.5, 0.6, 0.7, 0.8, 0.9) for f in (True, False))
    # Every family of the issue has rows: DeiT, EViT, A-ViT, AdaViT, DVT, TimeSformer, XViT, ATS on images and video.
    models = {zoo.load_row_config(r).MODEL.NAME for r in rows}
    assert {"VisionTransformer", "EViTVisionTransformer", "AViTVisionTransformer", "AdaViTVisionTransformer",
            "AdaViTT2TViT", "DVT", "TimeSformer", "XViT", "ATSVisionTransformer", "ATSTimeSformer",
            "ATSXViT"} <= models


def test_manifest_hashes_follow_the_file_names_and_shared_files_agree():
    rows = zoo.load_manifest(str(MANIFEST))
    named = [(r, re.fullmatch(r".*-([0-9a-f]{8})\.pth", r.file)) for r in rows]
    named = [(r, m.group(1)) for r, m in named if m]
    assert len(named) == 6  # DeiT-Ti/S/B, and ATS on each
    for r, prefix in named:  # torch.hub: name-<first 8 hex digits of the sha256>.pth
        assert r.hash == f"sha256:{prefix}", r.name
    by_file = {}
    for r in rows:
        by_file.setdefault(r.file, set()).add((r.url, r.hash))
    assert all(len(v) == 1 for v in by_file.values()), {f: v for f, v in by_file.items() if len(v) > 1}


def test_deit_rows_publish_gmacs_of_one_source_that_vitadapts_count_rounds_to():
    from vitadapt.models import build_model, input_shape

    rows = [r for r in zoo.load_manifest(str(MANIFEST)) if r.name.startswith("deit_")]
    assert [r.name for r in rows] == ["deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
    for r in rows:
        assert f"timm's model card timm/{r.name}.fb_in1k" in r.source, r.name
        cfg = zoo.load_row_config(r)
        model = build_model(cfg).eval()
        with torch.no_grad():
            model(torch.zeros(input_shape(cfg)))
        # The cards give one decimal: vitadapt's count of the same architecture rounds to it.
        assert r.published["gmacs"] == pytest.approx(model.macs_per_image().item() / 1e9, abs=0.05), r.name


def test_model_zoo_md_section_is_what_the_manifest_generates(tmp_path):
    text = (h.REPO / "MODEL_ZOO.md").read_text()
    rows = zoo.load_manifest(str(MANIFEST))
    section = zoo.doc_section(rows, str(h.REPO))
    assert zoo.replace_doc_section(text, section, "MODEL_ZOO.md") == text, \
        "MODEL_ZOO.md's 'Official checkpoints' section is stale: run python tools/model_zoo.py --write-doc"
    for r in rows:
        line = next(line for line in section.splitlines() if line.startswith(f"| {r.name} | [`{r.file}`]({r.url})"))
        assert f" | `{r.model}` | `{os.path.relpath(r.config, h.REPO)}`" in line  # create_model's name, by its config
    # --write-doc puts a stale section back in order, and touches nothing outside it.
    stale = tmp_path / "MODEL_ZOO.md"
    stale.write_text(text.replace(f"| {rows[0].name} |", "| renamed_by_hand |"))
    assert run_tool("--write-doc", "--doc", stale)[0] == 0
    assert stale.read_text() == text
    stale.write_text(text.replace(zoo.DOC_END, ""))
    code, _, err = run_tool("--write-doc", "--doc", stale)
    assert code == 2 and str(stale) in err and "model_zoo.yaml: end" in err


# ============================================================================ validation of a manifest
@pytest.mark.parametrize("change, needles", [
    (lambda r: r.pop("source"), ["row 1 (tiny)", "'source' is missing"]),
    (lambda r: r.pop("model"), ["row 1 (tiny)", "'model' is missing"]),
    (lambda r: r.update(sha="x"), ["unknown field", "sha"]),
    (lambda r: r.update(hash="sha256:CD65A155"), ["'hash'", "CD65A155"]),
    (lambda r: r.update(hash="md5:0123abcd"), ["'hash'", "md5:0123abcd"]),
    (lambda r: r.update(dataset="imagenet21k"), ["'dataset'", "imagenet21k"]),
    (lambda r: r.update(views="1x3"), ["'views'", "image row"]),
    (lambda r: r.update(dataset="kinetics"), ["'views'", "video row", "got None"]),
    (lambda r: r["published"].update(top1=150.0), ["'published'", "150.0"]),
    (lambda r: r["published"].pop("gmacs"), ["'published'", "gmacs"]),
    (lambda r: r.update(file="sub/x.pth"), ["'file'", "sub/x.pth"]),
    (lambda r: r.update(file_from_release="yes"), ["'file_from_release'", "true or false"]),
    (lambda r: r.update(gmacs_stat="gmacs_p95"), ["'gmacs_stat'", "gflops_official_mean"]),
])
def test_malformed_rows_are_refused_naming_row_and_field(tmp_path, change, needles):
    entry = row("tiny", "a.pth", DEIT_S, {})
    change(entry)
    with pytest.raises(zoo.ManifestError) as info:
        zoo.load_manifest(write_manifest(tmp_path / "zoo.yaml", [entry]))
    assert str(tmp_path / "zoo.yaml") in str(info.value)
    for needle in needles:
        assert needle in str(info.value)


def test_duplicate_names_and_configs_that_do_not_fit_are_refused(tmp_path):
    with pytest.raises(zoo.ManifestError, match="'twice' is used twice"):
        zoo.load_manifest(write_manifest(tmp_path / "a.yaml", [row("twice", "a.pth", DEIT_S, {})] * 2))
    for entry, needles in [
        (row("gone", "a.pth", "ImageNet/Nope.yaml", {}), ["row gone", "config file not found", "Nope.yaml"]),
        (row("typo", "a.pth", DEIT_S, {"VIT.NOPE": 1}), ["row typo", "VIT.NOPE"]),
        (row("video", "a.pth", DEIT_S, {}, dataset="kinetics"), ["row video", "TEST.DATASET imagenet"]),
        (row("views", "a.pyth", TIMESFORMER, {}, dataset="kinetics", views="1x5"), ["row views", "tests 1x3"]),
        (row("typo_model", "a.pth", DEIT_S, {}, model="deit_smal_patch16_224"),
         ["row typo_model", "unknown model name 'deit_smal_patch16_224'", "deit_small_patch16_224"]),
        (row("other_model", "a.pth", DEIT_S, {}, model="deit_tiny_patch16_224"),
         ["row other_model", "'deit_tiny_patch16_224' is built from", "DeiT_Ti.yaml", "DeiT_S.yaml"]),
    ]:
        rows = zoo.load_manifest(write_manifest(tmp_path / "b.yaml", [entry]))
        with pytest.raises(zoo.ManifestError) as info:
            zoo.check_configs(rows)
        assert all(n in str(info.value) for n in needles), (needles, str(info.value))


def test_select_by_glob_or_regex():
    rows = zoo.load_manifest(str(MANIFEST))
    assert [r.name for r in zoo.select(rows, "deit_*")] == [
        "deit_tiny_patch16_224", "deit_small_patch16_224", "deit_base_patch16_224"]
    assert {r.name for r in zoo.select(rows, "dvt_*,xvit_*")} == {
        "dvt_t2t_vit_12", "dvt_t2t_vit_14", "dvt_deit_small", "xvit_b16_16x224_k600", "xvit_b16_16x224_k600_2clips"}
    assert {r.name for r in zoo.select(rows, r"re:keep0\.5")} == {"evit_deit_small_keep0.5",
                                                                   "evit_deit_small_keep0.5_nofuse"}
    with pytest.raises(zoo.ManifestError, match="'nothing_\\*' matches no row"):
        zoo.select(rows, "nothing_*")


def test_check_hash_accepts_prefix_and_full_digests_and_caches_them(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"vitadapt" * 1000)
    sha, md5 = hashlib.sha256(path.read_bytes()).hexdigest(), hashlib.md5(path.read_bytes()).hexdigest()
    digests = {}
    zoo.check_hash(str(path), f"sha256:{sha[:8]}", digests)
    zoo.check_hash(str(path), f"sha256:{sha}", digests)
    zoo.check_hash(str(path), f"md5:{md5}", digests)
    with pytest.raises(zoo.HashMismatch) as info:
        zoo.check_hash(str(path), f"md5:{'0' * 32}", digests)
    assert str(path) in str(info.value) and "0" * 32 in str(info.value) and md5 in str(info.value)
    path.unlink()  # rows sharing a file hash it once
    zoo.check_hash(str(path), f"sha256:{sha[:8]}", digests)


# ================================================================================ tools/model_zoo.py
@pytest.fixture(scope="module")
def image_zoo(tmp_path_factory):
    """A weights folder (a tiny DeiT in the official layout, named with its sha256 prefix; a damaged copy under a
    name claiming the same hash), an ImageNet folder, a manifest of four rows, and one run of the tool on them."""
    root = tmp_path_factory.mktemp("zoo")
    data = h.make_image_folder(root / "imagenet")
    # Weights drawn wide enough that predictions differ between images (seed 1: 5 of the 7 val images right, two
    # classes predicted), so that the top-1 comparisons below can tell a wrong evaluation from a right one.
    torch.manual_seed(1)
    model = h.timm_vit()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    state = model.state_dict()
    weights = root / "weights"
    good, digest = save_with_hash_name({"model": state}, weights, "deit_tiny_test")
    damaged = weights / f"deit_damaged-{digest[:8]}.pth"
    content = bytearray(good.read_bytes())
    content[len(content) // 2] ^= 0xFF
    damaged.write_bytes(bytes(content))
    published = {"top1": 50.0, "top5": None, "gmacs": 0.01}
    manifest = write_manifest(root / "zoo.yaml", [
        row("tiny_deit", good.name, DEIT_S, TINY_DEIT, hash=f"sha256:{digest[:8]}", published=published),
        row("tiny_deit_damaged", damaged.name, DEIT_S, TINY_DEIT, hash=f"sha256:{digest[:8]}"),
        row("tiny_deit_missing", "absent-0123abcd.pth", DEIT_S, TINY_DEIT),
        row("tiny_timesformer", "absent.pyth", TIMESFORMER, TINY_TIMESFORMER, dataset="kinetics")])
    out = root / "out"
    code, stdout, stderr = run_tool("--manifest", manifest, "--weights", weights, "--imagenet", data, "--out", out,
                                    *CPU_RUN)
    results = json.loads((out / "model_zoo.json").read_text())
    return dict(root=root, data=data, state=state, good=good, damaged=damaged, digest=digest, out=out, code=code,
                stdout=stdout, stderr=stderr, results={r["name"]: r for r in results["rows"]},
                markdown=(out / "model_zoo.md").read_text())


def test_tool_reproduces_what_run_net_tests_on_the_same_checkpoint(image_zoo, tmp_path):
    z = image_zoo
    result = z["results"]["tiny_deit"]
    assert result["status"] == "evaluated", result
    reference = run_net_test(DEIT_S, TINY_DEIT, z["good"], z["data"], tmp_path / "run_net")
    assert result["reproduced"] == {"top1": reference["top1_acc"], "top5": reference["top5_acc"],
                                 "gmacs": reference["gmacs_mean"]}
    # And independently of vitadapt: timm's VisionTransformer with the same weights on the same images.
    images = h.list_split(z["data"], "val")
    expected = h.top1(h.reference_logits(z["state"], [p for p, _ in images]), [label for _, label in images])
    assert result["reproduced"]["top1"] == pytest.approx(expected, abs=1e-3) and 0 < expected < 100
    assert (z["out"] / "runs" / "tiny_deit" / "json_stats.log").is_file()


def test_tool_outputs_hold_published_numbers_and_deltas(image_zoo):
    z = image_zoo
    result = z["results"]["tiny_deit"]
    top1, gmacs = result["reproduced"]["top1"], result["reproduced"]["gmacs"]
    assert result["published"] == {"top1": 50.0, "top5": None, "gmacs": 0.01}
    assert result["delta"]["top1"] == pytest.approx(top1 - 50.0) and result["delta"]["top5"] is None
    assert result["delta"]["gmacs"] == pytest.approx(gmacs - 0.01)
    line = next(line for line in z["markdown"].splitlines() if line.startswith("| tiny_deit |"))
    assert f"{top1:.2f} / 50.0 ({top1 - 50.0:+.2f})" in line
    assert f"{gmacs:.3f} / 0.01 ({gmacs - 0.01:+.3f})" in line
    assert f"| {result['reproduced']['top5']:.2f} / - |" in line
    assert f"[model_zoo 1/4] tiny_deit: top-1 {top1:.2f} (published 50.0, delta {top1 - 50.0:+.2f})" in z["stdout"]


def test_damaged_file_fails_its_row_naming_file_and_hashes_and_the_run_goes_on(image_zoo):
    z = image_zoo
    assert z["code"] == 1  # a row failed
    result = z["results"]["tiny_deit_damaged"]
    actual = h.sha256(z["damaged"])
    assert result["status"] == "failed" and result["reproduced"] == {}
    for text in (result["reason"], z["stderr"]):
        assert str(z["damaged"]) in text and f"sha256 {z['digest'][:8]}" in text and actual in text
    assert not (z["out"] / "runs" / "tiny_deit_damaged").exists()  # refused before anything was loaded
    # The rows after it were still handled.
    assert z["results"]["tiny_deit_missing"]["status"] == "not found"
    assert "tiny_deit_damaged | failed |" in z["markdown"]


def test_missing_files_and_rows_without_data_are_listed(image_zoo):
    z = image_zoo
    missing, video = z["results"]["tiny_deit_missing"], z["results"]["tiny_timesformer"]
    assert missing["status"] == "not found" and "absent-0123abcd.pth" in missing["reason"]
    assert video["status"] == "skipped" and "--kinetics" in video["reason"]
    assert "[model_zoo 3/4] tiny_deit_missing: not found" in z["stdout"]
    assert "[model_zoo 4/4] tiny_timesformer: skipped (no --kinetics given)" in z["stdout"]
    assert "| tiny_deit_missing | not found |" in z["markdown"] and "| tiny_timesformer | skipped |" in z["markdown"]
    assert "1 evaluated, 1 failed, 1 not found, 1 skipped" in z["markdown"]


def test_rows_pattern_and_bad_overrides(image_zoo, tmp_path):
    z = image_zoo
    common = ["--manifest", z["root"] / "zoo.yaml", "--weights", z["good"].parent, "--imagenet", z["data"]]
    code, stdout, err = run_tool(*common, "--out", tmp_path / "a", "--rows", "tiny_deit_m*", *CPU_RUN)
    assert [r["name"] for r in json.loads((tmp_path / "a" / "model_zoo.json").read_text())["rows"]] \
        == ["tiny_deit_missing"]
    # Nothing was evaluated: not a success (exit status 3), and said.
    assert code == 3 and "no row was evaluated (1 not found)" in err
    code, _, err = run_tool(*common, "--out", tmp_path / "b", "--rows", "nothing*")
    assert code == 2 and "'nothing*' matches no row" in err
    # A KEY VALUE no config accepts is refused before any row is evaluated.
    code, _, err = run_tool(*common, "--out", tmp_path / "c", "VIT.NOPE", "1")
    assert code == 2 and "VIT.NOPE" in err and not (tmp_path / "c").exists()
    with pytest.raises(SystemExit):  # the tool sets OUTPUT_DIR itself
        run_tool(*common, "OUTPUT_DIR", tmp_path / "d")


def test_a_run_that_evaluates_no_row_is_not_a_success(image_zoo, tmp_path):
    z = image_zoo
    code, _, err = run_tool("--manifest", z["root"] / "zoo.yaml", "--weights", tmp_path, "--kinetics", tmp_path,
                            "--out", tmp_path / "out", "--rows", "tiny_deit,tiny_deit_missing,tiny_timesformer")
    assert code == 3 and "no row was evaluated (2 skipped, 1 not found)" in err and str(tmp_path) in err
    rows = json.loads((tmp_path / "out" / "model_zoo.json").read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped", "skipped", "not found"]


@pytest.mark.parametrize("option", ["--imagenet", "--kinetics", "--weights"])
def test_data_and_weights_folders_must_exist_before_anything_runs(image_zoo, tmp_path, capsys, option):
    z = image_zoo
    paths = {"--weights": z["good"].parent, "--imagenet": z["data"], "--kinetics": z["data"]}
    paths[option] = tmp_path / "nowhere"
    argv = ["--manifest", str(z["root"] / "zoo.yaml"), "--out", str(tmp_path / "out")]
    argv += [str(a) for item in paths.items() for a in item]
    with pytest.raises(SystemExit) as info:
        h.load_tool("model_zoo").main(argv)
    assert info.value.code == 2
    assert f"{option} is not a folder: {tmp_path / 'nowhere'}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before any file was hashed or row evaluated


def test_video_row_is_evaluated_multi_view_like_run_net(tmp_path):
    from vitadapt.config import load_config
    from vitadapt.models import build_model

    data = tmp_path / "kinetics"
    data.mkdir()
    h.load_tool("make_video_demo_data").make_dataset(str(data), classes=2, per_class_train=1, per_class_val=2,
                                                     frames=8, size=32, fps=8)
    torch.manual_seed(0)
    model = build_model(load_config(TIMESFORMER, as_opts(TINY_TIMESFORMER) + ["NUM_GPUS", "0"]))
    # The official release layout: {'model_state': {'model.' + key}} (spec video.md 1.5).
    official = {"model_state": {f"model.{k}": v for k, v in model.state_dict().items()}}
    weights = tmp_path / "weights"
    weights.mkdir()
    torch.save(official, weights / "TimeSformer_tiny.pyth")
    manifest = write_manifest(tmp_path / "zoo.yaml", [
        row("tiny_timesformer", "TimeSformer_tiny.pyth", TIMESFORMER, TINY_TIMESFORMER, dataset="kinetics",
            published={"top1": 50.0, "top5": 100.0, "gmacs": None}),
        row("tiny_deit", "absent.pth", DEIT_S, TINY_DEIT)])
    out = tmp_path / "out"
    code, stdout, _ = run_tool("--manifest", manifest, "--weights", weights, "--kinetics", data, "--out", out,
                               *CPU_RUN)
    assert code == 0, stdout
    rows = {r["name"]: r for r in json.loads((out / "model_zoo.json").read_text())["rows"]}
    assert rows["tiny_deit"]["status"] == "skipped" and "--imagenet" in rows["tiny_deit"]["reason"]
    video = rows["tiny_timesformer"]
    reference = run_net_test(TIMESFORMER, TINY_TIMESFORMER, weights / "TimeSformer_tiny.pyth", data,
                             tmp_path / "run_net")
    assert reference["num_videos"] == 4 and reference["views_per_video"] == 3
    assert video["reproduced"] == {"top1": reference["video_top1_acc"], "top5": reference["video_top5_acc"],
                                   "gmacs": reference["gmacs_mean"]}
    assert video["delta"]["top1"] == pytest.approx(reference["video_top1_acc"] - 50.0)
