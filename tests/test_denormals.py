"""FLUSH_DENORMAL: CPU jobs flush subnormal floats to zero in every thread (vitadapt/utils/denormals.py). Each case
runs in a fresh interpreter: the setting is per thread, and OpenMP's threads copy it when they start."""

import json
import os
import platform
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Configures the process as a job with these keys would, then multiplies 4M subnormal floats by 1 on two threads
# (the operator splits them between the threads) and counts the results that are not zero.
PROBE = """
import json, sys, torch
from vitadapt.config import get_cfg
from vitadapt.utils.denormals import configure_denormals
cfg = get_cfg()
cfg.NUM_GPUS, cfg.FLUSH_DENORMAL = int(sys.argv[1]), sys.argv[2] == "True"
flushed = configure_denormals(cfg)
torch.set_num_threads(2)
x = torch.full((4_000_000,), 1e-39)
print(json.dumps({"flushed": flushed, "subnormal_results": int(((x * 1.0) != 0).sum())}))
"""


def probe(num_gpus: int, flush: bool) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(num_gpus), str(flush)], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the flush-to-zero mode checked is x86's")
def test_cpu_jobs_flush_subnormal_floats_in_every_thread():
    on = probe(0, True)
    assert on == {"flushed": True, "subnormal_results": 0}  # both threads' halves flushed, not only the caller's
    off = probe(0, False)
    assert off == {"flushed": False, "subnormal_results": 4_000_000}  # the control: subnormal arithmetic kept


def test_gpu_runs_leave_subnormal_floats_alone():
    assert probe(1, True) == {"flushed": False, "subnormal_results": 4_000_000}
