"""keep_freed_memory against the kernel's own count of page faults (ru_minflt), in fresh processes."""

import os
import subprocess
import sys
import textwrap

import pytest

from lorakit.train import allocator

STEPS = textwrap.dedent("""
    import importlib.util, resource, sys
    import numpy as np  # allocates through malloc as torch does, and starts in a tenth of the time
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[2])  # the module alone, without torch
    allocator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(allocator)
    was_set = allocator.keep_freed_memory() if sys.argv[1] == "keep" else False
    sizes = [250_000, 1_200_000, 3_100_000] * 20  # 1, 4.8 and 12.4 MB blocks: activations of three widths
    def step():  # allocated during a step, all freed at its end
        blocks = [np.ones(n, dtype=np.float32) for n in sizes]
        del blocks
    step(); step()
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step()
    print(was_set, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
""")
BLOCK_PAGES = 3_100_000 * 4 // 4096  # the largest block's 4 KB pages


def _runs(mode: str, n: int = 3, **env: str) -> list[tuple[str, int]]:
    """`n` fresh processes at once (page faults are counted per process); (was it set, faults in 5 steps) each."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    cmd = [sys.executable, "-c", STEPS, mode, allocator.__file__]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=environ) for _ in range(n)]
    outs = [p.communicate()[0].split() for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    return [(was_set, int(faults)) for was_set, faults in outs]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_kept_memory_makes_repeated_steps_fault_no_pages():
    default = [faults for _, faults in _runs("default")]
    # glibc's defaults hand the freed heap top back, so steps fault their pages in again; whether a given process
    # does depends on its heap layout, so the claim is that some of three do, by many blocks' worth of pages
    assert max(default) > 10 * BLOCK_PAGES, default
    kept = _runs("keep")
    assert all(was_set == "True" for was_set, _ in kept), kept
    # kept: at most one block's pages over 5 steps (the heap growing once into a new high-water mark)
    assert all(faults <= BLOCK_PAGES + 50 for _, faults in kept), (kept, default)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc settings exist on Linux only")
def test_a_users_own_malloc_variables_win(monkeypatch):
    assert _runs("keep", n=1, MALLOC_TRIM_THRESHOLD_="131072")[0][0] == "False"
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "131072")
    assert allocator.keep_freed_memory() is False
