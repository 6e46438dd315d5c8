"""Evaluation: top-1/top-5, loss and per-image GMACs over a split, reduced exactly across processes."""

import logging
import time
from datetime import timedelta
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from vitadapt.datasets.kinetics import ENSEMBLE_METHODS, ENSEMBLE_SCORES
from vitadapt.errors import VitadaptError
from vitadapt.utils import distributed as du
from vitadapt.utils.checkpoint import unwrap

logger = logging.getLogger(__name__)


class NoUsableImages(VitadaptError, RuntimeError):
    """Every image of a split or an epoch was skipped as undecodable: there is nothing to train or measure."""


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits (k is capped at the number of classes)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


def token_depth(token_counts: torch.Tensor) -> torch.Tensor:
    """[B] blocks a token runs through on average (at attention), from token_counts [B, depth, 2]: the mean
    per-token depth of a token-halting model (A-ViT)."""
    return token_counts[..., 0].sum(dim=1).double() / token_counts[:, 0, 0].double()


def reports(model, statistic: str) -> bool:
    """Whether a per-image statistic is defined for this model: "kept_tokens" for methods that change which
    tokens exist, "token_depth" for token halting (see README, 'Statistics in the logs')."""
    return statistic in getattr(unwrap(model), "token_statistics", ())


def exit_records(model, labels: torch.Tensor) -> dict:
    """A multi-exit model's (DVT) per-batch record: the exit each image left at and, when every exit ran (no
    thresholds), whether each exit's prediction is right."""
    record = {"exit": model.last_exit.cpu()}
    if model.last_exit_logits is not None:
        record["correct"] = torch.stack([l.argmax(dim=1) == labels for l in model.last_exit_logits], dim=1).cpu()
    return record


def exit_statistics(records: list, num_exits: int) -> dict:
    """Exit histogram (images per exit, 1-based in the names) and, when every exit ran, top-1 of every exit."""
    exit_of = torch.cat([r["exit"] for r in records])
    counts = torch.bincount(exit_of, minlength=num_exits)
    out = {"exit_counts": counts.tolist(), "exit_fractions": [round(c / exit_of.numel(), 6) for c in counts.tolist()]}
    if all("correct" in r for r in records):
        correct = torch.cat([r["correct"] for r in records]).double()
        out["top1_acc_per_exit"] = (100.0 * correct.mean(dim=0)).tolist()
    return out


def video_dataset(dataset):
    """The data set under the loader's wrappers (_Indexed, Subset) that defines `video_index`, and the item of it
    each position of `dataset` reads; (None, None) for a data set without videos (images)."""
    chain = []
    while not hasattr(dataset, "video_index"):
        chain.append(dataset)
        dataset = getattr(dataset, "dataset", None)
        if dataset is None:
            return None, None
    items = torch.arange(len(dataset))
    for wrapper in reversed(chain):  # innermost first: a Subset picks among the items below it
        if isinstance(wrapper, Subset):
            items = items[torch.as_tensor(wrapper.indices, dtype=torch.long)]
    return dataset, items


def ensemble(video: torch.Tensor, scores: torch.Tensor, num_videos: int, method: str, kind: str) -> torch.Tensor:
    """[num_videos, C] video scores from per-view logits [N, C] of videos `video` [N] (PySlowFast's TestMeter):
    the sum or elementwise max of the logits (official) or of the softmax probabilities; with softmax a sum is
    divided by the views, so that scores stay probabilities. Rows of videos without views are 0."""
    if method not in ENSEMBLE_METHODS or kind not in ENSEMBLE_SCORES:
        raise ValueError(f"unknown ensemble {method!r} of {kind!r}: expected one of {ENSEMBLE_METHODS} of one of "
                         f"{ENSEMBLE_SCORES}")
    if kind == "softmax":
        scores = scores.softmax(dim=1)
    out = scores.new_zeros(num_videos, scores.shape[1])
    if method == "max":
        return out.scatter_reduce_(0, video[:, None].expand_as(scores), scores, "amax", include_self=False)
    out.index_add_(0, video, scores)
    if kind == "softmax":
        out /= torch.bincount(video, minlength=num_videos).clamp(min=1)[:, None].to(out.dtype)
    return out


