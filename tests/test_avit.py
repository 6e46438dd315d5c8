"""A-ViT (adaptive token halting): golden parity, synthetic goldens from an independent reference of the official
forward (specs/avit_adavit.md §1.2-1.4, tests/helpers_avit.py), packed vs masked execution, the training losses,
training end to end (one process and 2 gloo processes), official checkpoint files and config validation.

The shared golden lives in <repo>/../shared/golden/avit (override with VITADAPT_GOLDEN_DIR); the tests that need
it skip when it is absent. Tolerances as the golden README asks: outputs 1e-5, losses 1e-6, gradients 1e-4 of
the largest reference gradient, depths and masks exact.
"""

import argparse
import functools
import itertools
import logging
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import helpers_avit as H  # noqa: E402
import helpers_e2e as h  # noqa: E402
from helpers_unit import max_diff, official_eval_model, random_images, write_goldens  # noqa: E402
from vitadapt.config import ConfigError, load_config  # noqa: E402
from vitadapt.engine import launch_job  # noqa: E402
from vitadapt.errors import VitadaptError  # noqa: E402
from vitadapt.models import build_model  # noqa: E402
from vitadapt.models.avit import official_to_config_opts, prior_target  # noqa: E402
from vitadapt.models.flops import vit_macs  # noqa: E402
from vitadapt.parity import check_file  # noqa: E402
from vitadapt.utils.checkpoint import load_weights  # noqa: E402

OUT_ATOL = 1e-5
LOSS_ATOL = 1e-6
GRAD_RTOL = 1e-4
MIN_MARGIN = 1e-4  # smallest |c - 0.99| a test input may have: float noise cannot flip a halting decision

pytestmark = pytest.mark.usefixtures("one_thread")  # the goldens were recorded single-threaded


_max_diff, _images = max_diff, random_images
_model = functools.partial(official_eval_model, official_to_config_opts)


def _grads(loss, model):
    """{name: gradient} of every parameter (zeros where the loss does not reach it), without touching .grad."""
    names, params = zip(*model.named_parameters())
    got = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True) if loss.requires_grad else [None] * len(params)
    return {k: torch.zeros_like(p) if g is None else g for k, p, g in zip(names, params, got)}


def _ref_grads(loss, params):
    got = torch.autograd.grad(loss, list(params.values()), allow_unused=True, retain_graph=True)
    return {k: torch.zeros_like(p) if g is None else g for (k, p), g in zip(params.items(), got)}


def _assert_grads_close(mine, ref, what, rtol=GRAD_RTOL):
    scale = max(g.abs().max().item() for g in ref.values())
    assert scale > 0, f"{what}: the reference gradient is zero everywhere (the test would check nothing)"
    worst = max(_max_diff(mine[k], g) for k, g in ref.items())
    assert worst <= rtol * scale, f"{what}: max |diff| {worst:.3g} > {rtol} * max |grad| {scale:.3g}"


@pytest.fixture(scope="module")
def golden_dev():
    return h.load_golden_or_skip(H.GOLDEN_DEV)


# ==============================================================================================================
# 1. The shared golden (official NVlabs/A-ViT code)
# ==============================================================================================================

def test_check_file_golden_dev(golden_dev):
    comparisons = check_file(str(H.GOLDEN_DEV))
    bad = [c.line() for c in comparisons if not c.ok]
    assert not bad, bad
    names = [c.name for c in comparisons]
    for execution in ("masked", "packed"):
        for what in ("logits", "per-token depth", "rho", "halting masks", "live tokens per block", "prior target",
                     "ponder loss", "per-block halting scores", "prior loss", "total loss", "total gradients",
                     "ponder gradients", "distr gradients"):
            assert any(n.startswith(f"[{execution}] {what}") for n in names), (execution, what)


def test_reference_reproduces_golden_dev(golden_dev):
    """The independent reference (helpers_avit) reproduces the official golden: what backs the synthetic goldens."""
    mine = H.golden_from_reference(golden_dev["config"], golden_dev["state_dict"], golden_dev["input"],
                                   golden_dev["labels"])
    for key in ("logits", "output_post_norm", "rho_token"):
        assert _max_diff(mine[key], golden_dev[key]) <= OUT_ATOL, key
    for key in ("counter_token", "mask_in", "active_tokens_per_layer"):
        assert torch.equal(mine[key], golden_dev[key]), key
    assert _max_diff(mine["distr_target"], golden_dev["distr_target"]) <= 1e-7
    assert mine["decision_margin_min"] == pytest.approx(golden_dev["decision_margin_min"], abs=1e-7)
    for key in ("base_ce", "ponder_loss", "halting_score_layer", "distr_prior_loss", "total_loss"):
        assert _max_diff(mine["train"][key], golden_dev["train"][key]) <= LOSS_ATOL, key
    assert mine["train"]["distr_prior_loss_added"] == bool(golden_dev["train"]["distr_prior_loss_added"])
    for loss in ("total", "ponder", "distr"):
        ref = golden_dev["grads"][loss]
        assert set(mine["grads"][loss]) == set(ref), loss
        assert mine["grads"][loss + "_none"] == sorted(golden_dev["grads"][loss + "_none"]), loss
        _assert_grads_close(mine["grads"][loss], ref, f"reference {loss} gradient vs golden")


