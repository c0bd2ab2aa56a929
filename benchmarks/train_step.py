"""Training-step time and peak memory: lorakit vs HF PEFT, full fine-tuning and the zero-cost floor.

Each measurement runs in a fresh process (so peak memory is that run's alone); each round runs every (targets,
implementation) cell once, the order reversing every round, and the report takes medians. r=8, α=16, AdamW.

    --model minilm    all-MiniLM-L6-v2 sequence classification, batch 32 x 128 random ids, LoRA dropout 0.1,
                      every step the HF loss (the default, as in RESULTS.md)
    --model smollm2   SmolLM2-135M-Instruct causal LM, batch 8 x 256 tokens of chat rows of real text (E2E
                      turns in the chat template, loss on the assistant answers), LoRA dropout 0; lorakit,
                      full and floor run `lorakit train`'s own step, PEFT the standard HF loop (step_builders.py)

    python benchmarks/train_step.py                                   # MiniLM: q,v and all-linear, 3 rounds
    python benchmarks/train_step.py --dropout 0.0 --rounds 5
    python benchmarks/train_step.py --model smollm2 --rounds 3                         # fp32, chat labels
    python benchmarks/train_step.py --model smollm2 --precision bf16 --rounds 3
    python benchmarks/train_step.py --model smollm2 --labels all --impls lorakit,peft  # every token labelled
    python benchmarks/train_step.py --model smollm2 --precision fp32,bf16 --impls lorakit,peft --targets all-linear

`--labels chat` (default) labels what `lorakit train --task chat` labels (the answers: the output states the
share of next-token positions that carry a label); `--labels all` labels every token, so the loss's positions
are all of them. `floor` is the frozen model with gradients routed exactly where LoRA on the targets needs them
but no LoRA work at all: the step no LoRA implementation can beat with the same loss computation. Optional
impls `full-hf` and `floor-hf` (smollm2) step full / floor the HF way, as PEFT is stepped. SmolLM2 defaults to
3 timed steps per process after 1 warm-up step, and where malloc keeps freed memory (`lorakit train`'s
step) more, up to 8 in all, until two steps in a row fault under 1,000 pages (a fresh heap grows to its
high-water mark over the first steps: `warm_up`); the output shows each run's warm-up steps and its timed
steps' page faults.
MiniLM: 6 steps after 3. --batch, --seq, --steps, --warmup, --warmup_max override.
BENCH_THREADS sets torch's threads (default: all cores). A failed worker stops the run with its stderr.

`--allocator train` (default) sets glibc malloc as `lorakit train` sets it (lorakit/train/allocator.py: freed blocks
stay in the heap, so steps do not fault their pages in again) in the workers that run `lorakit train`'s step
(smollm2: lorakit, full, floor), and leaves the rest (PEFT, *-hf, MiniLM) at the defaults a user of those gets;
`--allocator keep` sets it in every worker (like for like), `--allocator default` in none.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DEFAULTS = {"minilm": {"batch": 32, "seq": 128, "dropout": 0.1, "steps": 6, "warmup": 3, "warmup_max": 3},
            "smollm2": {"batch": 8, "seq": 256, "dropout": 0.0, "steps": 3, "warmup": 1, "warmup_max": 8}}
SETTLED_FAULTS = 1000  # minor page faults in a step under which the allocator counts as settled
ONCE = ("full", "full-hf")  # full fine-tuning does not depend on targets: measured with the first only


def _peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss() -> None:
    try:  # Linux: writing 5 to clear_refs resets the peak-RSS high-water mark
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def warm_up(step, least: int, most: int) -> int:
    """Run `step` at least `least` times, then on until two steps in a row fault fewer than SETTLED_FAULTS pages
    (at most `most` steps in all); returns how many steps it ran.

    With `lorakit train`'s malloc settings a fresh process's heap grows to its high-water mark over the first
    steps, then stops faulting: a SmolLM2 all-linear step faulted 20-34k pages in steps 2-4 (at ~15 µs each on
    this VM, 0.3-0.6 s a step) and none from step 5; q,v mostly settled from step 3, once faulting again after a
    quiet step (hence two in a row). Timing from step 2 read the larger model's warm-up as its step
    (benchmarks/RESULTS.md, session 15). Workers at glibc's defaults (PEFT, the HF loops) fault every step by
    design: that is their steady state, so they are given most = least."""
    n, quiet = 0, 0
    while n < max(least, 1) or (quiet < 2 and n < most):
        f0 = _minor_faults()
        step()
        n, quiet = n + 1, quiet + 1 if _minor_faults() - f0 < SETTLED_FAULTS else 0
    return n


def worker(impl: str, targets: str, args: argparse.Namespace) -> dict:
    import step_builders
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    kept = args.allocator == "keep" or (args.allocator == "train" and args.model == "smollm2"
                                        and impl in step_builders.LORAKIT_STEP)
    if kept:
        from lorakit.train.allocator import keep_freed_memory

        kept = keep_freed_memory()
    if args.model == "minilm":
        (step, trainable), fraction = step_builders.minilm_step(impl, targets, args), None
    else:
        step, trainable, fraction = step_builders.lm_step(impl, targets, args)
    # optimizer state, caches, and the heap's high-water mark where freed memory is kept
    warm = warm_up(step, args.warmup, args.warmup_max if kept else args.warmup)
    _reset_peak_rss()
    times, cpu, faults = [], [], []
    for _ in range(args.steps):
        t0, c0, f0 = time.perf_counter(), time.process_time(), _minor_faults()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        faults.append(_minor_faults() - f0)
    return {"impl": impl, "targets": targets, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "peak_mb": _peak_rss_mb(), "trainable": trainable, "label_fraction": fraction, "warmup": warm,
            "faults": statistics.median(faults)}


def run_once(impl: str, targets: str, precision: str, labels: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--model", args.model, "--targets", targets,
           "--precision", precision, "--labels", labels, "--allocator", args.allocator]
    for name in ("r", "dropout", "steps", "warmup", "warmup_max", "batch", "seq"):
        cmd += [f"--{name}", str(getattr(args, name))]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"worker {impl} {targets} {precision} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(args: argparse.Namespace) -> dict[tuple[str, str, str, str], list[dict]]:
    """{(precision, labels, impl, targets): runs}: every setting's rounds; within a round every (targets, impl)
    cell once, the order reversed every round, so a drift of the machine's speed reaches every cell alike (the
    all-linear / q,v ratio included)."""
    impls, all_targets = args.impls.split(","), args.targets.split(",")
    cells = [(targets, impl) for targets in all_targets for impl in impls
             if impl not in ONCE or targets == all_targets[0]]
    results: dict[tuple[str, str, str, str], list[dict]] = {}
    for precision in args.precision.split(","):
        for labels in args.labels.split(","):
            for rnd in range(args.rounds):
                for targets, impl in cells if rnd % 2 == 0 else cells[::-1]:
                    res = run_once(impl, targets, precision, labels, args)
                    results.setdefault((precision, labels, impl, targets), []).append(res)
                    print(f"  {precision} {labels} round {rnd + 1}: {impl:8s} {targets:10s} step "
                          f"{res['step_s'] * 1000:8.1f} ms (cpu {res['cpu_s'] * 1000:8.1f} ms) peak "
                          f"{res['peak_mb']:8.0f} MB, after {res['warmup']} warm-up, {res['faults']:.0f} page faults a "
                          f"step", file=sys.stderr, flush=True)
    return results


def report(args: argparse.Namespace, results: dict) -> None:
    med = {key: tuple(statistics.median(r[k] for r in runs) * (1000 if k != "peak_mb" else 1)
                      for k in ("step_s", "cpu_s", "peak_mb")) for key, runs in results.items()}
    threads = os.environ.get("BENCH_THREADS", os.cpu_count())
    task = ("MiniLM seq-cls" if args.model == "minilm" else "SmolLM2-135M-Instruct causal LM")
    print(f"\n{task}, batch {args.batch} x {args.seq} tokens, r={args.r}, dropout={args.dropout}, "
          f"{args.rounds} rounds x {args.steps} steps after {args.warmup} warm-up"
          + (f" (up to {args.warmup_max} where malloc keeps freed memory, until two steps fault < {SETTLED_FAULTS} "
             "pages)" if args.warmup_max > args.warmup else "") + f", torch threads={threads}, "
          f"allocator {args.allocator}")
    for precision in args.precision.split(","):
        for labels in args.labels.split(","):
            block = {k[2:]: v for k, v in med.items() if k[:2] == (precision, labels)}
            fraction = next(r[0]["label_fraction"] for k, r in results.items() if k[:2] == (precision, labels))
            head = f"\n[{precision}" + (f", labels {labels}: {fraction:.1%} of next-token positions carry a label]"
                                        if fraction is not None else "]")
            print(head)
            print(f"{'impl':10s}{'targets':12s}{'trainable':>12s}{'step ms':>10s}{'cpu ms':>10s}{'peak MB':>10s}")
            for (impl, targets), (step, cpu, peak) in block.items():
                trainable = results[(precision, labels, impl, targets)][0]["trainable"]
                print(f"{impl:10s}{targets if impl not in ONCE else '-':12s}{trainable:>12,}"
                      f"{step:>10.1f}{cpu:>10.1f}{peak:>10.0f}")
            _ratios(block, args.targets.split(","))
    _precision_ratios(med, args)


def _ratios(block: dict, all_targets: list[str]) -> None:
    for targets in all_targets:
        if ("lorakit", targets) in block and ("peft", targets) in block:
            (ls, lc, lm), (ps, pc, pm) = block[("lorakit", targets)], block[("peft", targets)]
            print(f"{targets:10s} lorakit/PEFT: step time {ls / ps:.3f}x (cpu time {lc / pc:.3f}x), "
                  f"peak memory {lm / pm:.3f}x")
            if ("floor", targets) in block:
                fs = block[("floor", targets)][0]
                print(f"{targets:10s} over the zero-cost floor: lorakit {ls - fs:+.1f} ms, PEFT {ps - fs:+.1f} ms; "
                      f"floor/PEFT {fs / ps:.3f}x")
    if "qv" in all_targets and "all-linear" in all_targets:
        for impl in ("lorakit", "peft"):
            if (impl, "qv") in block and (impl, "all-linear") in block:
                (a, ac, am), (q, qc, qm) = block[(impl, "all-linear")], block[(impl, "qv")]
                print(f"{impl:10s} all-linear / q,v: step time {a / q:.3f}x (cpu {ac / qc:.3f}x), "
                      f"peak memory {am / qm:.3f}x")


def _precision_ratios(med: dict, args: argparse.Namespace) -> None:
    if set(args.precision.split(",")) != {"fp32", "bf16"}:
        return
    print("\nwhat bf16 autocast buys (bf16 / fp32):")
    for (precision, labels, impl, targets), (step, cpu, peak) in med.items():
        if precision == "bf16" and ("fp32", labels, impl, targets) in med:
            fs, fc, fm = med[("fp32", labels, impl, targets)]
            print(f"  {labels:5s} {impl:10s}{targets:12s} step time {step / fs:.3f}x (cpu {cpu / fc:.3f}x), "
                  f"peak memory {peak / fm:.3f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--model", choices=sorted(DEFAULTS), default="minilm")
    ap.add_argument("--targets", default="qv,all-linear", help="comma list of qv, all-linear")
    ap.add_argument("--impls", default="lorakit,peft,floor,full",
                    help="comma list of lorakit, peft, floor, full (smollm2 also: full-hf, floor-hf)")
    ap.add_argument("--precision", default="fp32", help="comma list of fp32, bf16 (bf16: torch.autocast)")
    ap.add_argument("--labels", default="chat", help="smollm2: comma list of chat (answers only), all")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--allocator", choices=("train", "keep", "default"), default="train",
                    help="glibc malloc settings per worker (see above)")
    ap.add_argument("--rounds", type=int, default=3)
    for name in ("batch", "seq", "steps", "warmup", "warmup_max"):
        ap.add_argument(f"--{name}", type=int, help="default: per model (see DEFAULTS)")
    ap.add_argument("--dropout", type=float, help="LoRA dropout; default: 0.1 minilm, 0.0 smollm2")
    args = ap.parse_args()
    for name, value in DEFAULTS[args.model].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    bad = [p for p in args.precision.split(",") if p not in ("fp32", "bf16")]
    bad += [lab for lab in args.labels.split(",") if lab not in ("chat", "all")]
    if bad or (args.model == "minilm" and (args.precision != "fp32" or args.labels != "chat")):
        ap.error(f"--precision takes fp32,bf16 and --labels chat,all (smollm2 only); got {bad or 'them for minilm'}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.targets, args)))
        return
    report(args, measure(args))


if __name__ == "__main__":
    main()
