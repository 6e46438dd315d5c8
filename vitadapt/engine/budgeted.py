"""DVT budgeted batch classification: per-exit confidence thresholds for a cascade of exits, and the
accuracy / expected-GFLOPs curve they give (official `inference.py`, spec evit_dvt.md 2.7).

Every sample runs through all exits; leaving early is simulated afterwards from the stored softmax outputs,
so a point of the curve is an (expected cost, accuracy) pair, not a measured speed. The arithmetic follows
the official code's dtypes (float32 proportions, thresholds and flop shares) so that its numbers are
reproduced bit for bit (golden: shared/golden/dvt, key `budgeted_batch`).
"""

from typing import Dict, List, Optional, Sequence, Tuple

import torch

# The official curve has points p = 1..59: exit proportions q^[1..K] normalised, with q = p/20.
OFFICIAL_BUDGET_POINTS = 59
# Threshold sentinels: nobody leaves at an exit whose threshold is NEVER; everybody left leaves at the last.
NEVER, ALWAYS = 1e8, -1e8


def exit_proportions(point: int, num_exits: int = 3) -> torch.Tensor:
    """float32 [num_exits]: the share of samples meant to leave at each exit for curve point `point`.

    q = point/20, so point 20 splits evenly and small points send most samples out at the first exit. Computed
    as exp(log(q) * k) in float32, as the official code does, so that its thresholds are reproduced exactly."""
    q = torch.tensor([point / 20], dtype=torch.float32)
    powers = torch.exp(torch.log(q) * torch.arange(1, num_exits + 1, dtype=torch.float32))
    return powers / powers.sum()


