"""Generation speed: tokens/s of greedy decoding on SmolLM2-135M-Instruct, bare base vs an adapter.

    base       the bare model
    unmerged   + a lorakit LoRA adapter (all-linear, r=8, nonzero B), computed in the forward inside a decode_plan,
               as lorakit.generate runs it (the LoRA terms fused per group of layers that read one input)
    unplanned  the same unmerged model through transformers' generate alone: each LoRA layer's own path
    merged     the same adapter folded into the weights (lorakit.merge: the wrappers stay, so it can unmerge)
    unloaded   merged and the wrappers removed (lorakit.merge_and_unload): the base's own modules
    peft       the same adapter files loaded by HF PEFT (unmerged), the reference

Every measurement runs in a fresh process; modes alternate round by round and the report takes medians.
With --in-process one process holds every mode's model (the base and its copies) and alternates their generate
calls round by round: no process-to-process spread (±10% on this VM), the finer measure of a few-% overhead.
Each row generates exactly --new_tokens tokens (min_new_tokens = max_new_tokens, KV cache on) after a
short warm-up, for batch 1 and batch 8. Targets (issue 9): unmerged <= 1.10x the base's time, merged
within +-2%.

    python benchmarks/generate_speed.py                       # 128 new tokens, 3 rounds, 2 threads
    python benchmarks/generate_speed.py --quick --model DIR   # smoke test: 8 tokens, 1 round
    python benchmarks/generate_speed.py --in-process --batches 1 --rounds 7   # batch 1, one process
    python benchmarks/generate_speed.py --steps 300 --batches 1   # single decode steps, interleaved
    python benchmarks/generate_speed.py --lockstep --rounds 5      # whole generates, advancing together

--lockstep runs each round's generates (one per mode) at once, each in its own thread, the threads taking turns at every
forward: a turn is one forward and generate's own work up to the next, and a generate's time is the sum of its turns
(the plan's build and the prefill included). It measures what --in-process does, whole generates, but the modes go
through the machine's slow and fast seconds together, as --steps's do: on these VMs the speed drifts by 10-25% over a
generate's seconds, which spread --in-process's per-round ratios over ±10%.

--steps N times single decode steps instead of whole generates: after one prefill per mode, each of N rounds runs one
decode forward per mode (the KV cache cropped back after each, so every step attends to the same length), the mode
order rotating round by round. Neighbouring steps of different modes share the machine's state of the moment, so on
a VM whose speed drifts (these do, by ±10% over seconds) the paired per-step ratio is the steadiest measure; it leaves
out generate's own per-token work, which is the same for every mode, so its ratios are a little larger than
generate's. It also prints the ratio of the fastest steps (10th percentile, minimum): a neighbour's load only ever
adds time, so the fastest steps of each mode are the ones nearest the machine's own speed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODES = ("base", "unmerged", "unplanned", "merged", "unloaded", "peft")
PROMPTS = ["name : The Vaults | eatType : pub | priceRange : more than £ 30 | customer rating : 5 out of 5 ||",
           "Write a short poem about the sea.", "What is the capital of France?", "Explain LoRA in one sentence.",
           "name : Zizzi | eatType : coffee shop | area : riverside ||", "List three colours.",
           "How many legs does a spider have?", "Translate 'good morning' to French."]


def make_adapter(model_dir: str, out: str, seed: int = 0, targets: str | list[str] = "all-linear") -> None:
    """An r=8 adapter (all-linear by default) with random nonzero A and B, saved in PEFT layout."""
    import torch

    from lorakit import LoraConfig, inject, save_adapter
    from lorakit.train.tasks import load_model, resolve_model_path

    model = load_model(resolve_model_path(model_dir), "causal_lm", [])
    inject(model, LoraConfig(r=8, alpha=16, targets=targets))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(model, out)


def build(model, mode: str, adapter: str):
    """`model` (the bare base, eval) prepared for `mode`, in place."""
    if mode in ("unmerged", "unplanned", "merged", "unloaded"):
        from lorakit import load_adapter, merge, merge_and_unload

        load_adapter(model, adapter)
        if mode == "merged":
            merge(model)
        elif mode == "unloaded":
            model = merge_and_unload(model)
    elif mode == "peft":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter).eval()
    return model


def timed_generate(model, tok, batch: int, new_tokens: int, warm_up: bool = True, plan: bool = True) -> float:
    """Seconds of one greedy generate of exactly `new_tokens` for the first `batch` prompts; with `plan`, inside a
    decode_plan as lorakit.generate runs it (building the plan is timed too; on a model without LoRA layers it
    covers nothing)."""
    import contextlib

    import torch

    from lorakit.decode_plan import decode_plan

    enc = tok(PROMPTS[:batch], add_special_tokens=False, padding=True, return_tensors="pt")
    options = {"do_sample": False, "pad_token_id": tok.pad_token_id, "temperature": None, "top_p": None,
               "top_k": None}
    with torch.no_grad():
        if warm_up:
            model.generate(**enc, max_new_tokens=4, min_new_tokens=4, **options)
        start = time.perf_counter()
        with decode_plan(model) if plan else contextlib.nullcontext():
            out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **options)
        seconds = time.perf_counter() - start
    assert out.shape[1] - enc["input_ids"].shape[1] == new_tokens
    return seconds


def load(args: argparse.Namespace):
    import torch

    torch.set_num_threads(args.threads)
    from lorakit.train.tasks import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    model, tok = load_model(path, "causal_lm", []).eval(), load_tokenizer(path)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def worker(args: argparse.Namespace) -> None:
    """One mode, one batch size: print {"tokens_per_s", "seconds"} as JSON."""
    model, tok = load(args)
    seconds = timed_generate(build(model, args.mode, args.adapter), tok, args.batch, args.new_tokens,
                             plan=args.mode != "unplanned")
    print(json.dumps({"tokens_per_s": args.batch * args.new_tokens / seconds, "seconds": seconds}))


def _warm_models(args: argparse.Namespace, modes: list[str], batches: list[int], adapter: str) -> tuple:
    """(every mode's model in this process: copies of one loaded base, each warmed up by a short generate; the
    tokenizer; {(mode, batch): []} for the times)."""
    import copy

    base, tok = load(args)
    models = {m: build(copy.deepcopy(base), m, adapter) for m in modes}
    for b in batches:
        for m in modes:
            timed_generate(models[m], tok, b, 8, warm_up=False, plan=m != "unplanned")
    return models, tok, {(m, b): [] for m in modes for b in batches}


def in_process(args: argparse.Namespace, modes: list[str], batches: list[int], adapter: str) -> dict:
    """Every mode's model in this process; generate calls alternate by round."""
    models, tok, times = _warm_models(args, modes, batches, adapter)
    for r in range(args.rounds):
        for b in batches:
            for m in (modes if r % 2 == 0 else modes[::-1]):
                times[(m, b)].append(timed_generate(models[m], tok, b, args.new_tokens, warm_up=False,
                                                    plan=m != "unplanned"))
    return times