def test_check_parity_cli_ok(golden_dev):
    proc = h.check_parity_cli(H.GOLDEN_DEV)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "MISMATCH" not in proc.stdout and proc.stdout.count(" OK") >= 40, proc.stdout
    assert "all match" in proc.stdout


def _tampered(golden, kind):
    g = dict(golden)
    if kind == "counter_token":
        g["counter_token"] = golden["counter_token"].clone()
        g["counter_token"][2, 5] += 1  # one token one block deeper
    elif kind == "logits":
        g["logits"] = golden["logits"].clone()
        g["logits"][1, 4] += 1e-3
    elif kind == "distr_grad":
        grads = dict(golden["grads"])
        distr = dict(grads["distr"])
        scale = max(v.abs().max().item() for v in distr.values())
        distr["blocks.5.attn.qkv.bias"] = distr["blocks.5.attn.qkv.bias"].clone()
        distr["blocks.5.attn.qkv.bias"][0] += 1e-3 * scale  # 10x the gradient tolerance
        grads["distr"] = distr
        g["grads"] = grads
    return g


EXPECTED_MISMATCH = {"counter_token": "per-token depth", "logits": "logits:", "distr_grad": "distr gradients"}


def test_check_parity_cli_fails_on_a_tampered_copy(golden_dev, tmp_path):
    path = tmp_path / "golden_dev_counter_tampered.pt"
    torch.save(_tampered(golden_dev, "counter_token"), path)
    proc = h.check_parity_cli(path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if "MISMATCH" in line]
    assert len(lines) == 2 and all("per-token depth" in line for line in lines), proc.stdout


@pytest.mark.parametrize("kind", ["counter_token", "logits", "distr_grad"])
def test_check_parity_fails_on_a_tampered_copy(golden_dev, tmp_path, capsys, kind):
    """tools/check_parity.py exits with main()'s status (sys.exit(main())): 1 on one corrupted tensor, naming it."""
    path = tmp_path / f"golden_{kind}.pt"
    torch.save(_tampered(golden_dev, kind), path)
    main = h.load_tool("check_parity").main
    capsys.readouterr()
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if "MISMATCH" in line]
    # Both executions, and only the tampered quantity ("train logits" compares another tensor).
    assert len(lines) == 2, out
    assert all(EXPECTED_MISMATCH[kind] in line and "train logits" not in line for line in lines), out
    assert {"[masked]", "[packed]"} == {line.split()[0] for line in lines}
    assert "2 mismatch(es)" in out
    assert main([str(H.GOLDEN_DEV)]) == 0


# ==============================================================================================================
# 2. Other files from the same harness: synthetic goldens from the independent reference
# ==============================================================================================================

SYNTHETIC = {
    # The README's held-out setting: img 80, embed 60, gate 5/10, ponder 1e-3, alpha 1e-2, batch 3.
    "heldout": dict(batch=3, img_size=80, embed_dim=60, gate_scale=5, gate_center=10, ponder=1e-3, alpha=1e-2,
                    patch_scale=2.5, drift=0.2, model_seed=7, input_seed=2024, labels=[0, 5, 8]),
    # Gates where the halted tokens' outputs move the prior gradient (at 10/30 their h is ~1e-12: invisible).
    "gate5_3": dict(gate_scale=5, gate_center=3, patch_scale=3.0, drift=0.35, bias_std=0.02, model_seed=1),
    "gate2_1": dict(gate_scale=2, gate_center=1, patch_scale=2.0, drift=0.2, bias_std=0.02, model_seed=2),
    # Every token halts at the first block: blocks 1..11 are skipped entirely.
    "gate1_-5_all_halt_at_block0": dict(gate_scale=1, gate_center=-5, patch_scale=0.5, drift=1.0, bias_std=0.02),
    # Every token halts by block 7: the last blocks are skipped, halted tokens' outputs still feed the prior.
    "gate4_-1_all_halt_by_block7": dict(gate_scale=4, gate_center=-1, patch_scale=1.0, drift=0.2, bias_std=0.02),
    "batch2": dict(batch=2, patch_scale=3.0, drift=0.35, model_seed=1, labels=[4, 2]),
    "batch7": dict(batch=7, gate_scale=5, gate_center=10, ponder=1e-3, alpha=1e-2, patch_scale=2.5, drift=0.2,
                   model_seed=2, input_seed=5),
}
# The settings on which a reference that drops the halted tokens' gradient from the prior must be caught.
SENSITIVE = ["heldout", "gate5_3", "gate2_1", "gate4_-1_all_halt_by_block7"]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return write_goldens(tmp_path_factory.mktemp("avit_synthetic"), H.synthetic_golden, SYNTHETIC)