def video_statistics(dataset, items: torch.Tensor, index: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                     macs: torch.Tensor, method: str, kind: str) -> dict:
    """Per-video metrics from every decoded view (index: the loader's positions, one per view, from every rank).
    Videos with no decoded view are excluded (and named in a warning); videos missing some views are ensembled
    over the views that decoded, and counted as partial."""
    item_video = torch.tensor([dataset.video_index(i) for i in items.tolist()], dtype=torch.long)
    expected = torch.bincount(item_video, minlength=dataset.num_videos)  # views this evaluation reads per video
    video = item_video[index]
    decoded = torch.bincount(video, minlength=dataset.num_videos)
    scores = ensemble(video, logits, dataset.num_videos, method, kind)
    video_labels = torch.zeros(dataset.num_videos, dtype=torch.long).index_copy_(0, video, labels)
    video_macs = torch.zeros(dataset.num_videos, dtype=torch.float64).index_add_(0, video, macs.double())
    kept = (decoded > 0).nonzero().flatten()
    excluded = ((expected > 0) & (decoded == 0)).nonzero().flatten().tolist()
    if excluded and du.is_master():
        names = ", ".join(dataset.videos[v][0] for v in excluded[:20])
        logger.warning("%d video(s) have no decodable view and are excluded from the per-video metrics: %s%s",
                       len(excluded), names, f" (and {len(excluded) - 20} more)" if len(excluded) > 20 else "")
    n = kept.numel()
    return {"num_videos": n, "views_per_video": len(dataset) // dataset.num_videos,
            "video_top1_acc": 100.0 * topk_correct(scores[kept], video_labels[kept], 1).item() / n,
            "video_top5_acc": 100.0 * topk_correct(scores[kept], video_labels[kept], 5).item() / n,
            "excluded_videos": len(excluded), "partial_videos": int(((decoded > 0) & (decoded < expected)).sum()),
            "gmacs_per_view_mean": macs.double().mean().item() / 1e9,
            "gmacs_per_video_mean": video_macs[kept].mean().item() / 1e9,
            "video_predictions": {"video": kept, "path": [dataset.videos[v][0] for v in kept.tolist()],
                                  "labels": video_labels[kept], "views": decoded[kept], "scores": scores[kept],
                                  "ensemble_method": method, "ensemble_scores": kind}}


class Progress:
    """A progress line every `period` batches: images done of this process's shard, running top-1, rate, ETA."""

    def __init__(self, label: str, total: int, period: int):
        self.label, self.total, self.period = label, total, period
        self.shard = " (this process's shard)" if du.get_world_size() > 1 else ""
        self.start = time.perf_counter()

    def update(self, step: int, done: int, correct: torch.Tensor) -> None:
        if not self.period or step % self.period:
            return
        rate = done / max(time.perf_counter() - self.start, 1e-9)
        eta = timedelta(seconds=int((self.total - done) / rate)) if rate > 0 else "?"
        logger.info("%s: %d/%d images%s, top1 so far %.2f%%, %.1f images/s, eta %s", self.label, done, self.total,
                    self.shard, 100.0 * correct.item() / max(done, 1), rate, eta)


