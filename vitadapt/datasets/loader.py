"""Data loaders. TRAIN.BATCH_SIZE and TEST.BATCH_SIZE are global; each process loads its share.

Batches are dicts: {"inputs": [B,C,H,W], "labels": [B], "index": [B] (data set positions), "skipped": int}.
"""

import random
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, Subset

from vitadapt.config import num_workers

from .build import build_dataset
from .transforms import build_transform


class ShardSampler(Sampler):
    """Evaluation sampler: process r reads items r, r+W, r+2W, ...; no padding, so no item is counted twice."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def collate_skipping_failures(items: List[Optional[tuple]]) -> dict:
    """Stacks (image, label, index) items, dropping the images a data set could not decode."""
    good = [it for it in items if it[0] is not None]
    if not good:
        return {"inputs": None, "labels": None, "index": None, "skipped": len(items)}
    return {"inputs": torch.stack([it[0][0] for it in good]),
            "labels": torch.tensor([it[0][1] for it in good], dtype=torch.long),
            "index": torch.tensor([it[1] for it in good], dtype=torch.long),
            "skipped": len(items) - len(good)}


class _Indexed(torch.utils.data.Dataset):
    """Pairs each item with its data set position (for exact, duplicate-free gathering of predictions)."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index], index


def _seed_worker(worker_id: int) -> None:
    # torch seeds each worker; numpy and random (used by timm's augmentations) follow from that seed.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def construct_loader(cfg, split: str, rank: int = 0, world: int = 1, is_train: bool = None,
                     subset: Optional[Tuple[int, int]] = None) -> DataLoader:
    """Training loaders shuffle (seeded per epoch) and augment; evaluation loaders shard without padding and use
    the test transform, whatever the split (e.g. DVT's threshold search on training images).
    subset: (count, seed): only `count` images of the split, drawn with that seed (all when count >= its size)."""
    is_train = split == "train" if is_train is None else is_train
    dataset = build_dataset(cfg.TRAIN.DATASET if is_train else cfg.TEST.DATASET, cfg, split)
    if hasattr(dataset, "transform"):
        dataset.transform = build_transform(cfg, is_train)
    if subset is not None and subset[0] < len(dataset):
        generator = torch.Generator().manual_seed(subset[1])
        chosen = torch.randperm(len(dataset), generator=generator)[: subset[0]].sort().values
        dataset = Subset(dataset, chosen.tolist())
    batch = (cfg.TRAIN.BATCH_SIZE if is_train else cfg.TEST.BATCH_SIZE) // world
    if is_train:
        # Seeded by RNG_SEED + epoch (set_epoch), so a resumed run sees the same order as an uninterrupted one.
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=cfg.RNG_SEED)
    else:
        sampler = ShardSampler(len(dataset), rank, world)
    return DataLoader(_Indexed(dataset), batch_size=batch, sampler=sampler, drop_last=is_train and len(sampler) >= batch,
                      num_workers=num_workers(cfg), pin_memory=cfg.DATA_LOADER.PIN_MEMORY and cfg.NUM_GPUS > 0,
                      collate_fn=collate_skipping_failures, worker_init_fn=_seed_worker)