class _Turns:
    """Threads that take turns: one runs at a time, in a fixed rotation, and each one's running time is summed."""

    def __init__(self, names: list[str]) -> None:
        self.order, self.i, self.since = list(names), 0, 0.0
        self.spent = dict.fromkeys(names, 0.0)
        self.cond = threading.Condition()

    def take(self, name: str) -> None:
        """Wait for `name`'s turn, then start its clock."""
        with self.cond:
            self.cond.wait_for(lambda: self.order[self.i] == name)
            self.since = time.perf_counter()

    def give(self, name: str, done: bool = False) -> None:
        """Stop `name`'s clock and hand the turn on (`done`: it leaves the rotation)."""
        with self.cond:
            self.spent[name] += time.perf_counter() - self.since
            if done:
                self.order.pop(self.i)
            else:
                self.i += 1
            self.i = self.i % len(self.order) if self.order else 0
            self.cond.notify_all()


def lockstep(args: argparse.Namespace, modes: list[str], batches: list[int], adapter: str) -> dict:
    """{(mode, batch): [seconds]}: each round runs one whole generate per mode, each in its own thread, the threads
    taking turns forward by forward (a turn: one forward and generate's own work up to the next), so all modes'
    generates advance together through the machine's speed of the moment; a generate's time is the sum of its turns,
    the plan's build and the prefill included."""
    models, tok, times = _warm_models(args, modes, batches, adapter)
    for r in range(args.rounds):
        for b in batches:
            order = modes[r % len(modes):] + modes[:r % len(modes)]
            for m, seconds in _lockstep_round(args, models, tok, b, order).items():
                times[(m, b)].append(seconds)
    return times


def _lockstep_round(args: argparse.Namespace, models: dict, tok, batch: int, order: list[str]) -> dict[str, float]:
    """{mode: seconds} of one generate per mode, the modes' threads taking turns at every forward."""
    import torch

    turns = _Turns(order)
    errors: list[BaseException] = []

    def run(m: str) -> None:
        torch.set_num_threads(args.threads)
        turns.take(m)
        try:
            timed_generate(models[m], tok, batch, args.new_tokens, warm_up=False, plan=m != "unplanned")
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
        finally:
            turns.give(m, done=True)

    def switch(m: str) -> None:  # a forward pre-hook: returns None, so the forward's inputs stay as they are
        turns.give(m)
        turns.take(m)

    hooks = [(models[m].get_base_model() if m == "peft" else models[m]).register_forward_pre_hook(
        lambda *_, m=m: switch(m)) for m in order]
    threads = [threading.Thread(target=run, args=(m,)) for m in order]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for h in hooks:
            h.remove()
    if errors:
        raise errors[0]
    return turns.spent


