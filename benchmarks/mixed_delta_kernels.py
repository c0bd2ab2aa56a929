"""Which kernel for the per-row LoRA term of a mixed-adapter decode step? A short single-thread microbenchmark.

    delta[i] = s_k · (x[i]·A_kᵀ)·B_kᵀ,  k = ids[i] (-1: no adapter)

Shapes are SmolLM2-135M's q_proj at decode (one token per row): in = out = 576, r = 8, rows 8/32, and 1, 8 or 32
distinct adapters among the rows. Candidates:
  loop      group rows by adapter, two small matmuls per group, index_add back (PEFT's adapter_names, LoRAX's
            CPU fallback; what lorakit's LoraLinear does)
  bmm       gather each row's A and B into (rows, r, in) / (rows, out, r), two batched matmuls
  cat       every present adapter's A stacked into one (Σr, in) matrix: x·[A₁;…;Aₖ]ᵀ for all rows, mask the
            columns of other adapters, one (rows, Σr)·(Σr, out) matmul ("padded ranks" with equal r)
Reported: the median of 7 timings of 200 calls each, and the base layer's own x·Wᵀ for scale.

    python benchmarks/mixed_delta_kernels.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F


def loop(x, ids, As, Bs, s):
    out = torch.zeros(x.shape[0], Bs.shape[1])
    for k in ids.unique().tolist():
        if k < 0:
            continue
        rows = (ids == k).nonzero(as_tuple=True)[0]
        out.index_add_(0, rows, F.linear(F.linear(x.index_select(0, rows), As[k]), Bs[k]), alpha=s)
    return out


def bmm(x, ids, As, Bs, s):
    k = ids.clamp(min=0)
    h = torch.bmm(As[k], x.unsqueeze(-1))  # (rows, r, 1)
    out = torch.bmm(Bs[k], h).squeeze(-1) * s  # (rows, out)
    return out * (ids >= 0).unsqueeze(1)


def cat(x, ids, As, Bs, s):
    present = ids.unique()
    present = present[present >= 0]
    r = As.shape[1]
    A = As[present].reshape(-1, As.shape[2])  # (k·r, in)
    B = Bs[present].permute(1, 0, 2).reshape(Bs.shape[1], -1)  # (out, k·r)
    h = F.linear(x, A).view(x.shape[0], len(present), r)  # (rows, k, r)
    mask = (ids.unsqueeze(1) == present.unsqueeze(0)).unsqueeze(-1)  # (rows, k, 1)
    return F.linear((h * mask).reshape(x.shape[0], -1), B) * s


def timed(fn, *args, reps: int = 200) -> float:
    fn(*args)
    runs = []
    for _ in range(7):
        t = time.perf_counter()
        for _ in range(reps):
            fn(*args)
        runs.append((time.perf_counter() - t) / reps * 1e6)
    return statistics.median(runs)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    d, r, n_adapters = 576, 8, 32
    As, Bs = torch.randn(n_adapters, r, d) * 0.02, torch.randn(n_adapters, d, r) * 0.02
    W = torch.randn(d, d) * 0.02
    print("| rows | distinct adapters | base x·Wᵀ µs | loop µs | bmm µs | cat µs |\n|---|---|---|---|---|---|")
    for rows in (8, 32):
        x = torch.randn(rows, d)
        for k in (1, 8, 32):
            if k > rows:
                continue
            ids = torch.arange(rows) % k
            ref = loop(x, ids, As, Bs, 2.0)
            for fn in (bmm, cat):
                assert torch.allclose(fn(x, ids, As, Bs, 2.0), ref, atol=1e-5)
            t = [timed(F.linear, x, W)] + [timed(fn, x, ids, As, Bs, 2.0) for fn in (loop, bmm, cat)]
            print(f"| {rows} | {k} | " + " | ".join(f"{v:.1f}" for v in t) + " |")


if __name__ == "__main__":
    main()
