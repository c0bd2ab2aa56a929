"""Weight-only int8 and int4 matmuls on CPU: torch's int8 kernel or a bf16 GEMM of the int8 weights, and the int4
layer, against fp32 and bf16 dense weights. What `lorakit.quant` chooses by (its comments hold the numbers).

Two measurements, one thread, medians:
  layer   one 576→1536 Linear (SmolLM2's up/gate projection) at 1 and 32 rows, µs per call (cache-resident)
  pass    every Linear shape of SmolLM2-135M once (30 blocks × 7 + the 49152×576 LM head, 135 M weights, 540 MB in
          fp32), in turn, as a decode step reads them (out of cache), at 1, 8, 16, 32 and 64 rows, ms per pass
Paths: fp32 / bf16 = F.linear on dense weights; int8 kernel = torch._weight_int8pack_mm (input in bf16, fp32 scale
applied after); int8→bf16 = F.linear(x in bf16, q in bf16), scale applied after; int4 layer = lorakit.quant.Int4Linear
as `--weights int4` builds it (groups of 32, torch._weight_int4pack_mm_for_cpu; the LM head an Int8Linear).

    python benchmarks/quant_matmul.py                 # one thread, ~2 minutes on a quiet machine
    python benchmarks/quant_matmul.py 2               # two threads
"""

from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lorakit.quant import Int4Linear, Int8Linear, int4_weight, int8_weight

SHAPES = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30 + [(49152, 576)]


def paths(weights):
    """name -> fn(x fp32 (rows, in) by in-size) running every weight once."""
    dense = weights
    bf16 = [w.to(torch.bfloat16) for w in weights]
    q = [(*int8_weight(w), torch.ones(w.shape[0], dtype=torch.bfloat16)) for w in weights]
    head = (49152, 576)  # quantize_int4 keeps the LM head int8
    q4 = [Int8Linear(*int8_weight(w), None) if tuple(w.shape) == head else Int4Linear(*int4_weight(w), None)
          for w in weights]
    return {
        "fp32": lambda xs: [F.linear(xs[w.shape[1]], w) for w in dense],
        "bf16": lambda xs: [F.linear(xs[w.shape[1]].to(torch.bfloat16), w) for w in bf16],
        "int8 kernel": lambda xs: [torch._weight_int8pack_mm(xs[w.shape[1]].to(torch.bfloat16), w, one).float() * s
                                   for w, s, one in q],
        "int8→bf16": lambda xs: [F.linear(xs[w.shape[1]].to(torch.bfloat16), w.to(torch.bfloat16)).float() * s
                                 for w, s, _ in q],
        "int4 layer": lambda xs: [m(xs[m.in_features]) for m in q4],
    }


def timed(fn, arg, reps: int) -> float:
    fn(arg)
    runs = []
    for _ in range(5):
        t = time.perf_counter()
        for _ in range(reps):
            fn(arg)
        runs.append((time.perf_counter() - t) / reps)
    return statistics.median(runs)


def main() -> None:
    torch.set_num_threads(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
    torch.manual_seed(0)
    one = paths([torch.randn(1536, 576) * 0.02])
    print("layer 576→1536, µs per call:")
    for rows in (1, 32):
        xs = {576: torch.randn(rows, 576)}
        print(f"  rows {rows:3d}: " + ", ".join(f"{n} {timed(f, xs, 100) * 1e6:.0f}" for n, f in one.items()),
              flush=True)
    full = paths([torch.randn(o, i) * 0.02 for o, i in SHAPES])
    print("SmolLM2-135M's Linear shapes in turn, ms per pass:")
    for rows in (1, 8, 16, 32, 64):
        xs = {n: torch.randn(rows, n) for n in (576, 1536)}
        print(f"  rows {rows:3d}: " + ", ".join(f"{n} {timed(f, xs, 1) * 1e3:.1f}" for n, f in full.items()),
              flush=True)


if __name__ == "__main__":
    main()
