"""The test job of a multi-exit model (DVT): its budgeted-batch and anytime curves, and its early-exit thresholds.

Before the early-exit evaluation, every exit runs on every image of two sets: a threshold-search set (a seeded
subset of DVT.THRESHOLD_SPLIT, seen with the test transform) and the test split. From their softmax outputs:
the anytime accuracy of each exit, and for every budget point the thresholds found on the search set and the
accuracy / expected GMACs they give on the test split (vitadapt.engine.budgeted), written to
OUTPUT_DIR/dvt_curves.json and dvt_curves.png. Then the thresholds of the operating point are set on the model,
and the ordinary evaluation runs it with real early exit.
"""

import json
import logging
import os
from typing import List, Optional, Tuple

import torch
from iopath.common.file_io import g_pathmgr

from vitadapt.config import ConfigError
from vitadapt.datasets import construct_loader
from vitadapt.utils import checkpoint as cu
from vitadapt.utils import distributed as du

from .budgeted import (ALWAYS, OFFICIAL_BUDGET_POINTS, budget_curve, budgeted_evaluate, exit_proportions,
                       find_thresholds)
from .evaluate import to_device

logger = logging.getLogger(__name__)
CURVES_JSON, CURVES_PNG = "dvt_curves.json", "dvt_curves.png"


