"""When does folding W + s·B·A pay? Time one LoRA Linear both ways at several row counts (one thread, no grad).

    python benchmarks/fold_threshold.py            # 576x576 and 576->1536, N = 1 ... 1024, r = 8
    python benchmarks/fold_threshold.py --quick    # a smoke run

lorakit.functional.fold_pays picks the fold when rows > out·in/(out+in); its docstring holds this script's numbers.
"""

import argparse
import time

import torch
import torch.nn.functional as F

from lorakit.functional import fold_pays


def _time(fn, reps: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repetitions (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shapes, rows = ([(64, 64)], [1, 64]) if args.quick else ([(576, 576), (1536, 576)], [1, 8, 64, 256, 1024])
    print(f"{'layer':>10}{'N':>6}{'base µs':>10}{'fold µs':>10}{'unfused µs':>12}  fold_pays")
    for out, inp in shapes:
        W, b, A, B = torch.randn(out, inp), torch.randn(out), torch.randn(8, inp), torch.randn(out, 8)
        for n in rows:
            x = torch.randn(n, inp)
            reps = 3 if args.quick else (200 if n <= 64 else 30)
            with torch.no_grad():
                base = _time(lambda x=x, W=W, b=b: F.linear(x, W, b), reps)
                fold = _time(lambda x=x, W=W, b=b, A=A, B=B: F.linear(x, torch.addmm(W, B, A, alpha=0.5), b), reps)
                unfused = _time(lambda x=x, W=W, b=b, A=A, B=B: torch.addmm(F.linear(x, W, b), F.linear(x, A), B.t(),
                                                                             alpha=0.5), reps)
            print(f"{f'{out}x{inp}':>10}{n:>6}{base:>10.1f}{fold:>10.1f}{unfused:>12.1f}  {fold_pays(n, out, inp)}")


if __name__ == "__main__":
    main()