def test_synthetic_goldens_exercise_what_they_should(synthetic):
    for name, (golden, _) in synthetic.items():
        depth = golden["counter_token"]
        assert golden["decision_margin_min"] > MIN_MARGIN, (name, golden["decision_margin_min"])
        assert golden["train"]["distr_prior_loss_added"], name
        if name.startswith("gate1_-5"):
            assert (depth == 1).all(), name
            assert (golden["active_tokens_per_layer"][:, 1:] == 0).all()
        elif name.startswith("gate4_-1"):
            assert depth.max() <= 7 and depth.max() > depth.min(), name
        else:
            assert len(depth.unique()) >= 6 and depth.max() == 12 and depth.min() <= 3, (name, H.depth_histogram(golden))
    assert synthetic["heldout"][0]["input"].shape == (3, 3, 80, 80)
    assert synthetic["heldout"][0]["output_post_norm"].shape == (3, 26, 60)


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_check_file_on_synthetic_golden(synthetic, name):
    golden, path = synthetic[name]
    try:
        comparisons = check_file(str(path))
    except RuntimeError as e:
        raise AssertionError(f"check_file crashed on the valid golden {name} "
                             f"(depth histogram {H.depth_histogram(golden)}): {e}") from e
    bad = [c.line() for c in comparisons if not c.ok]
    assert not bad, bad
    assert sum("gradients" in c.name for c in comparisons) == 6


def test_a_wrong_reference_is_caught(synthetic, tmp_path):
    """A reference whose prior ignores the gradient of the halted tokens' outputs (halted rows' h detached) must
    fail check_file where those outputs matter, which is also why the 10/30 gate alone could not test it."""
    caught = []
    for name in SENSITIVE:
        wrong = H.synthetic_golden(detach_halted_scores=True, **SYNTHETIC[name])
        right = synthetic[name][0]
        assert torch.equal(wrong["logits"], right["logits"])  # same forward, only the prior gradient differs
        path = tmp_path / f"wrong_{name}.pt"
        torch.save(wrong, path)
        bad = [c.name for c in check_file(str(path)) if not c.ok]
        if bad:
            assert all("distr gradients" in n or "total gradients" in n for n in bad), bad
            caught.append(name)
    assert caught == SENSITIVE, f"the wrong reference went unnoticed on {sorted(set(SENSITIVE) - set(caught))}"
    # At the README tiny gate (10/30) the two references agree within the gradient tolerance.
    wrong = H.synthetic_golden(detach_halted_scores=True, **SYNTHETIC["batch2"])
    right = synthetic["batch2"][0]
    scale = max(g.abs().max().item() for g in right["grads"]["distr"].values())
    worst = max(_max_diff(wrong["grads"]["distr"][k], g) for k, g in right["grads"]["distr"].items())
    assert worst <= GRAD_RTOL * scale


# ==============================================================================================================
# 3. Packed vs masked execution
# ==============================================================================================================

@pytest.fixture(scope="module")
def spread():
    """Random official-layout weights (gate 5/3) whose halting depths spread from 1 to 12, 5 images."""
    config = H.golden_config(gate_scale=5, gate_center=3, ponder=1e-3, alpha=1e-2)
    sd = H.random_state_dict(seed=11, patch_scale=3.0, drift=0.35, bias_std=0.02)
    images = _images(5, 64, seed=3)
    labels = torch.tensor([1, 0, 7, 3, 9])
    with torch.no_grad():
        ref = H.ref_forward(H.ref_config(config), sd, images)
    assert ref["margin"] > MIN_MARGIN
    assert len(ref["counter"].unique()) >= 6 and ref["counter"].max() == 12 and ref["counter"].min() == 1
    assert (ref["active"][:, -1].sum() > 0) and (ref["active"] < ref["active"][:, :1]).any()
    return {"config": config, "sd": sd, "images": images, "labels": labels, "ref": ref}


def test_packed_matches_masked_and_reference(spread):
    ref, images = spread["ref"], spread["images"]
    out = {}
    for execution in ("packed", "masked"):
        model = _model(spread["config"], spread["sd"], execution)
        with torch.no_grad():
            logits = model(images)
        out[execution] = (logits, model.last_depth.clone(), model.last_token_counts.clone(), model.last_rho.clone())
        assert _max_diff(logits, ref["logits"]) <= OUT_ATOL, execution
        assert torch.equal(model.last_depth, ref["counter"]), execution
        assert _max_diff(model.last_rho, ref["rho"]) <= OUT_ATOL, execution
        assert torch.equal(model.last_token_counts[..., 0], ref["active"].long()), execution
        assert torch.equal(model.last_token_counts[..., 1], ref["active"].long()), execution
    (lp, dp, cp, _), (lm, dm, cm, _) = out["packed"], out["masked"]
    assert _max_diff(lp, lm) <= OUT_ATOL
    assert torch.equal(dp, dm)
    assert torch.equal(cp, cm)