@torch.no_grad()
def exit_probabilities(model, loader, device, amp_dtype=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """(softmax outputs [K, n, C], labels [n]) of every exit on every image of the loader, gathered from all
    processes in data set order."""
    model.eval()
    parts = []
    for batch in loader:
        if batch["inputs"] is None:
            continue
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            model(batch["inputs"])
        probs = torch.stack([logits.float().softmax(dim=-1) for logits in model.last_exit_logits])
        parts.append((batch["index"].cpu(), probs.cpu(), batch["labels"].cpu()))
    parts = [p for rank in du.all_gather_objects(parts) for p in rank]
    if not parts:
        raise ConfigError("no image could be decoded for the DVT curves / threshold search")
    order = torch.cat([p[0] for p in parts]).argsort()
    return torch.cat([p[1] for p in parts], dim=1)[:, order], torch.cat([p[2] for p in parts])[order]


def official_figures(path: str) -> dict:
    """What an official DVT release file stores besides its weights: `dynamic_threshold` [59, K] (float32 tensor)
    and its own `flops` / `anytime_classification`; empty for other files."""
    obj = cu.load_file(path)
    if not isinstance(obj, dict):
        return {}
    found = {key: obj[key] for key in ("dynamic_threshold", "flops", "anytime_classification") if key in obj}
    if "dynamic_threshold" in found:
        stored = torch.as_tensor(found["dynamic_threshold"], dtype=torch.float32)
        if stored.dim() != 2 or stored.shape[0] != OFFICIAL_BUDGET_POINTS:
            raise ConfigError(f"{path}: dynamic_threshold has shape {tuple(stored.shape)}, expected "
                              f"[{OFFICIAL_BUDGET_POINTS}, exits]")
        found["dynamic_threshold"] = stored
    for key in ("flops", "anytime_classification"):
        if key in found:
            logger.info("%s stores %s = %s", os.path.basename(path), key,
                        [round(float(v), 4) for v in torch.as_tensor(found[key]).flatten().tolist()])
    return found


def stored_thresholds(path: str) -> Optional[torch.Tensor]:
    """The `dynamic_threshold` [59, K] an official DVT checkpoint stores, or None."""
    return official_figures(path).get("dynamic_threshold")


def needs_threshold_search(cfg) -> bool:
    """Whether the early-exit thresholds come from a search on data (DVT.BUDGET_GMACS, or DVT.BUDGET_POINT with
    DVT.THRESHOLD_SOURCE search), rather than from the config (DVT.THRESHOLDS) or a checkpoint."""
    d = cfg.DVT
    return d.BUDGET_GMACS > 0 or (d.BUDGET_POINT > 0 and d.THRESHOLD_SOURCE == "search")


def prepare_exits(cfg, model, device, checkpoint_path: str, amp_dtype=None) -> dict:
    """Curves (when DVT.CURVES) and the early-exit thresholds of the test job, set on the model. Returns the
    statistics to log with the test results (the operating point and what the curve predicts for it)."""
    d = cfg.DVT
    gflops = (model.exit_macs(cfg.DATA.TEST_CROP_SIZE) / 1e9).tolist()
    stored = official_figures(checkpoint_path).get("dynamic_threshold")
    if d.THRESHOLD_SOURCE == "checkpoint" and stored is None:
        raise ConfigError(f"DVT.THRESHOLD_SOURCE checkpoint: {checkpoint_path} stores no dynamic_threshold "
                          "(official DVT .pth.tar files do); use DVT.THRESHOLD_SOURCE search")
    searching = d.CURVES or needs_threshold_search(cfg)
    model.set_thresholds(None)
    stats: dict = {"exit_gmacs": gflops}
    search = None
    if searching:
        if d.THRESHOLD_SPLIT == cfg.TEST.SPLIT:
            logger.warning("DVT.THRESHOLD_SPLIT is the test split (%s): the thresholds are tuned on the images they "
                           "are measured on", cfg.TEST.SPLIT)
        loader = construct_loader(cfg, d.THRESHOLD_SPLIT, du.get_rank(), du.get_world_size(), is_train=False,
                                  subset=(d.THRESHOLD_IMAGES, d.THRESHOLD_SEED))
        search = exit_probabilities(model, loader, device, amp_dtype)
        logger.info("threshold search: every exit on %d images of %s (seed %d)", search[1].numel(),
                    d.THRESHOLD_SPLIT, d.THRESHOLD_SEED)
    if d.CURVES:
        loader = construct_loader(cfg, cfg.TEST.SPLIT, du.get_rank(), du.get_world_size(), is_train=False)
        test_probs, test_labels = exit_probabilities(model, loader, device, amp_dtype)
        curves = {"budgeted (threshold search)": budget_curve(search[0], test_probs, test_labels, gflops)}
        if stored is not None and stored.shape[1] == model.num_exits:
            curves["budgeted (checkpoint thresholds)"] = budget_curve(None, test_probs, test_labels, gflops,
                                                                      thresholds=stored)
        anytime = curves["budgeted (threshold search)"]["anytime"]
        logger.info("anytime top-1 per exit: %s at %s GMACs", " / ".join(f"{a:.2f}%" for a in anytime["top1_acc"]),
                    " / ".join(f"{g:.4f}" for g in gflops))
        stats["anytime_top1_acc"] = anytime["top1_acc"]
        if du.is_master():
            write_curves(cfg, curves)
    thresholds = choose_thresholds(cfg, search, stored, gflops)
    if thresholds is not None:
        model.set_thresholds(thresholds)
        stats["thresholds"] = [round(t, 6) for t in thresholds]
        if search is not None:
            acc, cost = budgeted_evaluate(search[0], search[1], gflops, torch.tensor(thresholds + [ALWAYS]))
            stats.update(search_top1_acc=acc, search_expected_gmacs=cost)
        logger.info("early exit with thresholds %s", [round(t, 4) for t in thresholds])
    else:
        logger.info("no DVT thresholds (DVT.THRESHOLDS / BUDGET_POINT / BUDGET_GMACS): every exit runs, the last "
                    "one answers")
    return stats


def choose_thresholds(cfg, search, stored, gflops) -> Optional[List[float]]:
    """The operating point: DVT.THRESHOLDS, a budget point's thresholds (stored in the checkpoint, or searched on
    `search` = (probs [K, n, C], labels [n])), or the most accurate budget point (on the search set) within
    DVT.BUDGET_GMACS; None when none is asked for, or when the point needs a search and `search` is None."""
    d = cfg.DVT
    if d.THRESHOLDS:
        return [float(t) for t in d.THRESHOLDS[: len(gflops) - 1]]
    if d.BUDGET_POINT > 0 and d.THRESHOLD_SOURCE == "checkpoint":
        return stored[d.BUDGET_POINT - 1, :-1].tolist()
    if search is None:
        return None
    if d.BUDGET_POINT > 0:
        return find_thresholds(search[0], exit_proportions(d.BUDGET_POINT, len(gflops)))[:-1].tolist()
    if d.BUDGET_GMACS > 0:
        curve = budget_curve(search[0], search[0], search[1], gflops)  # every point at once, scored on the search set
        within = [i for i, cost in enumerate(curve["expected_gflops"]) if cost <= d.BUDGET_GMACS]
        if not within:
            raise ConfigError(f"DVT.BUDGET_GMACS {d.BUDGET_GMACS}: no budget point is that cheap on the search set "
                              f"(exit 1 alone costs {gflops[0]:.4f} GMACs per image)")
        best = max(within, key=lambda i: curve["top1_acc"][i])  # the first (cheapest order) of equal accuracies
        return curve["thresholds"][best][:-1]
    return None


def write_curves(cfg, curves: dict) -> None:
    from vitadapt.visualization.curves import plot_budget_curves

    path = os.path.join(cfg.OUTPUT_DIR, CURVES_JSON)
    with g_pathmgr.open(path + ".tmp", "w") as f:
        json.dump(curves, f, indent=1)
    os.replace(path + ".tmp", path)
    plot_budget_curves(curves, os.path.join(cfg.OUTPUT_DIR, CURVES_PNG), title=f"{cfg.MODEL.NAME} on {cfg.TEST.SPLIT}")
    logger.info("budgeted-batch and anytime curves written to %s and %s", path, CURVES_PNG)


@torch.no_grad()
def calibrate_on_inputs(cfg, model, images: torch.Tensor, checkpoint_path: str = "") -> Optional[List[float]]:
    """Thresholds for a benchmark, set on the model (choose_thresholds), a budget point's searched on these very
    images, so that the exits take the point's proportions of them whatever the weights. None (every exit runs)
    when none is asked for."""
    d = cfg.DVT
    if d.BUDGET_GMACS > 0:
        raise ConfigError("DVT.BUDGET_GMACS needs the threshold search of the test job (tools/run_net.py); for a "
                          "benchmark give DVT.BUDGET_POINT or DVT.THRESHOLDS")
    stored = None
    if d.BUDGET_POINT and d.THRESHOLD_SOURCE == "checkpoint":
        stored = stored_thresholds(checkpoint_path) if checkpoint_path else None
        if stored is None:
            raise ConfigError("DVT.THRESHOLD_SOURCE checkpoint: TEST.CHECKPOINT_FILE_PATH stores no dynamic_threshold")
    search = None
    if d.BUDGET_POINT and d.THRESHOLD_SOURCE == "search":
        model.set_thresholds(None)
        model.eval()
        parts = []
        for chunk in images.split(32):
            model(chunk)
            parts.append(torch.stack([logits.float().softmax(-1) for logits in model.last_exit_logits]).cpu())
        search = (torch.cat(parts, dim=1), None)
    thresholds = choose_thresholds(cfg, search, stored, (model.exit_macs() / 1e9).tolist())
    model.set_thresholds(thresholds)
    return thresholds
