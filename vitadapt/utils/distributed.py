"""Process groups and collectives that work the same on CPU (gloo) and CUDA (nccl)."""

import os
import socket

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_master() -> bool:
    """Global rank 0: the only process that writes logs and checkpoints."""
    return get_rank() == 0


def barrier() -> None:
    if is_dist():
        dist.barrier()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum over processes (a copy; on the process group's device)."""
    if not is_dist():
        return tensor.clone()
    out = tensor.clone()
    dist.all_reduce(out)
    return out


def all_gather_objects(obj):
    """Every process's `obj`, in rank order."""
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out
