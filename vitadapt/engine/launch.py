"""Starting a job on one or many processes, as PySlowFast does, plus torchrun's env:// and CPU workers.

- one process (NUM_GPUS <= 1 or NUM_PROCS 1, NUM_SHARDS 1): the job runs here, with no process group;
- NUM_GPUS N (CUDA, nccl) or NUM_GPUS 0 NUM_PROCS N (CPU, gloo): N spawned workers on this machine;
- NUM_SHARDS M, SHARD_ID k, --init_method tcp://host0:port: the same command on every machine;
- under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): one process each, env:// rendezvous.
"""

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from vitadapt.config import ConfigError, world_size
from vitadapt.errors import VitadaptError
from vitadapt.utils import distributed as du


class WorkerError(VitadaptError, RuntimeError):
    """A spawned worker failed; the message is the worker's own error line."""


def backend(cfg) -> str:
    if cfg.DIST_BACKEND != "auto":
        return cfg.DIST_BACKEND
    return "nccl" if cfg.NUM_GPUS > 0 else "gloo"


def _run_in_group(local_rank: int, func, cfg, init_method: str, rank: int, world: int):
    if cfg.NUM_GPUS > 0:
        if not torch.cuda.is_available() or torch.cuda.device_count() <= local_rank:
            raise ConfigError(f"NUM_GPUS is {cfg.NUM_GPUS} but only {torch.cuda.device_count()} CUDA device(s) "
                              "are visible; set NUM_GPUS 0 to run on the CPU")
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend(cfg), init_method=init_method, world_size=world, rank=rank)
    try:
        return func(cfg)
    finally:
        dist.destroy_process_group()


def _spawned(local_rank: int, procs: int, func, cfg, init_method: str):
    # Each worker limits itself to its share of the CPU cores: N workers x all cores would thrash.
    if cfg.NUM_GPUS == 0:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // procs))
    _run_in_group(local_rank, func, cfg, init_method, cfg.SHARD_ID * procs + local_rank, world_size(cfg))


def launch_job(cfg, func, init_method: str = ""):
    """Runs func(cfg) on every process the config asks for. Returns func's result when run in this process."""
    if du.launched_by_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != world_size(cfg):
            raise ConfigError(f"torchrun started {world} processes but the config asks for {world_size(cfg)} "
                              "(NUM_GPUS or NUM_PROCS, times NUM_SHARDS); make them agree")
        return _run_in_group(int(os.environ["LOCAL_RANK"]), func, cfg, init_method or "env://",
                             int(os.environ["RANK"]), world)
    procs = cfg.NUM_GPUS if cfg.NUM_GPUS > 0 else cfg.NUM_PROCS
    if world_size(cfg) == 1:
        return func(cfg)  # the job's select_device reports a missing GPU
    if not init_method:
        if cfg.NUM_SHARDS > 1:
            raise ConfigError("NUM_SHARDS > 1 needs --init_method tcp://<address of shard 0>:<port> on every machine")
        init_method = f"tcp://127.0.0.1:{du.free_port()}"
    try:
        mp.spawn(_spawned, nprocs=procs, args=(procs, func, cfg, init_method), join=True)
    except mp.ProcessRaisedException as e:
        # The worker's traceback was printed already; keep its last line ("module.Error: message").
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        raise WorkerError(f"a worker process failed: {lines[-1] if lines else e}") from None
    except mp.ProcessExitedException as e:
        raise WorkerError(f"a worker process died: {e}") from None
    return None
