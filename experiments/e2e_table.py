"""The paper's Table 3 in miniature: SmolLM2-135M-Instruct on E2E NLG, one row per method.

Every method trains through `lorakit train --task e2e` (the e2e recipe: 1 epoch of batch 8 on the train
part of valid.txt, max_length 160, best-on-dev checkpoint on the 10% dev MRs) with only the flags below
changed, in a fresh process each (so peak memory is the method's own), then `lorakit eval` generates
greedily for the 630 MRs of test.txt and scores them as the official e2e-metrics script does.
The zero-shot row is the bare base model prompted with an instruction through its chat template.

Resumable: each finished row is saved to the results json (experiments/results/e2e-table.json, committed,
with each row's summary, generated texts and scores beside it) and skipped on a rerun; a row cut short
resumes from its last training checkpoint (every 50 steps), and a row whose training or scoring finished
is not run again. While a file RUNS/PAUSE exists the script waits before its next row, so a timing
benchmark can run alone between rows (two timed jobs on 2 cores spoil each other's numbers).

    python experiments/e2e_table.py                  # the full table (4-6 h on 2 cores; see docs/llm.md)
    python experiments/e2e_table.py --quick          # smoke test: a few steps, 4 MRs per row
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lorakit, also for the in-process zero-shot row
TEST = ROOT / "lorakit" / "data" / "e2e" / "test.txt"
# name -> (label, `lorakit train` flags on top of the e2e recipe); None = no training (zero-shot)
ROWS: dict[str, tuple[str, list[str] | None]] = {
    "zero-shot": ("base + instruction (zero-shot)", None),
    "lora-qv-r4": ("LoRA q,v r=4", ["--targets", "q_proj", "v_proj", "--r", "4", "--alpha", "8"]),
    "lora-all-linear": ("LoRA all-linear r=8", []),
    "top-k": ("top-k k=2", ["--method", "top-k", "--top_k", "2", "--lr", "1e-4"]),
    "bitfit": ("BitFit", ["--method", "bitfit", "--lr", "1e-3"]),
    "full": ("full fine-tuning", ["--method", "full", "--lr", "5e-5"]),
}  # run in this order: cheapest first
RESULTS = ROOT / "experiments" / "results"
KEEP = ("summary.json", "config.json", "eval-test/scores.json", "eval-test/outputs.txt")
QUICK = ["--max_steps", "2", "--train_limit", "16", "--dev_limit", "8", "--eval_every", "0"]
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def _lorakit(args: list[str]) -> str:
    """Run `python -m lorakit ARGS` in a fresh process; its stdout (stderr passes through)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    done = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"lorakit {' '.join(args)} failed (exit {done.returncode}):\n{done.stdout}")
    return done.stdout


def _bias_free(model: str) -> bool:
    """True if the base model has no bias parameters at all (BitFit would train nothing)."""
    from lorakit.train.tasks import resolve_model_path

    config = json.loads((Path(resolve_model_path(model)) / "config.json").read_text())
    return config.get("model_type") == "llama" and not config.get("attention_bias") and not config.get("mlp_bias")


def zero_shot(args: argparse.Namespace, out: Path) -> dict:
    from lorakit.e2e import evaluate_e2e
    from lorakit.train.tasks import load_model, load_tokenizer, resolve_model_path

    path = resolve_model_path(args.model)
    model, tokenizer = load_model(path, "causal_lm", []), load_tokenizer(path)
    res = evaluate_e2e(model, tokenizer, TEST, style="instruct", limit=args.limit, batch_size=args.batch_size,
                       num_beams=args.num_beams, max_new_tokens=args.max_new_tokens, out_dir=out / "eval-test")
    return {"trainable": 0, "train_s": 0.0, "peak_mib": None, "scores": res.scores, "generate_s": res.generate_s}