@pytest.mark.parametrize("execution", ["packed", "masked"])
def test_images_are_independent(spread, execution):
    """An image's logits and depths do not depend on its batch-mates (each alone, reversed batch, batch 1)."""
    model = _model(spread["config"], spread["sd"], execution)
    images = spread["images"]
    with torch.no_grad():
        batched = model(images)
        depth, counts = model.last_depth.clone(), model.last_token_counts.clone()
        reverse = torch.arange(images.shape[0] - 1, -1, -1)
        rev = model(images[reverse])
        assert _max_diff(rev[reverse], batched) <= OUT_ATOL
        assert torch.equal(model.last_depth[reverse], depth)
        assert torch.equal(model.last_token_counts[reverse], counts)
        for i in range(images.shape[0]):
            alone = model(images[i:i + 1])
            assert alone.shape == (1, 10)
            assert _max_diff(alone, batched[i:i + 1]) <= OUT_ATOL, i
            assert torch.equal(model.last_depth, depth[i:i + 1]), i
            assert torch.equal(model.last_token_counts, counts[i:i + 1]), i
            assert _max_diff(alone, spread["ref"]["logits"][i:i + 1]) <= OUT_ATOL, i


def _mac_formula(active, dim, hidden, patches, patch_area, classes):
    """specs §1.8: sum_l [n_l (4 C^2 + 2 mlp C^2) + 2 n_l^2 C] + patch embedding + head, per image."""
    n = active.double()
    blocks = (n * (4 * dim * dim + 2 * dim * hidden) + 2 * n * n * dim).sum(dim=1)
    return blocks + patches * 3 * patch_area * dim + dim * classes


def test_packed_really_removes_halted_tokens(spread):
    ref, images = spread["ref"], spread["images"]
    b, n = ref["counter"].shape
    rows = {}
    for execution in ("packed", "masked"):
        model = _model(spread["config"], spread["sd"], execution)
        seen = [0] * len(model.blocks)

        def hook(i):
            def fn(module, inputs, output):
                seen[i] += inputs[0].numel() // inputs[0].shape[-1]
            return fn

        handles = [blk.mlp.fc1.register_forward_hook(hook(i)) for i, blk in enumerate(model.blocks)]
        with torch.no_grad():
            model(images)
        for handle in handles:
            handle.remove()
        rows[execution] = seen
        macs = vit_macs(model, model.last_token_counts)
        expected = _mac_formula(ref["active"], 48, 192, n - 1, 16 * 16, 10)
        assert torch.allclose(macs, expected, rtol=1e-12, atol=0), execution
    live = ref["active"].sum(dim=0).long().tolist()  # live tokens at each block, over the batch
    assert rows["packed"] == live
    assert rows["masked"] == [b * n if x > 0 else 0 for x in live]
    assert rows["packed"][-1] < b * n and sum(rows["packed"]) < sum(rows["masked"])
    # An image whose tokens run fewer blocks costs fewer MACs (packed or masked: the same analytic count).
    active = ref["active"]
    dense = _mac_formula(torch.full_like(active, n), 48, 192, n - 1, 16 * 16, 10)
    assert (macs < dense).all()
    pairs = [(i, j) for i, j in itertools.permutations(range(b), 2)
             if (active[i] <= active[j]).all() and (active[i] < active[j]).any()]
    assert pairs, "no image is dominated by another; pick other seeds"
    for i, j in pairs:
        assert macs[i] < macs[j], (i, j)


def test_every_token_halting_at_block0_skips_later_blocks():
    """gate 1/-5: every h > 0.99 at the first block; blocks 1..11 run on no token (packed and masked)."""
    kw = SYNTHETIC["gate1_-5_all_halt_at_block0"]
    config = H.golden_config(gate_scale=1, gate_center=-5)
    sd = H.random_state_dict(seed=0, patch_scale=kw["patch_scale"], drift=kw["drift"], bias_std=kw["bias_std"])
    images = _images(3, 64, seed=9)
    with torch.no_grad():
        ref = H.ref_forward(H.ref_config(config), sd, images)
    assert (ref["counter"] == 1).all() and ref["margin"] > MIN_MARGIN
    for execution in ("packed", "masked"):
        model = _model(config, sd, execution)
        calls = []
        model.blocks[1].mlp.fc1.register_forward_hook(lambda m, i, o: calls.append(1))
        with torch.no_grad():
            logits = model(images)
        assert _max_diff(logits, ref["logits"]) <= OUT_ATOL, execution
        assert (model.last_depth == 1).all()
        assert (model.last_token_counts[:, 0] == 17).all() and (model.last_token_counts[:, 1:] == 0).all()
        assert not calls, f"{execution}: block 1 ran although every token had halted"


# ==============================================================================================================
# 4. Losses
# ==============================================================================================================

def _train_model(spread, execution="packed", extra=()):
    return _model(spread["config"], spread["sd"], execution, extra).train()  # every drop rate is 0


