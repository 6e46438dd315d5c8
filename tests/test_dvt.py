"""DVT, the Dynamic Vision Transformer (vitadapt/models/dvt.py) and the engine pieces it uses: golden parity (CLI and
in-process loading), real early exit against the simulated one, the reuse resampling against the official
operations (specs/evit_dvt.md 2.3-2.4), per-exit costs against fvcore on the official code, multi-exit training,
the test job (curves, checkpoint and searched thresholds, released and timm-saver files), config validation and
the threshold-search subset of the loader.

Goldens live in <repo>/../shared/golden/dvt (override with VITADAPT_GOLDEN_DIR); the tests that need them skip
when they are absent. Everything runs single-threaded (two small CPU cores, shared)."""

import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers_dvt as H  # noqa: E402
import helpers_e2e as h  # noqa: E402
from helpers_unit import raises_naming  # noqa: E402
from vitadapt.config import load_config  # noqa: E402
from vitadapt.models import build_model  # noqa: E402
from vitadapt.models.convert import LoadReport, load_into_model  # noqa: E402
from vitadapt.models.dvt import DVT, official_to_config_opts, resample_matrix  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

ATOL = 1e-5


def _max_diff(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


# ==============================================================================================================
# 1. Parity with the official code (goldens)
# ==============================================================================================================

def test_check_parity_cli_on_both_dvt_goldens():
    for path in (H.GOLDEN_DEV, H.GOLDEN_T2T):
        if not path.is_file():
            pytest.skip(f"golden file {path} not found (set VITADAPT_GOLDEN_DIR to the shared/golden folder)")
    proc = h.check_parity_cli(H.GOLDEN_DEV, H.GOLDEN_T2T)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    sections, current = {}, None
    for line in proc.stdout.splitlines():
        if line.endswith(".pt") and not line.startswith(" "):
            current = sections.setdefault(os.path.basename(line.strip()), [])
        elif line.startswith("  ") and current is not None:
            current.append(line.strip())
    assert set(sections) == {"golden_dev.pt", "golden_t2t_dev.pt"}, proc.stdout
    for name, lines in sections.items():
        assert len(lines) >= 25, (name, lines)
        assert all("max |diff|" in l and l.endswith("  OK") for l in lines), (name, lines)
        for what in ("exit 1 (7x7) logits", "exit 2 (10x10) logits", "exit 3 (14x14) logits",
                     "exit 3 (14x14) reused features", "exit 2 (10x10) relation bias, block 0",
                     "early exit: exit per image", "early exit: logits of the exit each image stopped at"):
            assert any(l.startswith(what) for l in lines), (name, what)
    assert any(l.startswith("budgeted batch: thresholds") for l in sections["golden_dev.pt"])
    assert "MISMATCH" not in proc.stdout and "all match (2 file(s) compared)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("which", ["dev", "t2t"])
def test_golden_state_dict_loads_with_the_official_key_names(which):
    golden = h.load_golden_or_skip(H.GOLDEN_DEV if which == "dev" else H.GOLDEN_T2T)
    cfg = load_config("", official_to_config_opts(golden["config"]) + ["NUM_GPUS", "0"])
    assert cfg.DVT.BACKBONE == ("T2TViT" if which == "t2t" else "VisionTransformer")
    model = build_model(cfg)
    assert isinstance(model, DVT)
    report = load_into_model(model, golden["state_dict"], LoadReport("golden", "official layout"))
    assert report.missing == [] and report.unexpected == []
    ours = model.state_dict()
    assert set(ours) == set(golden["state_dict"])  # the same names, the official typo included
    for key in ("less_token.blocks.0.feature_resuse_mlp.1.fc1.weight",
                "normal_token.blocks.2.feature_resuse_mlp.0.bias", "less_token.relation_reuse_conv.0.weight",
                "normal_token.relation_reuse_conv.2.bias"):
        assert key in ours, key
    assert not any("feature_reuse_mlp" in k for k in ours)
    assert not any(k.startswith("less_less_token.") and ("resuse" in k or "relation_reuse" in k) for k in ours)
    for key, value in golden["state_dict"].items():
        assert torch.equal(ours[key], value), key
    with torch.no_grad():
        model.eval()(golden["input"])
    for mine, ref in zip(model.last_exit_logits, golden["logits"]):
        assert _max_diff(mine, ref) <= ATOL


# ==============================================================================================================
# 2. Real early exit == the simulation (both backbones)
# ==============================================================================================================

SIZES = {"vit": 32, "t2t": 224}
BATCH = 6


class StageCalls:
    """Records the images each stage's embedding receives (forward pre-hooks on patch_embed / tokens_to_token)."""

    def __init__(self, model):
        self.seen = {k: [] for k in range(3)}
        self.handles = []
        for k, stage in enumerate(model.stages):
            embed = getattr(stage, "tokens_to_token", None) or stage.patch_embed
            self.handles.append(embed.register_forward_pre_hook(
                lambda mod, args, k=k: self.seen[k].append(args[0].detach().clone())))

    def batch_sizes(self):
        return [sum(x.shape[0] for x in self.seen[k]) for k in range(3)]

    def remove(self):
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module", params=["vit", "t2t"])
def cascade(request):
    """A tiny DVT, a batch, every exit's logits on it and thresholds sending 2 images out at each exit."""
    backbone = request.param
    model = H.tiny_model(backbone, seed=1)
    images = torch.randn(BATCH, 3, SIZES[backbone], SIZES[backbone], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        last = model(images)
    exits = [l.clone() for l in model.last_exit_logits]
    assert torch.equal(last, exits[-1]) and model.last_exit.tolist() == [2] * BATCH
    confidences = [l.softmax(dim=-1).amax(dim=-1) for l in exits]
    thresholds = H.spread_thresholds(confidences, take=(2, 2))
    simulated = H.simulated_exits(confidences, thresholds)
    assert torch.bincount(simulated, minlength=3).tolist() == [2, 2, 2]
    # No image within 1e-4 of a threshold it is compared with: the decisions are robust to rounding.
    for k, t in enumerate(thresholds):
        assert (confidences[k][simulated >= k] - t).abs().min() > 1e-4
    return dict(backbone=backbone, model=model, images=images, exits=exits, confidences=confidences,
                thresholds=thresholds, simulated=simulated)


def _early(model, images, thresholds):
    model.set_thresholds(thresholds)
    try:
        with torch.no_grad():
            return model(images), model.last_exit.clone()
    finally:
        model.set_thresholds(None)


def test_early_exit_equals_running_every_exit_and_choosing_afterwards(cascade):
    model, images, exits, simulated = cascade["model"], cascade["images"], cascade["exits"], cascade["simulated"]
    calls = StageCalls(model)
    try:
        logits, last_exit = _early(model, images, cascade["thresholds"])
    finally:
        calls.remove()
    assert last_exit.tolist() == simulated.tolist()
    chosen = torch.stack([exits[int(k)][i] for i, k in enumerate(simulated)])
    assert _max_diff(logits, chosen) <= ATOL
    assert model.last_exit_logits is None  # the per-exit logits of every image do not exist here
    # Stage k ran on exactly the images no earlier exit answered, in their batch order.
    assert calls.batch_sizes() == [6, 4, 2]
    assert torch.equal(calls.seen[1][0], images[simulated >= 1])
    assert torch.equal(calls.seen[2][0], images[simulated == 2])


def test_an_images_result_does_not_depend_on_its_batch_mates(cascade):
    model, images, thresholds = cascade["model"], cascade["images"], cascade["thresholds"]
    batch_logits, batch_exit = _early(model, images, thresholds)
    for i in range(BATCH):
        alone, exit_alone = _early(model, images[i:i + 1], thresholds)
        assert exit_alone.tolist() == [batch_exit[i].item()], i
        assert _max_diff(alone[0], batch_logits[i]) <= ATOL, i
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    permuted, exit_permuted = _early(model, images[perm], thresholds)
    assert torch.equal(exit_permuted, batch_exit[perm])
    assert _max_diff(permuted, batch_logits[perm]) <= ATOL


def test_confident_images_never_run_the_later_stages(cascade):
    model, images, exits = cascade["model"], cascade["images"], cascade["exits"]
    calls = StageCalls(model)
    try:
        logits, last_exit = _early(model, images, [0.0, 0.0])
    finally:
        calls.remove()
    assert calls.batch_sizes() == [BATCH, 0, 0]
    assert last_exit.tolist() == [0] * BATCH
    assert _max_diff(logits, exits[0]) <= ATOL
    assert model.macs_per_image().tolist() == [model.exit_macs()[0].item()] * BATCH
    # Unreachable thresholds: every image runs every stage and the last exit answers.
    logits, last_exit = _early(model, images, [1.01, 1.01])
    assert last_exit.tolist() == [2] * BATCH and _max_diff(logits, exits[2]) <= ATOL


def test_an_image_whose_confidence_equals_the_threshold_leaves():
    """Ties leave (the official `>=`): saturated heads give confidences of exactly 1.0, and thresholds of 1.0 stop
    every image at exit 1, as the simulation says."""
    model = H.redraw_(H.tiny_model("vit", seed=7), seed=7, head_gain=1e4)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x)
    confidences = [l.softmax(dim=-1).amax(dim=-1) for l in model.last_exit_logits]
    assert all(bool((c == 1.0).all()) for c in confidences)
    assert H.simulated_exits(confidences, [1.0, 1.0]).tolist() == [0] * 4
    logits, last_exit = _early(model, x, [1.0, 1.0])
    assert last_exit.tolist() == [0] * 4


def test_macs_per_image_are_the_cumulative_cost_of_the_exit_taken(cascade):
    model, simulated = cascade["model"], cascade["simulated"]
    _early(model, cascade["images"], cascade["thresholds"])
    costs = model.exit_macs(SIZES[cascade["backbone"]])
    assert costs.dtype == torch.float64 and bool((costs[1:] > costs[:-1]).all())
    assert model.macs_per_image().tolist() == costs[simulated].tolist()
    with torch.no_grad():
        model(cascade["images"])  # no thresholds: every image pays for every exit
    assert model.macs_per_image().tolist() == [costs[2].item()] * BATCH
    assert model.image_statistics()["exit"].tolist() == [3.0] * BATCH


# ==============================================================================================================
# 3. The reuse resampling, against the official operations
# ==============================================================================================================

@pytest.mark.parametrize("src,dst", [(7, 10), (10, 14), (4, 6), (6, 8)])
def test_resample_matrix_is_nearest_upsampling_then_adaptive_pooling(src, dst):
    m = resample_matrix(src, dst)
    assert m.shape == (dst * dst + 1, src * src + 1) and m.dtype == torch.float64
    x = torch.randn(2, 5, src, src, dtype=torch.float64, generator=torch.Generator().manual_seed(src))
    ref = F.adaptive_avg_pool2d(F.interpolate(x, size=(2 * src, 2 * src), mode="nearest"), (dst, dst))
    mine = torch.einsum("ts,bcs->bct", m[1:, 1:], x.flatten(2)).reshape(2, 5, dst, dst)
    assert _max_diff(mine, ref) <= 1e-12
    # The CLS row and column pass through; every patch row is an average.
    assert m[0, 0] == 1 and not m[0, 1:].any() and not m[1:, 0].any()
    assert torch.allclose(m[1:].sum(dim=1), torch.ones(dst * dst, dtype=torch.float64))
    # On an attention map (queries x keys, CLS first): the CLS entries pass through, the rest is resampled.
    r = torch.randn(src * src + 1, src * src + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    out = m @ r @ m.t()
    assert out[0, 0] == r[0, 0]
    keys = F.adaptive_avg_pool2d(F.interpolate(r[0, 1:].reshape(1, 1, src, src), size=(2 * src, 2 * src)),
                                 (dst, dst))
    assert _max_diff(out[0, 1:], keys.flatten()) <= 1e-12
    queries = F.adaptive_avg_pool2d(F.interpolate(r[1:, 0].reshape(1, 1, src, src), size=(2 * src, 2 * src)),
                                    (dst, dst))
    assert _max_diff(out[1:, 0], queries.flatten()) <= 1e-12


def test_reuse_inside_a_forward_follows_the_spec(cascade):
    """The relation bias and reused features each later stage received equal the spec's operations (2.3, 2.4)
    applied to what the stage before handed over."""
    model, images = cascade["model"], cascade["images"]
    grids = H.VIT_GRIDS if cascade["backbone"] == "vit" else H.T2T_GRIDS
    model.trace = True
    try:
        with torch.no_grad():
            model(images)
            traces = model.last_trace
            for k in (1, 2):
                stage, before, now = model.stages[k], traces[k - 1], traces[k]
                assert before["features"].shape[1] == grids[k - 1] ** 2 + 1
                mixed = stage.relation_reuse_conv(torch.cat(before["relations"], dim=1))
                ref = H.reference_relation_bias(mixed, grids[k], len(stage.blocks))
                assert len(now["relation_bias"]) == len(ref) == len(stage.blocks)
                for mine, theirs in zip(now["relation_bias"], ref):
                    assert mine.shape == (BATCH, 2, grids[k] ** 2 + 1, grids[k] ** 2 + 1)
                    assert _max_diff(mine, theirs) <= ATOL
                    assert mine.abs().max() > 0.1  # the bias is not negligible
                for block, mine in zip(stage.blocks, now["reused_features"]):
                    theirs = H.reference_reused_features(block.feature_resuse_mlp(before["features"]), grids[k])
                    assert mine.shape == (BATCH, grids[k] ** 2 + 1, 48)
                    assert _max_diff(mine, theirs) <= ATOL
                    assert not mine[:, 0].any()  # the CLS row is zero
    finally:
        model.trace = False


def test_without_reuse_the_later_stages_ignore_the_earlier_ones():
    """FEATURE_REUSE / RELATION_REUSE off: no reuse modules, exit 3 is the last stage alone, and changing stage 1
    leaves it as it was; with reuse, the same change moves exit 3 (the reuse paths carry stage 1 forward)."""
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for reuse in (False, True):
        # depth 2: with one block, the flipped MLP changes only stage 1's features (its attention logits come
        # before the MLP), and the next stage's single block adds them to patch tokens only, which nothing reads
        model = H.tiny_model("vit", seed=2, VIT__DEPTH=2, DVT__FEATURE_REUSE=reuse, DVT__RELATION_REUSE=reuse)
        assert any("resuse" in k or "relation_reuse" in k for k in model.state_dict()) == reuse
        with torch.no_grad():
            model(x)
            before = [l.clone() for l in model.last_exit_logits]
            if not reuse:
                assert _max_diff(before[2], model.normal_token(x)) <= ATOL
            model.less_less_token.blocks[0].mlp.fc2.weight.mul_(-1.0)
            model(x)
        after = model.last_exit_logits
        assert _max_diff(after[0], before[0]) > 1e-2
        assert (_max_diff(after[1], before[1]) > 1e-2) == reuse
        assert (_max_diff(after[2], before[2]) > 1e-2) == reuse
        if not reuse:
            assert _max_diff(after[2], before[2]) == 0


# ==============================================================================================================
# 4. Per-exit costs of the full-size models against fvcore on the official code
# ==============================================================================================================

FULL = {
    "DeiT-S": ["VIT.EMBED_DIM", "384", "VIT.DEPTH", "12", "VIT.NUM_HEADS", "6"],
    "T2T-12": ["VIT.EMBED_DIM", "256", "VIT.DEPTH", "12", "VIT.NUM_HEADS", "4", "VIT.MLP_RATIO", "2.0",
               "VIT.QKV_BIAS", "False", "DVT.BACKBONE", "T2TViT"],
    "T2T-14": ["VIT.EMBED_DIM", "384", "VIT.DEPTH", "14", "VIT.NUM_HEADS", "6", "VIT.MLP_RATIO", "3.0",
               "VIT.QKV_BIAS", "False", "DVT.BACKBONE", "T2TViT"],
}
# fvcore's by-module count of each stage on the official code (this session), MACs per image at 224 px.
FVCORE_STAGE_MACS = {"DeiT-S": [1145309952, 2511011712, 5187461952],
                     "T2T-12": [472485020, 989992916, 2035066988],
                     "T2T-14": [1206548892, 2634317844, 5486766252]}
# The figures published with the official code (flops_table.md, specs 2.8), cumulative GMACs per exit.
PUBLISHED = {"DeiT-S": [1.145, 3.656, 8.843], "T2T-12": [0.472, 1.462, 3.497], "T2T-14": [1.207, 3.840, 9.327]}
STATE_TENSORS = {"DeiT-S": 608, "T2T-12": 650}


@pytest.fixture(scope="module")
def full_size():
    """The three official models, built once (meta tensors do not work: the builder reads values)."""
    out = {}
    for name, opts in FULL.items():
        cfg = load_config("", ["MODEL.NAME", "DVT", "NUM_GPUS", "0", "MODEL.NUM_CLASSES", "1000"] + opts)
        model = build_model(cfg)
        out[name] = {"exit_macs": model.exit_macs(224).clone(), "tensors": len(model.state_dict())}
        del model
    return out


@pytest.mark.parametrize("name", list(FULL))
def test_exit_macs_equal_fvcore_on_the_official_code(full_size, name):
    cumulative = full_size[name]["exit_macs"]
    stages = torch.cat([cumulative[:1], cumulative.diff()]).tolist()
    ref = FVCORE_STAGE_MACS[name]
    if name == "DeiT-S":
        assert stages == ref  # no einsum: fvcore counts it exactly, and so does vitadapt
    else:
        # fvcore rounds numpy's einsum count (the performer tokenizer) to 4 significant digits
        for mine, theirs in zip(stages, ref):
            assert abs(mine - theirs) / theirs < 1e-5, (stages, ref)
    assert cumulative.tolist() == pytest.approx(torch.tensor(ref, dtype=torch.float64).cumsum(0).tolist(), rel=1e-5)


@pytest.mark.parametrize("name", list(FULL))
def test_exit_macs_match_the_published_figures(full_size, name):
    gmacs = (full_size[name]["exit_macs"] / 1e9).tolist()
    for mine, published in zip(gmacs, PUBLISHED[name]):
        assert abs(mine - published) <= 0.0015, (gmacs, PUBLISHED[name])
    if name == "T2T-12":
        assert round(gmacs[0], 2) == 0.47  # the paper's Table 1: 7x7 T2T-ViT-12, 0.47 G
    if name in STATE_TENSORS:
        assert full_size[name]["tensors"] == STATE_TENSORS[name]


# ==============================================================================================================
# 5. Training: the sum of the exits' losses
# ==============================================================================================================

def _dvt_opts(data, out, **overrides):
    base = dict(MODEL__NAME="DVT", VIT__EMBED_DIM=24, VIT__DEPTH=1, VIT__NUM_HEADS=2, DVT__PATCH_SIZES=[8, 5, 4],
                DVT__PATCH_PADDINGS=[0, 1, 0])
    base.update(overrides)
    return ["--cfg", ""] + h.tiny_opts(data, out, **base)


@pytest.fixture(scope="module")
def training_runs(image_folder, tmp_path_factory):
    """One epoch, plain and with mixup (soft targets); validation after the epoch."""
    out = {}
    for name, extra in (("plain", {}), ("mixup", {"MIXUP__ENABLE": True})):
        path = tmp_path_factory.mktemp(f"dvt_train_{name}")
        rc = h.load_run_net().main(_dvt_opts(image_folder, path, SOLVER__MAX_EPOCH=1, TEST__ENABLE=False, **extra))
        out[name] = (rc, path)
    return out


@pytest.mark.parametrize("name", ["plain", "mixup"])
def test_training_loss_is_the_sum_of_the_three_exits(training_runs, name):
    rc, out = training_runs[name]
    assert rc == 0
    (epoch,) = h.records(out, "train_epoch")
    parts = [epoch[f"loss_exit{k}"] for k in (1, 2, 3)]
    assert all(math.isfinite(p) and p > 0.1 for p in parts), epoch
    assert epoch["loss"] == pytest.approx(sum(parts), abs=5e-5)  # json_stats keeps 6 significant digits
    assert len({round(p, 6) for p in parts}) == 3  # three different exits, not one loss counted thrice


def test_validation_runs_every_exit_and_the_last_answers(training_runs, image_folder):
    rc, out = training_runs["plain"]
    (val,) = h.records(out, "val")
    n = len(h.list_split(image_folder, "val"))
    assert val["num_images"] == n
    assert len(val["top1_acc_per_exit"]) == 3 and all(0 <= a <= 100 for a in val["top1_acc_per_exit"])
    assert val["exit_counts"] == [0, 0, n]
    assert val["top1_acc"] == pytest.approx(val["top1_acc_per_exit"][2], abs=1e-9)


def test_gradients_reach_every_stage_and_the_reuse_modules():
    # depth 2: the last block's reused features reach only patch tokens (their CLS row is zero), which nothing
    # reads after the last block; so in the last stage, whose output no later stage reuses, the last block's
    # feature_resuse_mlp gets no gradient, in the official model as here.
    model = H.tiny_model("vit", seed=4, VIT__DEPTH=2).train()
    model.set_thresholds([0.0, 0.0])  # ignored in training: every exit runs
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 3])
    model(x)
    assert len(model.last_exit_logits) == 3
    loss = sum(F.cross_entropy(logits, y) for logits in model.last_exit_logits)
    loss.backward()
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for stage in ("less_less_token.", "less_token.", "normal_token."):
        assert any(n.startswith(stage) for n in names)
    for required in ("less_token.relation_reuse_conv.0.weight", "normal_token.relation_reuse_conv.2.weight",
                     "less_token.blocks.1.feature_resuse_mlp.1.fc1.weight",
                     "normal_token.blocks.0.feature_resuse_mlp.0.weight"):
        assert required in names
    dead = "normal_token.blocks.1.feature_resuse_mlp."
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.isfinite(p.grad).all(), name
            assert (p.grad.abs().sum() > 0) != name.startswith(dead), name