def trained_row(name: str, flags: list[str], args: argparse.Namespace, out: Path) -> dict:
    """Train (resuming a cut run from its checkpoint), then score on test.txt; finished parts are not redone."""
    train = ["train", "--task", "e2e", "--model", args.model, "--out", str(out), "--no-progress", *flags]
    timing = out / "train_s.json"  # wall seconds of training, summed over the attempts that ran
    if not (out / "summary.json").is_file():
        spent = json.loads(timing.read_text())["train_s"] if timing.is_file() else 0.0
        resume = ["--resume"] if (out / "checkpoints" / "latest").is_file() else []
        start = time.perf_counter()
        done = _lorakit(train + (QUICK if args.quick else ["--checkpoint_every", "50"]) + resume)
        print(done.strip().splitlines()[-1], flush=True)
        timing.write_text(json.dumps({"train_s": spent + time.perf_counter() - start, "resumed": bool(resume)}))
    summary = json.loads((out / "summary.json").read_text())
    if not (out / "eval-test" / "scores.json").is_file():
        _lorakit(["eval", "--adapter", str(out / "adapter"), "--data", str(TEST), "--limit", str(args.limit),
                  "--num_beams", str(args.num_beams), "--max_new_tokens", str(args.max_new_tokens),
                  "--batch_size", str(args.batch_size), "--out", str(out / "eval-test")])
    scores = json.loads((out / "eval-test" / "scores.json").read_text())
    return {"trainable": summary["trainable"], "train_s": round(json.loads(timing.read_text())["train_s"], 1),
            "steps": summary["steps"], "step_s": summary["step_time_s"], "peak_mib": summary["memory_mib"],
            "dev_loss": summary["metric"], "scores": scores["scores"], "generate_s": scores["generate_s"]}


def keep(out: Path, dest: Path) -> None:
    """Copy a row's summary, config, scores and generated texts next to the committed results json."""
    for rel in KEEP:
        if (out / rel).is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).write_bytes((out / rel).read_bytes())


def table(results: dict) -> str:
    """The markdown table: BLEU, METEOR, ROUGE-L ×100; NIST, CIDEr as they come (the paper's units)."""
    head = ("| method | trainable | train time | peak RSS | BLEU | NIST | METEOR | ROUGE-L | CIDEr |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name, (label, _) in ROWS.items():
        row = results.get(name)
        if row is None:
            continue
        if "skipped" in row:
            lines.append(f"| {label} | 0 | - | - | {row['skipped']} |||||")
            continue
        s = row["scores"]
        cells = [f"{s[m] * (100 if m in ('BLEU', 'METEOR', 'ROUGE_L') else 1):.2f}" if s[m] is not None else "n/c"
                 for m in METRICS]
        peak = f"{row['peak_mib']:,.0f} MiB" if row["peak_mib"] else "-"
        lines.append(f"| {label} | {row['trainable']:,} | {row['train_s'] / 60:.0f} min | {peak} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 train steps, 4 test MRs, 16 new tokens")
    p.add_argument("--model", default="smollm2", help="base model (bundled name or directory)")
    p.add_argument("--runs", default=None, help="run directories (default runs/e2e-table, quick: runs/e2e-table-quick)")
    p.add_argument("--results", default=None, help="results json (default experiments/results/e2e-table.json)")
    p.add_argument("--only", nargs="+", choices=list(ROWS), help="run only these rows")
    p.add_argument("--num_beams", type=int, default=1, help="1 = greedy (the table's setting)")
    p.add_argument("--batch_size", type=int, default=16, help="generation batch")
    args = p.parse_args(argv)
    args.limit, args.max_new_tokens = (4, 16) if args.quick else (0, 96)
    runs = Path(args.runs or ROOT / "runs" / ("e2e-table-quick" if args.quick else "e2e-table"))
    results_path = Path(args.results or (runs / "results.json" if args.quick else RESULTS / "e2e-table.json"))
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    for name, (label, flags) in ROWS.items():
        if name in results or (args.only and name not in args.only):
            continue
        while (runs / "PAUSE").exists():  # a benchmark has the CPU; wait for it between rows
            time.sleep(20)
        print(f"== {label}", flush=True)
        if name == "bitfit" and _bias_free(args.model):
            results[name] = {"skipped": "not applicable: the model has no bias parameters"}
        elif flags is None:
            results[name] = zero_shot(args, runs / name)
        else:
            results[name] = trained_row(name, flags, args, runs / name)
        if not args.quick:
            keep(runs / name, results_path.parent / "e2e-table" / name)
        results_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = results_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(results_path)  # a finished row survives any later crash
    decoding = "greedy" if args.num_beams == 1 else f"beam {args.num_beams}"
    print(f"\nE2E test ({'first 4 MRs, quick' if args.quick else '630 MRs'}), {decoding}; results: {results_path}")
    print(table(results))


if __name__ == "__main__":
    main()