@torch.no_grad()
def evaluate(model, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             keep_predictions: bool = False, label: str = "val", log_period: int = 0,
             ensemble_method: str = "sum", ensemble_scores: str = "logits") -> dict:
    """Every process evaluates its shard (no padding); sums are all-reduced, so each item counts once.

    A data set with `video_index` (videos, each read as one or more views) is also evaluated per video: the
    views' logits, gathered from every rank by data set index, are ensembled (see `ensemble`) and the video_*
    statistics added (see `video_statistics`); the per-item ones stay per view.
    keep_predictions adds "predictions" (per item: index, logits, labels, and kept_tokens [n, depth] / token_depth
    [n] for models that report them) and, for videos, "video_predictions" to the result.
    Logs progress every `log_period` batches (0: never). Fails if no image of the split could be decoded."""
    model.eval()
    videos, items = video_dataset(loader.dataset)
    keep_logits = keep_predictions or videos is not None
    sums = torch.zeros(6, dtype=torch.float64, device=device)  # n, top1, top5, loss, skipped, non-finite images
    macs, counts, depths, predictions, extra, exits = [], [], [], [], [], []
    kept_tokens, halting = reports(model, "kept_tokens"), reports(model, "token_depth")
    multi_exit = getattr(unwrap(model), "num_exits", 1) > 1
    progress = Progress(label, len(loader.sampler), log_period)
    for step, batch in enumerate(loader, 1):
        sums[4] += batch["skipped"]
        if batch["inputs"] is None:
            continue
        batch = to_device(batch, device)
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            logits = model(batch["inputs"]).float()
        labels = batch["labels"]
        sums[0] += labels.numel()
        sums[1] += topk_correct(logits, labels, 1)
        sums[2] += topk_correct(logits, labels, 5)
        sums[3] += F.cross_entropy(logits, labels, reduction="sum")
        sums[5] += (~torch.isfinite(logits).all(dim=1)).sum()
        token_counts = getattr(unwrap(model), "last_token_counts", None)
        macs.append(unwrap(model).macs_per_image().cpu())
        if multi_exit:
            exits.append(exit_records(unwrap(model), labels))
        if token_counts is not None:
            if kept_tokens:
                counts.append(token_counts[..., 1].cpu())  # [B, depth] tokens leaving each block's attention
            if halting:
                depths.append(token_depth(token_counts).cpu())
        # A method's own per-image statistics ([B] or [B, depth] each), averaged over the split.
        image_statistics = getattr(unwrap(model), "image_statistics", None)
        if image_statistics is not None:
            extra.append({k: v.detach().double().cpu() for k, v in image_statistics().items()})
        if keep_logits:  # in the same batch order as `macs`
            predictions.append((batch["index"].cpu(), logits.cpu(), labels.cpu()))
        progress.update(step, int(sums[0].item() + sums[4].item()), sums[1])
    sums = du.all_reduce_sum(sums).cpu()
    if sums[0] == 0:
        raise NoUsableImages(f"no image of the {label} split could be decoded ({int(sums[4])} skipped; the warnings "
                             "above name the files)")
    n = sums[0].item()
    stats = {"num_images": int(sums[0].item()), "top1_acc": 100.0 * sums[1].item() / n,
             "top5_acc": 100.0 * sums[2].item() / n, "loss": sums[3].item() / n, "skipped_images": int(sums[4].item()),
             "nonfinite_images": int(sums[5].item())}
    # One collective for every per-image record (every rank calls it, even with nothing to send).
    ranks = du.all_gather_objects((macs, counts, depths, predictions, extra, exits))
    macs, counts, depths, predictions, extra, exits = ([part for rank in ranks for part in rank[k]] for k in range(6))
    if macs:
        all_macs = torch.cat(macs)
        stats.update(gmacs_mean=all_macs.mean().item() / 1e9, gmacs_p50=all_macs.quantile(0.5).item() / 1e9,
                     gmacs_p95=all_macs.quantile(0.95).item() / 1e9)
    if depths:
        stats["token_depth_mean"] = torch.cat(depths).mean().item()
    if exits:
        stats.update(exit_statistics(exits, getattr(unwrap(model), "num_exits")))
    for name in extra[0] if extra else ():
        values = torch.cat([e[name] for e in extra])
        stats[f"{name}_mean"] = values.mean().item()
        if values.dim() == 2:  # per block
            stats[f"{name}_per_block"] = [round(v, 4) for v in values.mean(0).tolist()]
    if counts:
        tokens = torch.cat(counts).double()  # kept tokens per block (CLS included), over every image
        stats.update(tokens_per_block_mean=[round(t, 3) for t in tokens.mean(0).tolist()],
                     tokens_per_block_min=[int(t) for t in tokens.min(0).values.tolist()],
                     tokens_per_block_max=[int(t) for t in tokens.max(0).values.tolist()])
    if predictions:
        index, logits, labels = (torch.cat([p[k] for p in predictions]) for k in range(3))
        if videos is not None:
            stats.update(video_statistics(videos, items, index, logits, labels, torch.cat(macs), ensemble_method,
                                          ensemble_scores))
            if not keep_predictions:
                del stats["video_predictions"]
        if keep_predictions:
            order = index.argsort()
            stats["predictions"] = {"index": index[order], "logits": logits[order], "labels": labels[order]}
            # Per-image token statistics (same batch order as the logits), for histograms (tools/plot.py).
            if counts:
                stats["predictions"]["kept_tokens"] = torch.cat(counts)[order]
            if depths:
                stats["predictions"]["token_depth"] = torch.cat(depths)[order]
    return stats


def report_nonfinite(stats: dict, what: str) -> None:
    """An evaluation whose outputs are NaN/inf is reported as such, not as a low accuracy."""
    bad = stats.get("nonfinite_images", 0)
    if bad or not torch.isfinite(torch.tensor(stats["loss"])):
        logger.error("%s: the model's outputs are NaN or infinite for %d of %d images (loss %s); its top-1/top-5 "
                     "mean nothing", what, bad, stats["num_images"], stats["loss"])