def confidences(probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(max probability, predicted class) per exit and sample, both [K, n], from probs [K, n, C]."""
    best = probs.max(dim=2)
    return best.values, best.indices


def find_thresholds(probs: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """float32 thresholds [..., K] for proportions [..., K] (one row per curve point), from softmax outputs
    probs [K, n, C] of a search set; equal to the official `dynamic_find_threshold`.

    Exit k's threshold is the confidence of the out_n-th most confident sample among those no earlier exit
    took, out_n = floor(n * proportions[k]) in float32. It stays 1e8 (nobody leaves) when out_n is 0 or exceeds
    the samples left; the last exit gets -1e8. Earlier exits take every sample with confidence >= threshold, ties
    included, so more than out_n may leave."""
    return thresholds_from_confidences(confidences(probs)[0], proportions)


def thresholds_from_confidences(conf: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """`find_thresholds` from the confidences [K, n] already taken. All rows at once: one sort per exit, then a
    running count of the samples still in the cascade along that order, searched for out_n."""
    num_exits, n = conf.shape
    rows = proportions.to(conf.device, torch.float32).reshape(-1, num_exits)
    wanted = (n * rows).floor().long()  # out_n, from the float32 product like the official code
    thresholds = torch.full_like(rows, NEVER)
    remaining = torch.ones(rows.shape[0], n, dtype=torch.bool, device=conf.device)
    for k in range(num_exits - 1):
        ranked, order = conf[k].sort(descending=True)
        # rank[p, i]: how many samples still in the cascade are among the i+1 most confident at exit k. It grows
        # by one at each of them, so the first position where it reaches out_n is the out_n-th one's.
        rank = remaining.index_select(1, order).cumsum(dim=1, dtype=torch.int32)
        position = torch.searchsorted(rank, wanted[:, k, None].int())[:, 0]
        found = (position < n) & (wanted[:, k] > 0)
        thresholds[:, k] = torch.where(found, ranked[position.clamp(max=n - 1)], thresholds[:, k])
        remaining &= conf[k] < thresholds[:, k, None]
    thresholds[:, -1] = ALWAYS
    return thresholds.reshape(proportions.shape)


def exit_indices(probs: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Long [..., n]: the exit each sample leaves at, the first k whose confidence >= thresholds[..., k]; the last
    exit catches all. thresholds [K] gives [n]; [P, K] gives [P, n]."""
    return first_exit(confidences(probs)[0], thresholds)


def first_exit(conf: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """`exit_indices` from the confidences [K, n] already taken (walked from the last exit back to the first)."""
    num_exits, thresholds = conf.shape[0], thresholds.to(conf.device)
    exits = torch.full(thresholds.shape[:-1] + conf.shape[1:], num_exits - 1, dtype=torch.long, device=conf.device)
    for k in reversed(range(num_exits - 1)):
        exits = torch.where(conf[k] >= thresholds[..., k, None], k, exits)
    return exits


def budgeted_evaluate(probs: torch.Tensor, targets: torch.Tensor, cumulative_gflops: Sequence[float],
                      thresholds: torch.Tensor) -> Tuple[float, float]:
    """(top-1 %, expected GFLOPs per image) when each sample leaves at its exit (`exit_indices`); equal to the
    official `dynamic_evaluate`. cumulative_gflops[k] is the cost of running exits 1..k."""
    conf, predicted = confidences(probs)
    accuracy, gflops = score_exits(predicted, targets, cumulative_gflops, first_exit(conf, thresholds))
    return accuracy[0], gflops[0]


def score_exits(predicted: torch.Tensor, targets: torch.Tensor, cumulative_gflops: Sequence[float],
                exits: torch.Tensor) -> Tuple[List[float], List[float]]:
    """Per row of exits [P, n] (or one [n]): (top-1 %, expected GFLOPs) of predictions [K, n] when sample i
    leaves at exits[p, i].

    The expected cost is accumulated like the official code: float32 share of the samples per exit, times its
    cost, summed in exit order from 0, so it is float32-derived. The accuracy is a float64 percentage."""
    num_exits, n = predicted.shape
    exits = exits.reshape(-1, n)
    right = (predicted == targets).gather(0, exits)  # [P, n]
    correct = right.sum(dim=1).tolist()
    offsets = num_exits * torch.arange(exits.shape[0], device=exits.device)[:, None]
    counts = torch.bincount((exits + offsets).flatten(), minlength=exits.numel() // n * num_exits)
    shares = 1.0 * counts.reshape(-1, num_exits).float() / n
    expected = torch.zeros(exits.shape[0], dtype=torch.float32, device=exits.device)
    for k in range(num_exits):
        expected = expected + shares[:, k] * float(cumulative_gflops[k])
    return [c * 100.0 / n for c in correct], expected.tolist()


def anytime_correct(probs_or_logits: torch.Tensor, targets: torch.Tensor) -> List[int]:
    """Per exit, how many samples its top-1 prediction gets right (as the official `accuracy`: top-1 of topk)."""
    top1 = probs_or_logits.topk(1, dim=2).indices[..., 0]
    return [int(c) for c in (top1 == targets).sum(dim=1)]


def anytime_accuracy(probs_or_logits: torch.Tensor, targets: torch.Tensor) -> List[float]:
    """Per-exit top-1 % when every sample runs to that exit (the cascade stopped at a fixed depth)."""
    return [c * 100.0 / targets.numel() for c in anytime_correct(probs_or_logits, targets)]


def budget_curve(search_probs: Optional[torch.Tensor], test_probs: torch.Tensor, test_targets: torch.Tensor,
                 cumulative_gflops: Sequence[float], points: Sequence[int] = range(1, OFFICIAL_BUDGET_POINTS + 1),
                 thresholds: Optional[torch.Tensor] = None) -> dict:
    """The accuracy / expected-GFLOPs curve, as a JSON-ready dict of plain Python numbers.

    Thresholds come from `find_thresholds` on search_probs (a held-out or training subset, never the test
    set), or are given as [len(points), K], e.g. the `dynamic_threshold` of an official checkpoint."""
    points = [int(p) for p in points]
    num_exits = test_probs.shape[0]
    if len(cumulative_gflops) != num_exits:
        raise ValueError(f"{len(cumulative_gflops)} cumulative GFLOPs for {num_exits} exits")
    proportions = torch.stack([exit_proportions(p, num_exits) for p in points])
    if thresholds is None:
        if search_probs is None:
            raise ValueError("budget_curve needs search_probs or thresholds")
        thresholds = find_thresholds(search_probs, proportions)
    thresholds = thresholds.to(test_probs.device, torch.float32)
    if thresholds.shape != proportions.shape:
        raise ValueError(f"thresholds of shape {tuple(thresholds.shape)}, expected {tuple(proportions.shape)}")
    conf, predicted = confidences(test_probs)
    exits = first_exit(conf, thresholds)  # [P, n]
    accuracy, gflops = score_exits(predicted, test_targets, cumulative_gflops, exits)
    fractions = torch.stack([torch.bincount(e, minlength=num_exits) for e in exits]).double() / exits.shape[1]
    return {"points": points, "proportions": proportions.tolist(), "thresholds": thresholds.tolist(),
            "expected_gflops": gflops, "top1_acc": accuracy,
            "exit_fractions": fractions.tolist(),
            "anytime": {"gflops": [float(g) for g in cumulative_gflops],
                        "top1_acc": anytime_accuracy(test_probs, test_targets)}}


def replay_official(bb: Dict[str, object]) -> Dict[str, object]:
    """Recomputes, from the stored softmax outputs of a golden `budgeted_batch` dict, what the official mode-2
    inference produced, under the golden's keys, for a parity check (golden anytime values are float32 running
    means, so compare them as counts)."""
    points = range(1, OFFICIAL_BUDGET_POINTS + 1)
    num_exits = bb["test_probs"].shape[0]
    proportions = torch.stack([exit_proportions(p, num_exits) for p in points])
    thresholds = find_thresholds(bb["train_probs"], proportions)
    conf, predicted = confidences(bb["test_probs"])
    exits = first_exit(conf, thresholds)
    accuracy, gflops = score_exits(predicted, bb["test_targets"], bb["flops"], exits)
    return {"exit_probs": proportions, "dynamic_threshold": thresholds,
            "budgeted_batch_classification": [gflops, accuracy],
            "anytime_classification": anytime_accuracy(bb["test_probs"], bb["test_targets"]),
            "anytime_correct": anytime_correct(bb["test_probs"], bb["test_targets"]),
            "exit_index": exits}