def test_official_prior_skipped_on_one_image(spread, caplog):
    ref_params = {k: v.clone().requires_grad_(True) for k, v in spread["sd"].items()}
    images, labels = spread["images"][:1], spread["labels"][:1]
    ref = H.ref_forward(H.ref_config(spread["config"]), ref_params, images, labels)
    assert math.isnan(ref["prior"].item())  # official: mean of an empty batch slice, and NaN > 0 is False
    model = _train_model(spread)
    with caplog.at_level(logging.WARNING, logger="vitadapt"):
        model(images)
        model.auxiliary_losses()
        logits = model(images)
        aux = model.auxiliary_losses()
    prior = aux["halting_prior"]
    assert prior.item() == 0.0 and not prior.requires_grad
    assert torch.isnan(model.last_halting_scores).all()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "prior" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]  # once per model, not per step
    total = F.cross_entropy(logits, labels) + sum(aux.values())
    assert _max_diff(total, ref["total"]) <= LOSS_ATOL
    mine = _grads(total, model)
    assert all(torch.isfinite(g).all() for g in mine.values())
    _assert_grads_close(mine, _ref_grads(ref["total"], ref_params), "total loss, batch 1")


@pytest.mark.parametrize("which", [[0, 1, 2], [1]], ids=["batch3", "batch1"])
@pytest.mark.parametrize("execution", ["packed", "masked"])
def test_corrected_prior_matches_independent_computation(spread, which, execution):
    weight, target_depth = 1e-2, 8
    images = spread["images"][which]  # image 1 has a token that runs all 12 blocks
    ref_params = {k: v.clone().requires_grad_(True) for k, v in spread["sd"].items()}
    ref = H.ref_forward(H.ref_config(spread["config"]), ref_params, images)
    expected = H.corrected_prior(ref["h"], ref["masks"], weight, target_depth)
    model = _train_model(spread, execution, ["AVIT.OFFICIAL_PRIOR", "False", "AVIT.PRIOR_WEIGHT", str(weight)])
    model(images)
    prior = model.auxiliary_losses()["halting_prior"]
    assert prior.requires_grad and prior.item() > 0  # always added, one image or more
    assert _max_diff(prior, expected) <= LOSS_ATOL
    _assert_grads_close(_grads(prior, model), _ref_grads(expected, ref_params), "corrected prior")


@pytest.mark.parametrize("gate", [(1.0, -10.0), (1.0, -1.0)], ids=["all_halt_at_block0", "all_halt_by_block2"])
def test_corrected_prior_when_every_token_halts_early(gate):
    """OFFICIAL_PRIOR False on a batch whose tokens all halt before the last block: the blocks nobody runs score 0
    (a halted token counts 0), so the prior still compares VIT.DEPTH scores with the VIT.DEPTH-long target."""
    scale, center = gate
    cfg = load_config("", TINY_AVIT + ["AVIT.GATE_SCALE", str(scale), "AVIT.GATE_CENTER", str(center),
                                       "AVIT.OFFICIAL_PRIOR", "False", "AVIT.PRIOR_WEIGHT", "1e-2"])
    torch.manual_seed(0)
    model = build_model(cfg).train()
    images = _images(3, 32, seed=1)
    ref_params = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    ref = H.ref_forward({"num_heads": 3, "patch_size": 8, "gate_scale": scale, "gate_center": center,
                         "ponder": 0.0, "alpha": 0.0}, ref_params, images)
    assert ref["counter"].max() < 4 and ref["margin"] > MIN_MARGIN
    expected = H.corrected_prior(ref["h"], ref["masks"], 1e-2, 2)
    model(images)
    assert torch.equal(model.last_depth, ref["counter"])
    assert model.last_halting_scores is not None and model.last_halting_scores.shape == (4,), (
        f"one halting score per block expected, got {None if model.last_halting_scores is None else tuple(model.last_halting_scores.shape)}"
        " (blocks skipped because every token halted are left out of the corrected prior)")
    prior = model.auxiliary_losses()["halting_prior"]
    assert _max_diff(prior, expected) <= LOSS_ATOL


def test_corrected_prior_on_one_image_whose_tokens_halt_before_the_last_block(spread):
    """The same situation on the 12-block model: image 0 alone, whose deepest token runs 10 blocks."""
    ref = H.ref_forward(H.ref_config(spread["config"]), spread["sd"], spread["images"][:1])
    assert ref["counter"].max() == 10
    expected = H.corrected_prior(ref["h"], ref["masks"], 1e-2, 8)
    model = _train_model(spread, "packed", ["AVIT.OFFICIAL_PRIOR", "False", "AVIT.PRIOR_WEIGHT", "1e-2"])
    model(spread["images"][:1])
    scores = model.last_halting_scores
    assert scores is not None and scores.shape == (12,), f"halting scores of shape {tuple(scores.shape)}, not (12,)"
    assert _max_diff(model.auxiliary_losses()["halting_prior"], expected) <= LOSS_ATOL


def test_official_prior_target_matches_golden(golden_dev):
    assert _max_diff(prior_target(12, 8, official=True), golden_dev["distr_target"]) <= 1e-7


def test_prior_targets():
    official = prior_target(12, 8, official=True)
    assert official.sum().item() == pytest.approx(3.26, abs=5e-3)
    assert _max_diff(official, H.official_target(12, 8)) <= 1e-7
    assert official.argmax().item() == 8 and official[8].item() == pytest.approx(1.3009, abs=1e-4)
    assert official[:8].sum().item() == pytest.approx(0.98, abs=1e-6)
    corrected = prior_target(12, 8, official=False)
    assert corrected.sum().item() == pytest.approx(1.0, abs=1e-6)
    assert corrected.argmax().item() == 8
    assert _max_diff(corrected[7], corrected[9]) <= 1e-7  # unit Gaussian around index 8
    assert _max_diff(corrected, official / official.sum()) <= 1e-7
    small = prior_target(4, 2, official=False)
    assert small.shape == (4,) and small.sum().item() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("execution", ["packed", "masked"])