# ==============================================================================================================
# 6. The test job end to end (tools/run_net.py with TRAIN.ENABLE False)
# ==============================================================================================================

TEST_MODEL = dict(backbone="vit", seed=5, num_classes=3)


@pytest.fixture(scope="module")
def weights():
    return H.tiny_model(**TEST_MODEL).state_dict()


def _val_exits(image_folder, tmp_path, sd):
    """Every exit's logits and the labels of the val split, seen with the test transform, in data set order."""
    from vitadapt.datasets import construct_loader

    cfg = load_config("", _dvt_opts(image_folder, tmp_path / "ref")[2:])
    model = build_model(cfg).eval()
    model.load_state_dict(sd)
    exits, labels = [[], [], []], []
    with torch.no_grad():
        for batch in construct_loader(cfg, "val", is_train=False):
            model(batch["inputs"])
            for k in range(3):
                exits[k].append(model.last_exit_logits[k])
            labels.append(batch["labels"])
    return [torch.cat(e) for e in exits], torch.cat(labels)


def _run_test(image_folder, out, path, **overrides):
    return h.load_run_net().main(_dvt_opts(image_folder, out, TRAIN__ENABLE=False, TEST__CHECKPOINT_FILE_PATH=str(path),
                                           **overrides))


@pytest.fixture(scope="module")
def released_run(image_folder, tmp_path_factory, weights):
    """An official released file whose point-10 thresholds send 2 / 2 / 3 val images out at the three exits."""
    root = tmp_path_factory.mktemp("dvt_released")
    exits, labels = _val_exits(image_folder, root, weights)
    confidences = [l.softmax(dim=-1).amax(dim=-1) for l in exits]
    table = H.random_dynamic_threshold()
    table[9, :2] = torch.tensor(H.spread_thresholds(confidences, take=(2, 2)))
    path = H.official_release(root / "DVT_release.pth.tar", weights, table)
    out = root / "out"
    rc = _run_test(image_folder, out, path, DVT__BUDGET_POINT=10, DVT__THRESHOLD_SOURCE="checkpoint")
    expected = H.simulated_exits(confidences, table[9, :2].tolist())
    return dict(rc=rc, out=out, path=path, table=table, expected=expected, exits=exits, labels=labels)


