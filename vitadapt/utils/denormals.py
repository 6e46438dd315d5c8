"""Subnormal floats on the CPU (FLUSH_DENORMAL).

x86 CPUs compute with subnormal floats (|x| < 1.2e-38 in fp32) through a slow microcode path. A-ViT's training
step makes them: the gradient of a token's output reaches its features scaled by its halting score (sigmoid(10 y -
30), about 1e-13 and less), and some of the backward's matrix products then ran 8 times slower (profiler, DeiT-S,
batch 16: the grad-input product of a qkv layer took 79 ms where its size needs 10). Flushing subnormal inputs and
results to zero (the CPU's DAZ/FTZ modes) removes that: A-ViT's training step went from 9.2 to 11.1 img/s (dense
DeiT-S unchanged, `tools/benchmark.py --train`, 2-core CPU). A value so small changes no result a float32 model can
show. The setting is per thread and OpenMP's worker threads copy it from the thread that starts them, so it has to
be made before the first parallel operator of the process; forked DataLoader workers inherit it.
"""

import torch


def configure_denormals(cfg) -> bool:
    """Applies FLUSH_DENORMAL to this process when the model runs on the CPU (NUM_GPUS 0); returns whether subnormal
    floats are flushed to zero (False also where the CPU has no such mode)."""
    if cfg.NUM_GPUS == 0 and cfg.FLUSH_DENORMAL:
        return bool(torch.set_flush_denormal(True))
    return False