def test_ponder_loss(spread, execution):
    images, labels = spread["images"], spread["labels"]
    ref_params = {k: v.clone().requires_grad_(True) for k, v in spread["sd"].items()}
    ref = H.ref_forward(H.ref_config(spread["config"]), ref_params, images, labels)
    model = _train_model(spread, execution)
    model(images)
    ponder = model.auxiliary_losses()["ponder"]
    assert model.ponder_weight == 1e-3
    assert _max_diff(ponder, 1e-3 * model.last_rho.mean()) <= 1e-9
    assert _max_diff(ponder, ref["ponder"]) <= LOSS_ATOL
    grads = _grads(ponder, model)
    _assert_grads_close(grads, _ref_grads(ref["ponder"], ref_params), "ponder loss")
    last = len(model.blocks) - 1
    reached = [k for k, g in grads.items() if g.abs().max() > 0]
    assert not [k for k in reached if k.startswith(f"blocks.{last}.") or k.startswith(("norm.", "head."))], reached
    assert "blocks.0.mlp.fc2.bias" in reached and "patch_embed.proj.weight" in reached


def test_losses_need_a_training_forward(spread):
    model = _model(spread["config"], spread["sd"])
    with torch.no_grad():
        model(spread["images"])
    assert model.last_halting_scores is None
    with pytest.raises(RuntimeError, match="training"):
        model.auxiliary_losses()
    model.train()
    model(spread["images"])
    assert model.last_halting_scores.shape == (12,)
    assert set(model.auxiliary_losses()) == {"ponder", "halting_prior"}


# ==============================================================================================================
# 5. Training
# ==============================================================================================================

TINY_AVIT = ["MODEL.NAME", "AViTVisionTransformer", "MODEL.NUM_CLASSES", "3", "NUM_GPUS", "0", "VIT.PATCH_SIZE", "8",
             "VIT.EMBED_DIM", "48", "VIT.DEPTH", "4", "VIT.NUM_HEADS", "3", "DATA.TRAIN_CROP_SIZE", "32",
             "DATA.TEST_CROP_SIZE", "32", "AVIT.PRIOR_TARGET_DEPTH", "2"]
RUN_GATE = (1.0, -0.5)  # at init h ~ 0.6: most tokens halt at block 2 of 4, some later


@pytest.fixture(scope="module")
def avit_run(tmp_path_factory, image_folder):
    out = tmp_path_factory.mktemp("avit_run") / "out"
    opts = h.tiny_opts(image_folder, out, MODEL__NAME="AViTVisionTransformer", VIT__DEPTH=4,
                       AVIT__GATE_SCALE=RUN_GATE[0], AVIT__GATE_CENTER=RUN_GATE[1], AVIT__PRIOR_TARGET_DEPTH=2,
                       SOLVER__MAX_EPOCH=2)
    rc = h.load_run_net().main(["--cfg", ""] + opts)
    return {"rc": rc, "out": out, "data": image_folder}


def test_run_net_logs_halting_stats(avit_run):
    assert avit_run["rc"] == 0
    out = avit_run["out"]
    epochs = h.records(out, "train_epoch")
    assert [r["epoch"] for r in epochs] == [1, 2]
    for r in epochs:
        assert 5e-4 <= r["loss_ponder"] <= 5e-4 * 5, r  # weight * mean(depth + remainder), depth in 1..4
        assert "loss_halting_prior" in r and math.isfinite(r["loss_halting_prior"]) and r["loss_halting_prior"] >= 0
        assert 1.0 <= r["token_depth"] < 4.0, r
        assert r["loss"] >= r["loss_ponder"]
    for r in h.records(out, "val"):
        assert 1.0 <= r["token_depth_mean"] <= 4.0 and "gmacs_mean" in r


def test_run_net_test_stats_match_an_independent_count(avit_run):
    """test_final's token depth and GMACs equal what the reference counts on the val images with the final weights,
    and agree with its tokens_per_block_mean."""
    from PIL import Image

    out, data = avit_run["out"], avit_run["data"]
    rec = h.records(out, "test_final")[-1]
    state = h.load_ckpt(h.ckpt_path(out, 2))["model_state"]
    items = h.list_split(data, "val")
    tf = h.timm_eval_transform()
    images = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in items])
    with torch.no_grad():
        ref = H.ref_forward({"num_heads": 3, "patch_size": 8, "gate_scale": RUN_GATE[0], "gate_center": RUN_GATE[1]},
                            state, images)
    assert ref["margin"] > MIN_MARGIN
    active = ref["active"]
    assert rec["num_images"] == len(items) == active.shape[0]
    depth = (active.sum(dim=1) / active[:, 0]).mean().item()
    assert rec["token_depth_mean"] == pytest.approx(depth, rel=1e-5)
    assert 1.0 < depth < 4.0
    assert rec["tokens_per_block_mean"] == pytest.approx(active.mean(dim=0).tolist(), abs=1e-3)
    tokens = rec["tokens_per_block_mean"]
    assert rec["token_depth_mean"] == pytest.approx(sum(tokens) / tokens[0], abs=1e-3)
    gmacs = _mac_formula(active, 48, 192, 16, 8 * 8, 3).mean().item() / 1e9
    assert rec["gmacs_mean"] == pytest.approx(gmacs, rel=1e-5)
    dense = _mac_formula(torch.full_like(active, 17), 48, 192, 16, 8 * 8, 3)[0].item() / 1e9
    assert rec["gmacs_mean"] < dense