def interleaved_steps(args: argparse.Namespace, modes: list[str], batch: int, adapter: str) -> dict:
    """{mode: [seconds of each timed decode step]}: one prefill per mode, then `args.steps` rounds of one decode
    forward per mode (order rotating), each mode's KV cache cropped back to the prompt after its step."""
    import contextlib
    import copy

    import torch

    from lorakit.decode_plan import decode_plan

    base, tok = load(args)
    models = {m: build(copy.deepcopy(base), m, adapter) for m in modes}
    enc = tok(PROMPTS[:batch], add_special_tokens=False, padding=True, return_tensors="pt")
    mask = torch.cat([enc["attention_mask"], torch.ones(batch, 1, dtype=torch.long)], 1)
    step_ids = torch.full((batch, 1), 42)
    times: dict[str, list[float]] = {m: [] for m in modes}
    with torch.no_grad(), contextlib.ExitStack() as plans:
        for m in modes:
            if m != "unplanned":
                plans.enter_context(decode_plan(models[m]))
        caches = {m: models[m](**enc, use_cache=True).past_key_values for m in modes}
        for r in range(args.steps + 10):  # the first 10 rounds warm up
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                start = time.perf_counter()
                models[m](input_ids=step_ids, attention_mask=mask, past_key_values=caches[m], use_cache=True)
                seconds = time.perf_counter() - start
                caches[m].crop(-1)
                if r >= 10:
                    times[m].append(seconds)
    return times


def _run_worker(args: argparse.Namespace, mode: str, batch: int, adapter: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--batch", str(batch), "--adapter", adapter,
           "--model", args.model, "--new_tokens", str(args.new_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} batch {batch} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--quick", action="store_true", help="8 new tokens, 1 round (a smoke test)")
    p.add_argument("--in-process", action="store_true", help="all modes in one process, alternating calls")
    p.add_argument("--lockstep", action="store_true",
                   help="all modes in one process, their generates taking turns forward by forward")
    p.add_argument("--steps", type=int, default=0, help="time N interleaved single decode steps per mode instead")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="base", help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--adapter", default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.worker:
        return worker(args)
    if args.quick:
        args.new_tokens, args.rounds = 8, 1
    modes, batches = args.modes.split(","), [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as adapter:
        make_adapter(args.model, adapter)
        if args.steps:
            return _print_steps(args, modes, batches, adapter)
        if args.lockstep:
            times = lockstep(args, modes, batches, adapter)
        elif args.in_process:
            times = in_process(args, modes, batches, adapter)
        else:
            times = {(m, b): [] for m in modes for b in batches}
            for r in range(args.rounds):
                for b in batches:
                    for m in (modes if r % 2 == 0 else modes[::-1]):  # alternate the order between rounds
                        times[(m, b)].append(_run_worker(args, m, b, adapter)["seconds"])
    import torch

    where = ("generates taking turns forward by forward in one process" if args.lockstep
             else "alternating calls in one process" if args.in_process else "fresh processes")
    print(f"greedy, {args.new_tokens} new tokens, {args.threads} threads, median of {args.rounds} rounds, {where}; "
          f"torch {torch.__version__}, model {args.model}")
    print(f"{'batch':>5}  " + "  ".join(f"{m:>18}" for m in modes))
    for b in batches:
        base = statistics.median(times[(modes[0], b)])
        cells = []
        for m in modes:
            t = statistics.median(times[(m, b)])
            cells.append(f"{b * args.new_tokens / t:7.1f} tok/s {t / base:4.2f}x")
        print(f"{b:>5}  " + "  ".join(f"{c:>18}" for c in cells))
    print(f"(x = time relative to {modes[0]}; targets: unmerged <= 1.10x, merged within 0.98-1.02x)")
    for b in batches:  # paired: each round's time over the same round's base time
        for m in modes[1:]:
            pairs = sorted(t / t0 for t, t0 in zip(times[(m, b)], times[(modes[0], b)], strict=True))
            print(f"batch {b} {m}: per-round ratio median {statistics.median(pairs):.3f} "
                  f"(range {pairs[0]:.3f}-{pairs[-1]:.3f})")


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile of `values` (nearest rank): the fastest steps' time, which the VM's slowdowns (they only ever
    add time) disturb least."""
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


def _print_steps(args: argparse.Namespace, modes: list[str], batches: list[int], adapter: str) -> None:
    import torch

    print(f"single decode steps, {args.steps} interleaved rounds, {args.threads} threads; torch {torch.__version__}, "
          f"model {args.model}")
    for b in batches:
        times = interleaved_steps(args, modes, b, adapter)
        base = statistics.median(times[modes[0]])
        print(f"batch {b}: " + "  ".join(f"{m} {statistics.median(times[m]) * 1e3:.2f} ms "
                                         f"({statistics.median(times[m]) / base:.3f}x)" for m in modes))
        for m in modes[1:]:
            pairs = sorted(t / t0 for t, t0 in zip(times[m], times[modes[0]], strict=True))
            quartile = len(pairs) // 4
            print(f"  {m}: paired per-step ratio median {statistics.median(pairs):.3f} "
                  f"(quartiles {pairs[quartile]:.3f}-{pairs[-1 - quartile]:.3f}); fastest steps' ratio: "
                  f"10th percentile {_quantile(times[m], 0.1) / _quantile(times[modes[0]], 0.1):.3f}, "
                  f"minimum {min(times[m]) / min(times[modes[0]]):.3f}")
    print(f"(x = time relative to {modes[0]}; targets: unmerged <= 1.10x, merged within 0.98-1.02x)")


if __name__ == "__main__":
    main()
