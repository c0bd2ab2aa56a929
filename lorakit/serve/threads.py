"""Which threads run torch in the server: one OpenMP pool in the process, the engine thread's.

torch's CPU build uses GNU OpenMP, which keeps a worker pool per thread that ever ran a parallel region. When the
process's pools hold more threads than there are CPUs, idle workers spin 100 times instead of 300,000 before
they sleep, so every parallel op then pays a futex wake-up. Measured (SmolLM2 int8, batch 1, 2 threads, 2 CPUs):
generating on a second thread after the main thread had loaded the model made 18-20 tok/s, against 34-38 when one
thread did all the work or the loading thread had ended; through `lorakit serve --weights int8`, one stream went
from 22-28 to 42-48 tok/s. So the model loads on a thread that ends (`in_passing_thread`), the adapter loaders
run torch on 1 thread and the engine thread pins its own count (`pin_threads`).
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")


def in_passing_thread(fn: Callable[[], T]) -> T:
    """fn() on a thread that ends when it returns, so the OpenMP pool its torch ops start ends with it."""
    with ThreadPoolExecutor(1, thread_name_prefix="lorakit-load") as pool:
        return pool.submit(fn).result()


def pin_threads(n: int) -> None:
    """Set the calling thread's torch thread count for good. OpenMP's and MKL's counts are per thread, and ATen
    sets a thread's count from the process-wide last `set_num_threads` value at the thread's first torch use; so
    that first use comes first here, or a loader's later set_num_threads(1) would become the engine's count."""
    torch.get_num_threads()
    torch.set_num_threads(n)


__all__ = ["in_passing_thread", "pin_threads"]
