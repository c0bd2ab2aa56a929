"""Train-step time of every method of the E2E table, side by side in one run (SmolLM2, the e2e recipe, batch 8).

The E2E table's train times are wall clock over full runs made on different days, VMs and neighbours, which
varied up to ~2x for the same work. This runs each trained row of `experiments/e2e_table.py` (same flags, so the
configurations cannot drift apart) for `--steps` steps on the same first `--examples` training examples, one
fresh process after another, and prints each method's median step time (steps 3 onwards: the first two warm up)
and its ratio to LoRA q,v r=4. Run it alone on the machine: two timed jobs on 2 cores spoil each other.

    python benchmarks/method_steps.py                      # the table's 8 trained rows, 16 steps each (~6 min)
    python benchmarks/method_steps.py --rows lora-qv-r4 full --steps 24
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from experiments.e2e_table import ALL_ROWS, _lorakit  # noqa: E402  (a fresh `lorakit` process per row)
from lorakit.train.report import read_metrics  # noqa: E402

TRAINED = [name for name, (_, flags) in ALL_ROWS.items() if flags is not None and name != "bitfit"]
REFERENCE = "lora-qv-r4"


def measure(name: str, args: argparse.Namespace, work: Path) -> dict:
    """One row's median step time and peak RSS, from a fresh `lorakit train` process's metrics and summary."""
    out = work / name
    _lorakit(["train", "--task", "e2e", "--model", args.model, "--out", str(out), "--no-progress", *ALL_ROWS[name][1],
              "--max_steps", str(args.steps), "--train_limit", str(args.examples), "--dev_limit", "8",
              "--eval_every", "0"])
    train = [r for r in read_metrics(out / "metrics.jsonl") if r.get("split") == "train" and "examples_per_s" in r]
    summary = json.loads((out / "summary.json").read_text())
    batch = json.loads((out / "config.json").read_text()).get("batch_size", 8)
    return {"trainable": summary["trainable"], "step_s": statistics.median(batch / r["examples_per_s"]
                                                                           for r in train[2:]),
            "steps": len(train), "peak_mib": summary["memory_mib"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2")
    p.add_argument("--rows", nargs="+", choices=TRAINED, default=TRAINED)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--examples", type=int, default=128, help="the first N training examples, the same for every row")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    args = p.parse_args()
    if args.steps < 3:
        raise SystemExit(f"--steps {args.steps}: need at least 3 (the first two are warm-up); use 16")
    start = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    with tempfile.TemporaryDirectory() as work:
        results = {}
        for name in args.rows:
            results[name] = measure(name, args, Path(work))
            print(json.dumps({name: results[name]}), flush=True)
    import torch

    ref = results.get(REFERENCE, {}).get("step_s")
    print(f"\n{args.model}, e2e recipe, the first {args.examples} examples, median step of steps 3-{args.steps}, "
          f"one fresh process per row, started {start}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"| method | trainable | step | × {REFERENCE} | peak RSS |\n|---|---:|---:|---:|---:|")
    for name, r in results.items():
        ratio = f"{r['step_s'] / ref:.2f}" if ref else "-"
        print(f"| {ALL_ROWS[name][0]} | {r['trainable']:,} | {r['step_s']:.3f} s | {ratio} "
              f"| {r['peak_mib']:,.0f} MiB |")
    if args.out:
        Path(args.out).write_text(json.dumps({"started": start, "args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
