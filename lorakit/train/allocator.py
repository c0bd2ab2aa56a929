"""glibc malloc settings for training: keep the memory a step frees for the next step instead of handing it back.

A training step allocates and frees the same large tensors (activations, their gradients, folded weights) every
step. With glibc's defaults, blocks above the dynamic mmap threshold (128 KB, growing to at most 32 MB) are mapped
fresh on each allocation, and the heap's free top is trimmed back to the kernel, so every step faults its pages in
again and the kernel zero-fills each one. On SmolLM2 with all-linear LoRA (batch 8 × 256, fp32, 2 threads) that was
50k-160k minor page faults a step and ~5-10% of its time; with these settings ~0 (benchmarks/RESULTS.md, session 13).
PyTorch's CPU tuning guide gets the same effect by preloading jemalloc or tcmalloc; this needs no extra library.

The cost: memory freed after a peak stays with the process (its peak RSS is unchanged). A user's own
`MALLOC_MMAP_THRESHOLD_` / `MALLOC_TRIM_THRESHOLD_` environment variables win: nothing is changed then.
"""

from __future__ import annotations

import ctypes
import os
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 * 2**20  # the largest glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): bigger blocks still map
TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int: trim only when 2 GB lie free at the heap's top
USER_VARIABLES = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")


def keep_freed_memory() -> bool:
    """Set glibc malloc to serve blocks up to 32 MB from the heap and not to trim it; True if it was set.

    Process-wide and idempotent. Does nothing (False) off Linux, on a C library without glibc's `mallopt`
    (musl), or when the user set either MALLOC_*_THRESHOLD_ variable.
    """
    if not sys.platform.startswith("linux") or any(v in os.environ for v in USER_VARIABLES):
        return False
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return False
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc: its mallopt (if any) has other parameter numbers
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
