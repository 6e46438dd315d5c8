"""Evaluation: top-1/top-5, loss and per-image GMACs over a split, reduced exactly across processes."""

from typing import Optional

import torch
import torch.nn.functional as F

from vitadapt.models.flops import vit_macs
from vitadapt.utils import distributed as du
from vitadapt.utils.checkpoint import unwrap


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Number of samples whose label is among the top-k logits (k is capped at the number of classes)."""
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == labels[:, None]).any(dim=1).sum()


def token_depth(token_counts: torch.Tensor) -> torch.Tensor:
    """[B] blocks a token runs through on average (at attention), from token_counts [B, depth, 2]: the full
    depth for a dense model, the mean per-token depth for A-ViT."""
    return token_counts[..., 0].sum(dim=1).double() / token_counts[:, 0, 0].double()


@torch.no_grad()
def evaluate(model, loader, device: torch.device, amp_dtype: Optional[torch.dtype] = None,
             keep_predictions: bool = False) -> dict:
    """Every process evaluates its shard (no padding); sums are all-reduced, so each item counts once."""
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # n, top1, top5, loss, skipped
    macs, counts, depths, predictions = [], [], [], []
    for batch in loader:
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
        token_counts = getattr(unwrap(model), "last_token_counts", None)
        if token_counts is not None:
            macs.append(vit_macs(unwrap(model), token_counts).cpu())
            counts.append(token_counts[..., 1].cpu())  # [B, depth] tokens leaving each block's attention
            depths.append(token_depth(token_counts).cpu())
        if keep_predictions:
            predictions.append((batch["index"].cpu(), logits.cpu(), labels.cpu()))
    sums = du.all_reduce_sum(sums).cpu()
    n = max(sums[0].item(), 1.0)
    stats = {"num_images": int(sums[0].item()), "top1_acc": 100.0 * sums[1].item() / n,
             "top5_acc": 100.0 * sums[2].item() / n, "loss": sums[3].item() / n, "skipped_images": int(sums[4].item())}
    # One collective for every per-image record (every rank calls it, even with nothing to send).
    ranks = du.all_gather_objects((macs, counts, depths, predictions))
    macs, counts, depths, predictions = ([part for rank in ranks for part in rank[k]] for k in range(4))
    if macs:
        all_macs = torch.cat(macs)
        stats.update(gmacs_mean=all_macs.mean().item() / 1e9, gmacs_p50=all_macs.quantile(0.5).item() / 1e9,
                     gmacs_p95=all_macs.quantile(0.95).item() / 1e9)
    if depths:
        stats["token_depth_mean"] = torch.cat(depths).mean().item()
    if counts:
        tokens = torch.cat(counts).double()  # kept tokens per block (CLS included), over every image
        stats.update(tokens_per_block_mean=[round(t, 3) for t in tokens.mean(0).tolist()],
                     tokens_per_block_min=[int(t) for t in tokens.min(0).values.tolist()],
                     tokens_per_block_max=[int(t) for t in tokens.max(0).values.tolist()])
    if keep_predictions and predictions:
        index = torch.cat([p[0] for p in predictions])
        order = index.argsort()
        stats["predictions"] = {"index": index[order], "logits": torch.cat([p[1] for p in predictions])[order],
                                "labels": torch.cat([p[2] for p in predictions])[order]}
    return stats
