"""DVT budgeted batch classification (vitadapt/engine/budgeted.py): bit-exact replay of the official
`inference.py` on the golden softmax outputs, golden-free checks of the threshold search against a per-sample
reference, and the accuracy-vs-GMACs figure (vitadapt/visualization/curves.py)."""

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from helpers_e2e import load_golden_or_skip
from vitadapt.engine.budgeted import (OFFICIAL_BUDGET_POINTS, anytime_accuracy, anytime_correct, budget_curve,
                                      budgeted_evaluate, exit_indices, exit_proportions, find_thresholds,
                                      replay_official)
from vitadapt.visualization.curves import SIZE, plot_budget_curves

REPO = Path(__file__).resolve().parents[1]
GOLDEN_ROOT = Path(os.environ.get("VITADAPT_GOLDEN_DIR") or (REPO.parent / "shared" / "golden"))
GOLDEN_DVT = GOLDEN_ROOT / "dvt" / "golden_dev.pt"
GOLDEN_T2T = GOLDEN_ROOT / "dvt" / "golden_t2t_dev.pt"
GFLOPS = [1.1453, 3.6558, 8.8427]  # DVT-DeiT-S cumulative GFLOPs per exit (flops_table.md)


# float32 relative spacing: the exit proportions are exp(log(q) * k) / sum in float32, which torch computes with
# MKL's vector math on an MKL build; its code path, hence the last bits (2 ulp seen), depends on the CPU (the
# goldens replay bit for bit under MKL_CBWR=COMPATIBLE, see test_golden_exit_proportions_bit_for_bit_on_mkl_compatible_path).
FLOAT32_ULP = torch.finfo(torch.float32).eps


def assert_replays_official(bb: dict) -> None:
    mine = replay_official(bb)
    torch.testing.assert_close(mine["exit_probs"], bb["exit_probs"], rtol=2 * FLOAT32_ULP, atol=0)  # 2 ulp
    assert torch.equal(mine["dynamic_threshold"], bb["dynamic_threshold"])
    assert torch.equal(mine["exit_index"], bb["exit_index"])
    gflops, accuracy = bb["budgeted_batch_classification"]
    assert mine["budgeted_batch_classification"] == [gflops, accuracy]
    # The official anytime values are float32 running means: compare the counts they stand for.
    n = bb["test_targets"].numel()
    assert mine["anytime_correct"] == [round(a * n / 100) for a in bb["anytime_classification"]]
    assert mine["anytime_classification"] == pytest.approx(bb["anytime_classification"], abs=1e-4)


def test_golden_budgeted_batch_is_replayed_bit_for_bit():
    assert_replays_official(load_golden_or_skip(GOLDEN_DVT)["budgeted_batch"])