def test_released_file_uses_its_stored_thresholds_and_writes_curves(released_run):
    assert released_run["rc"] == 0
    out, table = released_run["out"], released_run["table"]
    (rec,) = h.records(out, "test_final")
    assert rec["thresholds"] == pytest.approx(table[9, :2].tolist(), abs=1e-6)  # json_stats rounds to 6 digits
    curves = json.loads((out / "dvt_curves.json").read_text())
    assert set(curves) == {"budgeted (threshold search)", "budgeted (checkpoint thresholds)"}
    for curve in curves.values():
        assert curve["points"] == list(range(1, 60))
        for key in ("proportions", "thresholds", "expected_gflops", "top1_acc", "exit_fractions"):
            assert len(curve[key]) == 59, key
        assert len(curve["anytime"]["gflops"]) == len(curve["anytime"]["top1_acc"]) == 3
        assert curve["anytime"]["gflops"] == pytest.approx(rec["exit_gmacs"], abs=1e-6)  # exit_gmacs: 6 decimals
    stored = curves["budgeted (checkpoint thresholds)"]["thresholds"]
    assert torch.equal(torch.tensor(stored, dtype=torch.float32), table)
    png = (out / "dvt_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    log = (out / "stdout.log").read_text()
    assert "DVT_release.pth.tar stores flops" in log and "stores anytime_classification" in log


def test_released_file_early_exit_equals_the_curves_prediction(released_run, image_folder):
    """The core promise: the test job's real early exit gives what the simulated curve predicts."""
    out, expected, exits, labels = (released_run[k] for k in ("out", "expected", "exits", "labels"))
    (rec,) = h.records(out, "test_final")
    curve = json.loads((out / "dvt_curves.json").read_text())["budgeted (checkpoint thresholds)"]
    n = len(labels)
    assert rec["num_images"] == n == 7
    assert rec["exit_counts"] == torch.bincount(expected, minlength=3).tolist() == [2, 2, 3]
    assert rec["exit_fractions"] == pytest.approx(curve["exit_fractions"][9], abs=1e-6)
    assert rec["top1_acc"] == pytest.approx(curve["top1_acc"][9], rel=1e-5)  # json_stats: 6 significant digits
    assert rec["gmacs_mean"] == pytest.approx(curve["expected_gflops"][9], rel=1e-5)
    # And both equal the independent simulation on logits computed here.
    chosen = torch.stack([exits[int(k)][i] for i, k in enumerate(expected)])
    assert rec["top1_acc"] == pytest.approx(h.top1(chosen, labels.tolist()), rel=1e-5)
    assert rec["loss"] == pytest.approx(F.cross_entropy(chosen, labels).item(), abs=1e-5)
    anytime = [h.top1(e, labels.tolist()) for e in exits]
    assert rec["anytime_top1_acc"] == pytest.approx(anytime, rel=1e-5)
    assert curve["anytime"]["top1_acc"] == pytest.approx(anytime, abs=1e-9)


def test_timm_saver_file_is_evaluated_with_its_ema_weights(image_folder, tmp_path, weights):
    ema = H.tiny_model(backbone="vit", seed=6, num_classes=3).state_dict()
    path = tmp_path / "model_best.pth.tar"
    torch.save({"state_dict": weights, "state_dict_ema": ema, "epoch": 7, "arch": "DVT_Deit_small"}, path)
    out = tmp_path / "out"
    assert _run_test(image_folder, out, path, DVT__CURVES=False) == 0
    (rec,) = h.records(out, "test_final")
    ema_exits, labels = _val_exits(image_folder, tmp_path, ema)
    model_exits, _ = _val_exits(image_folder, tmp_path, weights)
    loss_ema = F.cross_entropy(ema_exits[2], labels).item()
    loss_model = F.cross_entropy(model_exits[2], labels).item()
    assert abs(loss_ema - loss_model) > 1e-2
    assert rec["loss"] == pytest.approx(loss_ema, abs=1e-5)
    assert rec["top1_acc_per_exit"] == pytest.approx([h.top1(e, labels.tolist()) for e in ema_exits], rel=1e-5)
    assert rec["exit_counts"] == [0, 0, len(labels)]  # no thresholds asked: every exit runs, the last answers
    assert "thresholds" not in rec


def test_checkpoint_thresholds_from_a_file_without_them_fail_naming_both(image_folder, tmp_path, weights, capsys):
    path = tmp_path / "bare.pth"
    torch.save({"model_state_dict": weights}, path)
    rc = _run_test(image_folder, tmp_path / "out", path, DVT__BUDGET_POINT=10, DVT__THRESHOLD_SOURCE="checkpoint")
    assert rc == 2
    err = capsys.readouterr().err
    assert "dynamic_threshold" in err and str(path) in err, err
    assert not (tmp_path / "out" / "json_stats.log").exists() or not h.records(tmp_path / "out", "test_final")


def test_a_file_missing_a_feature_reuse_key_fails_naming_it(image_folder, tmp_path, weights, capsys):
    missing = "less_token.blocks.0.feature_resuse_mlp.1.fc2.bias"
    sd = {k: v for k, v in weights.items() if k != missing}
    path = H.official_release(tmp_path / "broken.pth.tar", sd, H.random_dynamic_threshold())
    rc = _run_test(image_folder, tmp_path / "out", path, DVT__CURVES=False)
    assert rc == 2
    err = capsys.readouterr().err
    assert missing in err, err
    assert not (tmp_path / "out" / "json_stats.log").exists() or not h.records(tmp_path / "out", "test_final")


def test_budget_gmacs_picks_a_point_within_the_budget(image_folder, tmp_path, weights):
    path = H.official_release(tmp_path / "r.pth.tar", weights, H.random_dynamic_threshold())
    gmacs = (H.tiny_model(**TEST_MODEL).exit_macs(32) / 1e9).tolist()
    budget = (gmacs[0] + gmacs[2]) / 2
    out = tmp_path / "out"
    assert _run_test(image_folder, out, path, DVT__BUDGET_GMACS=budget, DVT__CURVES=False) == 0
    (rec,) = h.records(out, "test_final")
    assert rec["exit_gmacs"] == pytest.approx(gmacs, abs=1e-6)
    assert gmacs[0] <= rec["search_expected_gmacs"] <= budget
    assert len(rec["thresholds"]) == 2
    assert 0 <= rec["search_top1_acc"] <= 100
    # The test split's mean cost follows the images' exits under those thresholds.
    expected = sum(c * g for c, g in zip(rec["exit_counts"], gmacs)) / rec["num_images"]
    assert rec["gmacs_mean"] == pytest.approx(expected, rel=1e-5)


def test_budget_gmacs_below_the_first_exit_fails(image_folder, tmp_path, weights, capsys):
    path = H.official_release(tmp_path / "r.pth.tar", weights, H.random_dynamic_threshold())
    rc = _run_test(image_folder, tmp_path / "out", path, DVT__BUDGET_GMACS=1e-6, DVT__CURVES=False)
    assert rc == 2
    assert "DVT.BUDGET_GMACS" in capsys.readouterr().err


def test_threshold_search_is_reproducible_and_uses_threshold_images(image_folder, tmp_path, weights):
    path = H.official_release(tmp_path / "r.pth.tar", weights, H.random_dynamic_threshold())
    found = []
    for run, seed in (("a", 0), ("b", 0), ("c", 1)):
        out = tmp_path / run
        assert _run_test(image_folder, out, path, DVT__BUDGET_POINT=20, DVT__THRESHOLD_IMAGES=10,
                         DVT__THRESHOLD_SEED=seed, DVT__CURVES=False) == 0
        (rec,) = h.records(out, "test_final")
        found.append(rec["thresholds"])
        assert "threshold search: every exit on 10 images of train" in (out / "stdout.log").read_text()
    assert found[0] == found[1]
    assert found[0] != found[2]  # another draw of 10 of the 24 training images, other thresholds
    assert len(found[0]) == 2 and all(1 / 3 <= t <= 1 for t in found[0])


# ==============================================================================================================
# 7. Config validation
# ==============================================================================================================

BAD_CONFIGS = [
    (["DVT.THRESHOLDS", "[0.5]"], ["DVT.THRESHOLDS"]),
    (["DVT.BUDGET_POINT", "60"], ["DVT.BUDGET_POINT", "60"]),
    (["DVT.THRESHOLDS", "[0.5,0.6]", "DVT.BUDGET_POINT", "3"], ["DVT.THRESHOLDS", "DVT.BUDGET_POINT"]),
    (["DVT.THRESHOLD_SOURCE", "checkpoint"], ["DVT.THRESHOLD_SOURCE", "DVT.BUDGET_POINT"]),
    (["DVT.PATCH_SIZES", "[16,16,16]", "DVT.PATCH_PADDINGS", "[0,0,0]"], ["DVT.PATCH_SIZES", "[14, 14, 14]"]),
    (["DVT.PATCH_SIZES", "[32,16]"], ["DVT.PATCH_SIZES"]),
    (["DVT.BACKBONE", "Foo"], ["DVT.BACKBONE", "Foo"]),
    (["DVT.THRESHOLD_SOURCE", "stored", "DVT.BUDGET_POINT", "3"], ["DVT.THRESHOLD_SOURCE", "stored"]),
    (["DVT.BUDGET_GMACS", "1.0", "DVT.BUDGET_POINT", "3"], ["DVT.BUDGET_POINT", "DVT.BUDGET_GMACS"]),
]


@pytest.mark.parametrize("opts,needles", BAD_CONFIGS, ids=[" ".join(o) for o, _ in BAD_CONFIGS])
def test_config_errors_name_the_keys(opts, needles):
    with raises_naming(*needles):
        load_config("", ["MODEL.NAME", "DVT"] + opts)


def test_valid_configs():
    cfg = load_config("", ["MODEL.NAME", "DVT", "DVT.THRESHOLDS", "[0.5,0.6,0.7]"])  # a third value is ignored
    assert list(cfg.DVT.THRESHOLDS) == [0.5, 0.6, 0.7]
    load_config("", ["MODEL.NAME", "DVT", "DVT.BUDGET_POINT", "59", "DVT.THRESHOLD_SOURCE", "checkpoint"])
    model = H.tiny_model("vit", DVT__THRESHOLDS=[0.5, 0.6, 0.7])
    assert model.thresholds.tolist() == pytest.approx([0.5, 0.6])
    with pytest.raises(ValueError, match="thresholds"):
        model.set_thresholds([0.5])


# ==============================================================================================================
# 8. The loader's subset (threshold search images)
# ==============================================================================================================

def _images_of(loader):
    batches = list(loader)
    return torch.cat([b["inputs"] for b in batches]), torch.cat([b["labels"] for b in batches])


def test_subset_of_the_train_split_is_seeded_and_uses_the_test_transform(image_folder, tmp_path):
    from vitadapt.datasets import construct_loader

    cfg = load_config("", h.tiny_opts(image_folder, tmp_path, TEST__BATCH_SIZE=4))
    full, full_labels = _images_of(construct_loader(cfg, "train", is_train=False))
    assert full.shape == (24, 3, 32, 32)
    a, a_labels = _images_of(construct_loader(cfg, "train", is_train=False, subset=(10, 0)))
    again, _ = _images_of(construct_loader(cfg, "train", is_train=False, subset=(10, 0)))
    other, _ = _images_of(construct_loader(cfg, "train", is_train=False, subset=(10, 1)))
    assert a.shape[0] == other.shape[0] == 10
    assert torch.equal(a, again)  # the same images, and the same pixels: no random augmentation
    # Every chosen image is one of the split's images under the test transform, each at most once.
    matches = [[j for j in range(24) if torch.equal(img, full[j])] for img in a]
    assert all(len(m) == 1 for m in matches) and len({m[0] for m in matches}) == 10
    assert a_labels.tolist() == [full_labels[m[0]].item() for m in matches]
    other_idx = {j for img in other for j in range(24) if torch.equal(img, full[j])}
    assert other_idx != {m[0] for m in matches}
    everything, _ = _images_of(construct_loader(cfg, "train", is_train=False, subset=(100, 0)))
    assert torch.equal(everything, full)


# ==============================================================================================================
# 9. tools/visualize.py: the way of each image through the cascade
# ==============================================================================================================

def test_visualize_draws_each_image_through_the_cascade_with_the_files_thresholds(released_run, image_folder,
                                                                               tmp_path, caplog):
    """The pictures follow the stored thresholds of the released file (loaded through the path every tool uses):
    one picture per image, the exit named in the log equal to the simulated one."""
    import logging

    vis = h.load_tool("visualize")
    out = tmp_path / "vis"
    args = _dvt_opts(image_folder, out, TRAIN__ENABLE=False, TEST__CHECKPOINT_FILE_PATH=str(released_run["path"]),
                     DVT__BUDGET_POINT=10, DVT__THRESHOLD_SOURCE="checkpoint")
    with caplog.at_level(logging.INFO):
        assert vis.main(args + ["--num-images", "7"]) == 0
    pictures = sorted((out / "visualization").glob("image_*.png"))
    assert len(pictures) == 7
    exits = [int(r.getMessage().split("leaves at exit ")[1].split()[0]) - 1
             for r in caplog.records if "leaves at exit" in r.getMessage()]
    assert exits == released_run["expected"].tolist()
    with caplog.at_level(logging.INFO):
        caplog.clear()
        assert vis.main(_dvt_opts(image_folder, out, TRAIN__ENABLE=False,
                                  TEST__CHECKPOINT_FILE_PATH=str(released_run["path"])) + ["--num-images", "2"]) == 0
    assert sum("every exit run (no thresholds)" in r.getMessage() for r in caplog.records) == 2