def test_one_step_packed_equals_masked(spread):
    """CE + ponder + official prior: the same gradients, and after one SGD step the same parameters and depths."""
    images, labels = spread["images"], spread["labels"]
    grads, models = {}, {}
    for execution in ("packed", "masked"):
        model = _train_model(spread, execution)
        logits = model(images)
        loss = F.cross_entropy(logits, labels) + sum(model.auxiliary_losses().values())
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        opt.zero_grad()
        loss.backward()
        grads[execution] = {k: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                            for k, p in model.named_parameters()}
        opt.step()
        models[execution] = model
    _assert_grads_close(grads["packed"], grads["masked"], "packed vs masked", rtol=1e-5)
    sp, sm = models["packed"].state_dict(), models["masked"].state_dict()
    assert max(_max_diff(sp[k], sm[k]) for k in sp) <= 1e-6
    for model in models.values():
        model.eval()
    with torch.no_grad():
        lp, lm = models["packed"](images), models["masked"](images)
    assert _max_diff(lp, lm) <= OUT_ATOL
    assert torch.equal(models["packed"].last_depth, models["masked"].last_depth)


def test_distributed_training_with_blocks_no_token_reaches(tmp_path):
    """2 gloo processes, gate 1/-10: every token halts at block 0, so blocks 1..3 get no gradient (PRIOR_WEIGHT 0),
    or gradients only through the halted tokens' outputs of the official prior. DDP must cope with both
    (find_unused_parameters) and leave the same parameters on both ranks."""
    data = h.make_image_folder(tmp_path / "data", train_counts=(8, 8, 8), val_counts=(2, 2, 2))
    common = dict(NUM_PROCS=2, SOLVER__MAX_EPOCH=2, MODEL__NAME="AViTVisionTransformer", VIT__DEPTH=4,
                  AVIT__GATE_SCALE=1.0, AVIT__GATE_CENTER=-10.0, AVIT__PRIOR_TARGET_DEPTH=2, TEST__ENABLE=False)
    runs = {"no_prior": dict(AVIT__PRIOR_WEIGHT=0.0), "official_prior": dict(AVIT__PRIOR_WEIGHT=1e-2)}
    cfgs = {name: load_config("", h.tiny_opts(data, tmp_path / name, **common, **extra), check_files=True)
            for name, extra in runs.items()}
    launch_job(cfgs["no_prior"], functools.partial(H.distributed_halting_job, more_cfgs=(cfgs["official_prior"],)))
    for name in runs:
        out = tmp_path / name
        s0 = torch.load(out / "rank0.pt", map_location="cpu", weights_only=True)
        s1 = torch.load(out / "rank1.pt", map_location="cpu", weights_only=True)
        different = [k for k in s0 if not torch.equal(s0[k], s1[k])]
        assert not different, f"{name}: ranks disagree on {different}"
        for r in h.records(out, "train_epoch"):
            assert r["token_depth"] == 1.0, (name, r)
        first = h.load_ckpt(h.ckpt_path(out, 1))["model_state"]
        assert not torch.equal(first["blocks.0.mlp.fc2.weight"], s0["blocks.0.mlp.fc2.weight"]), name
        later = [k for k in s0 if k.startswith(("blocks.1.", "blocks.2.", "blocks.3."))]
        moved = [k for k in later if not torch.equal(first[k], s0[k])]
        if name == "no_prior":
            assert not moved, f"blocks no token ran were updated: {moved}"
        else:  # the official prior reads the halted tokens' outputs of every block
            assert "blocks.2.attn.proj.weight" in moved and "blocks.3.mlp.fc2.bias" in moved, moved


# ==============================================================================================================
# 6. Official checkpoint files
# ==============================================================================================================

def _official_file(path, sd):
    torch.save({"model": sd, "args": argparse.Namespace(model="avit_tiny_patch16_224", act_mode=4, gate_scale=10.0,
                                                        gate_center=30.0, distr_prior_alpha=1e-3)}, path)
    return str(path)


@pytest.fixture(scope="module")
def ckpt_sd():
    return H.random_state_dict(seed=3, patch_scale=3.0, drift=0.35)


def _fresh(scale, center):
    config = H.golden_config(gate_scale=scale, gate_center=center)
    cfg = load_config("", official_to_config_opts(config) + ["NUM_GPUS", "0"])
    torch.manual_seed(0)
    return build_model(cfg).eval(), config


