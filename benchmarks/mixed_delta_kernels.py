"""Which kernel for the per-row LoRA term of a mixed-adapter decode step? A short microbenchmark.

    delta[i] = s_k · (x[i]·A_kᵀ)·B_kᵀ,  k = ids[i]

Shapes are SmolLM2-135M's at decode (one token per row): 60 LoRA layers, q_proj (576→576) and v_proj (576→192)
alternating, each with 64 adapters of rank 8, so a pass reads the adapters from memory as a real step does (the
first version of this script reused one layer's adapters, which then sat in cache). Rows 8 or 32, with 1, 8 or 32
distinct adapters among them. Candidates:
  chosen    lorakit.functional.mixed_lora_delta as it chooses (a loop over groups up to 8, else stacked ranks)
  loop      group rows by adapter, two small matmuls per group, index_add back (PEFT's adapter_names)
  bmm       gather each row's A and B into (rows, r, in) / (rows, out, r), two batched matmuls
  tables    lorakit.functional.table_lora_delta: every adapter's Aᵀ and s·Bᵀ kept in per-layer slot tables
            (lorakit/row_tables.py, built between steps), read in place by two embedding_bag calls
Reported: the median time of a pass (base x·Wᵀ + delta, every layer) relative to the base x·Wᵀ alone.

    python benchmarks/mixed_delta_kernels.py               # ~1 minute on one core
    python benchmarks/mixed_delta_kernels.py --threads 2   # torch's intra-op threads (the server's default: 2 here)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lorakit.functional import bag_indices, mixed_lora_delta, table_lora_delta  # noqa: E402

LAYERS, ADAPTERS, R, D, SCALE = 60, 64, 8, 576, 2.0


def make_layers():
    torch.manual_seed(0)
    layers = []
    for i in range(LAYERS):
        out = D if i % 2 == 0 else 192
        As = torch.randn(ADAPTERS, R, D) * 0.02
        Bs = torch.randn(ADAPTERS, out, R) * 0.02
        T = As.transpose(1, 2).reshape(ADAPTERS * D, R).contiguous()  # slot k: A_kᵀ
        U = (Bs * SCALE).transpose(1, 2).reshape(ADAPTERS * R, out).contiguous()  # slot k: s·B_kᵀ
        layers.append((torch.randn(out, D) * 0.02, list(As), list(Bs), T, U))
    return layers


def kernels(ids: list[int], rows: int):
    present = list(dict.fromkeys(ids))
    groups = [torch.tensor([i for i in range(rows) if ids[i] == k]) for k in present]
    bags = bag_indices(torch.tensor(ids), D, R)

    def chosen(x, As, Bs, T, U):
        return mixed_lora_delta(x, [(g, As[k], Bs[k], SCALE) for g, k in zip(groups, present, strict=True)])

    def loop(x, As, Bs, T, U):
        out = x.new_zeros(*x.shape[:-1], Bs[0].shape[0])
        for g, k in zip(groups, present, strict=True):
            out.index_add_(0, g, F.linear(F.linear(x.index_select(0, g), As[k]), Bs[k]), alpha=SCALE)
        return out

    def bmm(x, As, Bs, T, U):
        A = torch.stack([As[k] for k in ids])  # (rows, r, in)
        B = torch.stack([Bs[k] for k in ids])  # (rows, out, r)
        return torch.bmm(torch.bmm(x, A.transpose(1, 2)), B.transpose(1, 2)) * SCALE

    def tables(x, As, Bs, T, U):
        return table_lora_delta(x, T, U, None, *bags)

    return {"chosen": chosen, "loop": loop, "bmm": bmm, "tables": tables}


def one_pass(layers, x, fn) -> float:
    t = time.perf_counter()
    for W, As, Bs, T, U in layers:
        F.linear(x, W)
        if fn is not None:
            fn(x, As, Bs, T, U)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    torch.set_num_threads(ap.parse_args().threads)
    layers = make_layers()
    print("| rows | distinct adapters | base pass ms | " + " | ".join(kernels([0], 1)) + " |")
    print("|---|---|---|" + "---|" * len(kernels([0], 1)))
    for rows in (8, 32):
        x = torch.randn(rows, 1, D)
        for k in (1, 8, 32):
            if k > rows:
                continue
            ids = [(i % k) * 7 % ADAPTERS for i in range(rows)]
            fns = kernels(ids, rows)
            W, As, Bs, T, U = layers[1]
            ref = fns["loop"](x, As, Bs, T, U)
            for name, fn in fns.items():
                torch.testing.assert_close(fn(x, As, Bs, T, U), ref, rtol=1e-4, atol=1e-6, msg=name)

            times: dict[str, list[float]] = {n: [] for n in ["base", *fns]}
            with torch.inference_mode():
                for _ in range(7):  # rounds, every candidate once per round
                    for n in times:
                        times[n].append(one_pass(layers, x, fns.get(n)))
            base = statistics.median(times["base"])
            print(f"| {rows} | {k} | {base * 1e3:.2f} | "
                  + " | ".join(f"{statistics.median(times[n]) / base:.2f}x" for n in fns) + " |", flush=True)


if __name__ == "__main__":
    main()
