"""How the C allocator treats the memory a CPU forward frees (KEEP_FREED_CPU_MEMORY).

PyTorch allocates CPU tensors with the C library's malloc and caches nothing. glibc's defaults hand large freed
blocks back to the operating system (blocks from mmap, and the top of the heap past a trim threshold), so the next
forward's activations fault their pages in again, one zeroed 4 KiB page at a time. Measured on DeiT-S (2-core CPU,
torch 2.14): about 650,000 page faults per forward at batch 64 (dense; 21% of its time), 42,000 at batch 16, and
at batch 1 anything from none to a few hundred depending on what the process ran before. The count differs
between models of different activation sizes, so a dense baseline and an adaptive model measured side by side
paid different, fluctuating penalties. Keeping freed memory for reuse (what jemalloc or tcmalloc, preloaded as
PyTorch's CPU performance guides advise, also achieve) removes the faults; the process keeps its peak memory.
"""

import ctypes
import ctypes.util
import functools
import logging
import platform

logger = logging.getLogger(__name__)

# mallopt parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

_applied = False


def keep_freed_memory() -> bool:
    """Makes glibc's malloc keep freed memory in this process (no mmap'd blocks, no trimming of the heap).
    Returns whether the allocator is glibc's and now keeps it; elsewhere (macOS, musl) nothing changes. Applies
    to this process and the processes it forks (DataLoader workers)."""
    global _applied
    if _applied:
        return True
    if not _is_glibc():
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Every block from the heap (a failed heap extension still falls back to mmap), and the heap never shrunk.
    _applied = bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 31 - 1))
    return _applied


def allocator_state() -> str:
    """What this process's C allocator does with freed memory, for logs and reports."""
    if _applied:
        return "keeps freed memory"
    return "glibc default" if _is_glibc() else "system default"


def configure_cpu_allocator(cfg) -> str:
    """Applies KEEP_FREED_CPU_MEMORY to this process when the model runs on the CPU (NUM_GPUS 0); returns
    allocator_state()."""
    if cfg.NUM_GPUS == 0 and cfg.KEEP_FREED_CPU_MEMORY and not keep_freed_memory():
        logger.info("KEEP_FREED_CPU_MEMORY needs glibc's malloc on Linux; the system allocator is left as it is")
    return allocator_state()


@functools.lru_cache(maxsize=None)  # platform.libc_ver reads the interpreter's binary
def _is_glibc() -> bool:
    return platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