def test_golden_exit_proportions_bit_for_bit_on_mkl_compatible_path():
    """On MKL's CPU-independent code path (MKL_CBWR=COMPATIBLE, set before torch loads MKL) the 59 x 3 exit
    proportions equal the golden's bit for bit, and so does everything computed from them."""
    load_golden_or_skip(GOLDEN_DVT)
    import subprocess
    import sys

    script = ("import sys, torch; from vitadapt.engine.budgeted import replay_official; "
              "bb = torch.load(sys.argv[1], weights_only=False)['budgeted_batch']; mine = replay_official(bb); "
              "keys = ('exit_probs', 'dynamic_threshold', 'exit_index'); "
              "print('differ:', [k for k in keys if not torch.equal(mine[k], bb[k])])")
    env = dict(os.environ, MKL_CBWR="COMPATIBLE", PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", script, str(GOLDEN_DVT)], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "differ: []", out.stdout


def test_golden_t2t_budgeted_batch_is_replayed_bit_for_bit():
    golden = load_golden_or_skip(GOLDEN_T2T)
    if "budgeted_batch" not in golden:
        pytest.skip(f"{GOLDEN_T2T.name} has no budgeted_batch entry")
    assert_replays_official(golden["budgeted_batch"])


def test_golden_curve_from_stored_thresholds_equals_the_official_one():
    bb = load_golden_or_skip(GOLDEN_DVT)["budgeted_batch"]
    curve = budget_curve(None, bb["test_probs"], bb["test_targets"], bb["flops"],
                         thresholds=bb["dynamic_threshold"])
    assert [curve["expected_gflops"], curve["top1_acc"]] == bb["budgeted_batch_classification"]
    assert curve == budget_curve(bb["train_probs"], bb["test_probs"], bb["test_targets"], bb["flops"])


# ----------------------------------------------------------------------------------------------------------------
# Golden-free


def reference_thresholds(probs: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """Obviously-correct threshold search, one sample at a time: at each exit, go through the samples no earlier
    exit took, most confident first, and stop at the out_n-th."""
    conf = probs.max(dim=2).values
    num_exits, n = conf.shape
    thresholds = torch.full((num_exits,), 1e8)
    left = list(range(n))
    for k in range(num_exits - 1):
        out_n = int(torch.floor(n * proportions[k].float()))
        by_confidence = sorted(left, key=lambda i: -conf[k, i].item())
        if 1 <= out_n <= len(by_confidence):
            thresholds[k] = conf[k, by_confidence[out_n - 1]]
        left = [i for i in left if not conf[k, i] >= thresholds[k]]
    thresholds[-1] = -1e8
    return thresholds


def random_probs(n: int, classes: int, seed: int, levels: int = 0) -> torch.Tensor:
    """[3, n, classes] softmax outputs; with `levels`, rounded to multiples of 1/levels (many tied confidences)."""
    g = torch.Generator().manual_seed(seed)
    probs = (torch.randn(3, n, classes, generator=g) * torch.tensor([1.0, 2.0, 3.0])[:, None, None]).softmax(-1)
    return (probs * levels).round() / levels if levels else probs


@pytest.mark.parametrize("levels", [0, 16])
def test_find_thresholds_equals_a_per_sample_reference(levels):
    probs = random_probs(203, 6, seed=levels, levels=levels)
    cases = [exit_proportions(p) for p in (1, 5, 20, 40, 59)]
    cases += [torch.tensor([0.001, 0.5, 0.499]), torch.tensor([0.5, 0.001, 0.499]),  # out_n == 0 at one exit
              torch.tensor([0.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0])]  # nobody / everybody leaves early
    for proportions in cases:
        assert torch.equal(find_thresholds(probs, proportions), reference_thresholds(probs, proportions)), proportions
    batched = find_thresholds(probs, torch.stack(cases))
    assert torch.equal(batched, torch.stack([reference_thresholds(probs, p) for p in cases]))


def test_out_n_zero_means_nobody_leaves_at_that_exit():
    probs = random_probs(50, 4, seed=3)
    thresholds = find_thresholds(probs, torch.tensor([0.01, 0.01, 0.98]))  # floor(50 * 0.01) = 0
    assert thresholds.tolist() == [1e8, 1e8, -1e8]
    assert exit_indices(probs, thresholds).eq(2).all()


def distinct_confidence_probs(n: int, classes: int, seed: int) -> torch.Tensor:
    """[3, n, classes] probabilities whose max per exit takes n distinct values by construction (random softmax
    outputs can tie in float32, and whether they do depends on the CPU's exp)."""
    g = torch.Generator().manual_seed(seed)
    top = (0.2 + 0.7 * (torch.arange(n, dtype=torch.float64) + 0.5) / n)[torch.stack([torch.randperm(n, generator=g)
                                                                                      for _ in range(3)])]
    probs = ((1 - top) / (classes - 1))[..., None].expand(3, n, classes).clone()
    probs.scatter_(2, torch.randint(0, classes, (3, n, 1), generator=g), top[..., None])
    return probs.float()


def test_exit_fractions_follow_the_proportions_when_confidences_are_distinct():
    n = 1000
    probs = distinct_confidence_probs(n, 10, seed=4)
    assert all(torch.unique(c).numel() == n for c in probs.max(dim=2).values)
    for point in (1, 10, 20, 35, 59):
        proportions = exit_proportions(point)
        exits = exit_indices(probs, find_thresholds(probs, proportions))
        out_n = (n * proportions).floor().long()
        counts = torch.bincount(exits, minlength=3)
        assert counts[:2].tolist() == out_n[:2].tolist()
        assert counts[2] == n - out_n[:2].sum()


def test_sentinel_thresholds_send_everybody_to_one_exit():
    probs = random_probs(300, 7, seed=5)
    targets = torch.randint(0, 7, (300,), generator=torch.Generator().manual_seed(6))
    per_exit = anytime_accuracy(probs, targets)
    assert budgeted_evaluate(probs, targets, GFLOPS, torch.tensor([1e8, 1e8, -1e8])) == (
        per_exit[2], float(torch.tensor(GFLOPS[2], dtype=torch.float32)))
    assert budgeted_evaluate(probs, targets, GFLOPS, torch.tensor([-1e8, -1e8, -1e8])) == (
        per_exit[0], float(torch.tensor(GFLOPS[0], dtype=torch.float32)))
    assert anytime_correct(probs, targets) == [round(a * 3) for a in per_exit]


def test_more_samples_at_late_exits_cost_no_fewer_gflops():
    probs, test = random_probs(500, 10, seed=7), random_probs(400, 10, seed=8)
    targets = torch.randint(0, 10, (400,), generator=torch.Generator().manual_seed(9))
    curve = budget_curve(probs, test, targets, GFLOPS)
    assert curve["points"] == list(range(1, OFFICIAL_BUDGET_POINTS + 1))
    costs = curve["expected_gflops"]
    assert all(a <= b for a, b in zip(costs, costs[1:]))
    assert GFLOPS[0] <= costs[0] and costs[-1] <= GFLOPS[2]
    assert all(sum(f) == pytest.approx(1.0) for f in curve["exit_fractions"])
    assert curve["anytime"] == {"gflops": GFLOPS, "top1_acc": anytime_accuracy(test, targets)}


def test_budget_curve_rejects_mismatched_inputs():
    probs = random_probs(20, 3, seed=10)
    targets = torch.zeros(20, dtype=torch.long)
    with pytest.raises(ValueError, match="3 exits"):
        budget_curve(probs, probs, targets, GFLOPS[:2])
    with pytest.raises(ValueError, match="search_probs or thresholds"):
        budget_curve(None, probs, targets, GFLOPS)
    with pytest.raises(ValueError, match="thresholds of shape"):
        budget_curve(None, probs, targets, GFLOPS, points=[1, 2], thresholds=torch.zeros(3, 3))


# ----------------------------------------------------------------------------------------------------------------
# Figure


def test_plot_budget_curves_writes_a_png(tmp_path):
    probs = random_probs(200, 10, seed=11)
    targets = torch.randint(0, 10, (200,), generator=torch.Generator().manual_seed(12))
    curve = budget_curve(probs, probs, targets, GFLOPS, points=range(1, 60, 4))
    path = tmp_path / "figs" / "budget.png"
    plot_budget_curves({"DVT": curve, "half cost": {**curve, "expected_gflops": [g / 2 for g in
                                                                                   curve["expected_gflops"]]}},
                       str(path), title="budgeted batch")
    image = Image.open(path)
    assert image.format == "PNG" and image.size == SIZE
    assert image.convert("L").getextrema()[0] < 128  # something dark was drawn
    assert [p.name for p in path.parent.iterdir()] == ["budget.png"]  # no temporary file left behind


def test_plot_budget_curves_refuses_nothing_to_draw(tmp_path):
    with pytest.raises(ValueError, match="no curve"):
        plot_budget_curves({}, str(tmp_path / "empty.png"))
    with pytest.raises(ValueError, match="no curve"):
        plot_budget_curves({"empty": {"expected_gflops": [], "top1_acc": []}}, str(tmp_path / "empty.png"))
    assert not list(tmp_path.iterdir())
