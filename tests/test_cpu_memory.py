"""KEEP_FREED_CPU_MEMORY: on a CPU run, memory a forward frees is reused by the next one instead of being faulted
in again page by page (vitadapt/utils/cpu_memory.py). Each case runs in a fresh interpreter: the setting is for the
whole process."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
PAGES = 16 * 2**20 * 4 // 4096  # pages of the 64 MiB tensor each round writes

# Configures the allocator as a job with these keys would, then writes and frees a 64 MiB tensor (the size of a
# DeiT-S activation at batch 64) eight times, counting the page faults of each round.
PROBE = """
import json, resource, sys, torch
from vitadapt.config import get_cfg
from vitadapt.utils.cpu_memory import configure_cpu_allocator
cfg = get_cfg()
cfg.NUM_GPUS, cfg.KEEP_FREED_CPU_MEMORY = int(sys.argv[1]), sys.argv[2] == "True"
state = configure_cpu_allocator(cfg)
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 * 2**20)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"state": state, "faults": faults}))
"""


def probe(num_gpus: int, keep: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(num_gpus), str(keep)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    kept = probe(0, True)
    assert kept["state"] == "keeps freed memory"
    assert kept["faults"][0] >= PAGES * 0.9  # the first round takes fresh pages from the system
    # Once the heap holds the block next to what Python allocated in between (one more round at most), every
    # round reuses it.
    assert max(kept["faults"][3:]) < PAGES * 0.05
    # The control: glibc's default returns the block on free, and every round faults all its pages in again.
    default = probe(0, False)
    assert default["state"] == "glibc default"
    assert min(default["faults"][3:]) >= PAGES * 0.9


@pytest.mark.skipif(not GLIBC, reason="the setting applies to glibc's malloc only")
def test_gpu_runs_leave_the_allocator_alone():
    assert probe(1, True)["state"] == "glibc default"