@pytest.mark.parametrize("name,gate", [("tiny-10-30.pth", (10.0, 30.0)), ("visualization-tiny.pth", (5.0, 50.0)),
                                       ("my_avit_weights.pth", (5.0, 50.0))])
def test_official_checkpoint_loads_when_its_name_agrees_with_the_gate(tmp_path, ckpt_sd, name, gate):
    """<name>-<scale>-<center>.pth and visualization* (5/50) imply a gate; a plain name implies nothing."""
    path = _official_file(tmp_path / name, ckpt_sd)
    model, config = _fresh(*gate)
    load_weights(model, path)
    images = _images(3, 64, seed=4)
    with torch.no_grad():
        logits = model(images)
        ref = H.ref_forward(H.ref_config(config), ckpt_sd, images)
    assert _max_diff(logits, ref["logits"]) <= OUT_ATOL
    if ref["margin"] > MIN_MARGIN:  # halting decisions robust to float noise: depths must be equal
        assert torch.equal(model.last_depth, ref["counter"])
    if gate == (10.0, 30.0):  # the tiny-10-30 weights are chosen so that depths spread
        assert ref["margin"] > MIN_MARGIN and len(ref["counter"].unique()) >= 4


@pytest.mark.parametrize("name,gate", [("small-10-75.pth", (10.0, 30.0)), ("visualization-tiny.pth", (10.0, 30.0)),
                                       ("tiny-10-30.pth", (5.0, 50.0))])
def test_official_checkpoint_name_contradicting_gate_fails(tmp_path, ckpt_sd, name, gate):
    path = _official_file(tmp_path / name, ckpt_sd)
    model, _ = _fresh(*gate)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match="AVIT.GATE_SCALE") as err:
        load_weights(model, path)
    assert name in str(err.value)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing loaded


@pytest.mark.parametrize("change", ["missing", "unexpected"])
def test_official_checkpoint_with_wrong_keys_fails(tmp_path, ckpt_sd, change):
    sd = dict(ckpt_sd)
    if change == "missing":
        del sd["blocks.3.mlp.fc1.bias"]
        key = "blocks.3.mlp.fc1.bias"
    else:
        sd["blocks.3.halting.weight"] = torch.zeros(1, 48)
        key = "blocks.3.halting.weight"
    path = _official_file(tmp_path / "tiny-10-30.pth", sd)
    model, _ = _fresh(10.0, 30.0)
    with pytest.raises(VitadaptError, match=key.replace(".", r"\.")):
        load_weights(model, path)


# ==============================================================================================================
# 7. Config
# ==============================================================================================================

@pytest.mark.parametrize("key,value", [
    ("AVIT.HALTING_EPS", "0.0"), ("AVIT.HALTING_EPS", "1.0"), ("AVIT.HALTING_EPS", "-0.01"),
    ("AVIT.HALTING_EPS", "1.5"), ("AVIT.PONDER_WEIGHT", "-0.001"), ("AVIT.PRIOR_WEIGHT", "-0.001"),
    ("AVIT.PRIOR_TARGET_DEPTH", "4"), ("AVIT.PRIOR_TARGET_DEPTH", "7"), ("AVIT.PRIOR_TARGET_DEPTH", "0"),
], ids=lambda v: str(v))
def test_config_errors_name_the_key(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config("", TINY_AVIT + [key, value])


def test_config_valid_edges():
    cfg = load_config("", TINY_AVIT + ["AVIT.HALTING_EPS", "0.5", "AVIT.PONDER_WEIGHT", "0.0", "AVIT.PRIOR_WEIGHT",
                                       "0.0", "AVIT.PRIOR_TARGET_DEPTH", "3"])
    model = build_model(cfg)
    assert model.halting_eps == 0.5 and model.prior_weight == 0.0 and model.prior_target_depth == 3
    model.train()
    model(_images(2, 32))
    assert set(model.auxiliary_losses()) == {"ponder"}  # PRIOR_WEIGHT 0: no prior at all


def test_official_to_config_opts(golden_dev):
    pairs = dict(zip(*[iter(official_to_config_opts(golden_dev["config"]))] * 2))
    assert pairs["MODEL.NAME"] == "AViTVisionTransformer"
    assert float(pairs["AVIT.GATE_SCALE"]) == 10.0 and float(pairs["AVIT.GATE_CENTER"]) == 30.0
    assert float(pairs["AVIT.PONDER_WEIGHT"]) == 5e-4 and float(pairs["AVIT.PRIOR_WEIGHT"]) == 1e-3
    assert float(pairs["AVIT.HALTING_EPS"]) == 0.01 and pairs["AVIT.OFFICIAL_PRIOR"] == "True"
    assert pairs["DATA.TRAIN_CROP_SIZE"] == "64" and pairs["VIT.DEPTH"] == "12" and pairs["VIT.EMBED_DIM"] == "48"
    bad = {**golden_dev["config"], "args": {**golden_dev["config"]["args"], "act_mode": 1}}
    with pytest.raises(ValueError, match="act_mode"):
        official_to_config_opts(bad)
