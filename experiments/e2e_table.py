"""The paper's Table 3 in miniature: SmolLM2-135M-Instruct on E2E NLG, one row per method.

Every method trains through `lorakit train --task e2e` (the e2e recipe: 1 epoch of batch 8 on the train
part of valid.txt, max_length 160, best-on-dev checkpoint on the 10% dev MRs) with only the flags below
changed, in a fresh process each (so peak memory is the method's own), then `lorakit eval` generates
greedily for the 630 MRs of test.txt and scores them as the official e2e-metrics script does.
The zero-shot row is the bare base model prompted with an instruction through its chat template.

This script owns every E2E training run: `lorakit experiment e2e-methods` (LoRA q,v r=4 vs the adapter and
prefix rows) and `lorakit experiment rank-e2e` (q,v at r = 1, 4, 16; r=4 is the lora-qv-r4 row, r=1 and
r=16 are RANK_ROWS) run their rows through `run_rows` into the same results json, so no configuration
trains twice.

Resumable: each finished row is saved to the results json (experiments/results/e2e-table.json, committed,
with each row's summary, generated texts and scores beside it) and skipped on a rerun; a row cut short
resumes from its last training checkpoint (every 50 steps), and a row whose training or scoring finished
is not run again. While a file RUNS/PAUSE exists the script waits before its next row, so a timing
benchmark can run alone between rows (two timed jobs on 2 cores spoil each other's numbers).

    python experiments/e2e_table.py                  # the table's 10 rows (~6 h on 2 cores; see docs/RESULTS.md)
    python experiments/e2e_table.py --only adapter prefix
    python experiments/e2e_table.py --quick          # smoke test: a few steps, 4 MRs per row
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout's lorakit, also for the in-process zero-shot row
from lorakit.train.bottleneck import ADAPTER_LR  # noqa: E402
from lorakit.train.prefix import PREFIX_LR, PROMPT_LR  # noqa: E402

TEST = ROOT / "lorakit" / "data" / "e2e" / "test.txt"


def _qv(r: int) -> list[str]:
    """LoRA on q, v at rank r, alpha 8 for every r (as the paper fixes alpha and does not tune it per r)."""
    return ["--targets", "q_proj", "v_proj", "--r", str(r), "--alpha", "8"]


# name -> (label, `lorakit train` flags on top of the e2e recipe); None = no training (zero-shot).
# The adapter and prefix rows keep the paper's Table 3 budgets as fractions of the model (GPT-2 M: AdapterH
# 11.09M = 3.1%, AdapterL 0.37M = 0.10%, PreLayer 0.35M = 0.10%): on SmolLM2 (d 576, 30 blocks, k/v width
# 192) AdapterH m=60 trains 4.19M (3.1%), AdapterL m=3 156k (0.12%), PreLayer p=10 115k (0.09%; 10 is also
# Li & Liang's table-to-text prefix length); PreEmbed (not in Table 3) takes the same 10 virtual tokens.
# Each trains at its method's untuned lr (lorakit.train.bottleneck / prefix); every row at the e2e budget.
ROWS: dict[str, tuple[str, list[str] | None]] = {
    "zero-shot": ("base + instruction (zero-shot)", None),
    "lora-qv-r4": ("LoRA q,v r=4", _qv(4)),
    "lora-all-linear": ("LoRA all-linear r=8", []),
    "top-k": ("top-k k=2", ["--method", "top-k", "--top_k", "2", "--lr", "1e-4"]),
    "bitfit": ("BitFit", ["--method", "bitfit", "--lr", "1e-3"]),
    "full": ("full fine-tuning", ["--method", "full", "--lr", "5e-5"]),
    "adapter": ("AdapterH m=60", ["--method", "adapter", "--bottleneck", "60", "--lr", f"{ADAPTER_LR:g}"]),
    "adapter-l": ("AdapterL m=3", ["--method", "adapter-l", "--bottleneck", "3", "--lr", f"{ADAPTER_LR:g}"]),
    "prefix": ("PreLayer p=10", ["--method", "prefix", "--prefix_length", "10", "--lr", f"{PREFIX_LR:g}"]),
    "prompt": ("PreEmbed p=10", ["--method", "prompt", "--prefix_length", "10", "--lr", f"{PROMPT_LR:g}"]),
}  # run in this order (the first six: cheapest first)
# Not in the table by default: the rest of the rank ablation (r=4 is the table's lora-qv-r4 row).
RANK_ROWS: dict[str, tuple[str, list[str] | None]] = {
    "lora-qv-r1": ("LoRA q,v r=1", _qv(1)),
    "lora-qv-r16": ("LoRA q,v r=16", _qv(16)),
}
ALL_ROWS = ROWS | RANK_ROWS
RESULTS = ROOT / "experiments" / "results"
KEEP = ("summary.json", "config.json", "eval-test/scores.json", "eval-test/outputs.txt")
QUICK = ["--max_steps", "2", "--train_limit", "16", "--dev_limit", "8", "--eval_every", "0"]
METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")


def _lorakit(args: list[str], in_process: bool = False) -> str:
    """Run `lorakit ARGS` in a fresh process (so a row's peak memory is its own), or in this one (quick mode: no
    start-up cost); its stdout (stderr passes through)."""
    if in_process:
        from lorakit.cli import main

        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            code = main(args)
        stdout = buffer.getvalue()
    else:
        env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        done = subprocess.run([sys.executable, "-m", "lorakit", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              text=True, check=False)
        code, stdout = done.returncode, done.stdout
    if code != 0:
        raise SystemExit(f"lorakit {' '.join(args)} failed (exit {code}):\n{stdout}")
    return stdout


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
        done = _lorakit(train + (QUICK if args.quick else ["--checkpoint_every", "50"]) + resume, args.quick)
        args.log(done.strip().splitlines()[-1])
        timing.write_text(json.dumps({"train_s": spent + time.perf_counter() - start, "resumed": bool(resume)}))
    summary = json.loads((out / "summary.json").read_text())
    if not (out / "eval-test" / "scores.json").is_file():
        _lorakit(["eval", "--adapter", str(out / "adapter"), "--data", str(TEST), "--limit", str(args.limit),
                  "--num_beams", str(args.num_beams), "--max_new_tokens", str(args.max_new_tokens),
                  "--batch_size", str(args.batch_size), "--out", str(out / "eval-test")], args.quick)
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


def table(results: dict, names: Iterable[str] = ROWS) -> str:
    """The markdown table of the rows `names` that have results: BLEU, METEOR, ROUGE-L ×100; NIST, CIDEr as they
    come (the paper's units)."""
    head = ("| method | trainable | train time | peak RSS | BLEU | NIST | METEOR | ROUGE-L | CIDEr |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    lines = [head]
    for name in names:
        label, row = ALL_ROWS[name][0], results.get(name)
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's flags, with the run directory, results json and generation budget resolved."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke test: 2 train steps, 4 test MRs, 16 new tokens, "
                                                        "every row in this process")
    p.add_argument("--model", default="smollm2", help="base model (bundled name or directory)")
    p.add_argument("--runs", default=None, help="run directories (default runs/e2e-table, quick: runs/e2e-table-quick)")
    p.add_argument("--results", default=None, help="results json (default experiments/results/e2e-table.json)")
    p.add_argument("--only", nargs="+", choices=list(ALL_ROWS),
                   help="run only these rows (default: the table's; the rank rows lora-qv-r1, lora-qv-r16 only here)")
    p.add_argument("--num_beams", type=int, default=1, help="1 = greedy (the table's setting)")
    p.add_argument("--batch_size", type=int, default=16, help="generation batch")
    args = p.parse_args(argv)
    args.limit, args.max_new_tokens = (4, 16) if args.quick else (0, 96)
    args.runs = Path(args.runs or ROOT / "runs" / ("e2e-table-quick" if args.quick else "e2e-table"))
    args.results = Path(args.results or (args.runs / "results.json" if args.quick else RESULTS / "e2e-table.json"))
    args.log = functools.partial(print, flush=True)
    return args


def read_rows(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def run_rows(args: argparse.Namespace, names: Iterable[str]) -> dict:
    """Run each row of `names` not yet in the results json, saving each as it finishes; every row's results."""
    for name in names:
        if name in read_rows(args.results):
            continue
        while (args.runs / "PAUSE").exists():  # a benchmark has the CPU; wait for it between rows
            time.sleep(20)
        label, flags = ALL_ROWS[name]
        args.log(f"== {label}")
        if name == "bitfit" and _bias_free(args.model):
            row = {"skipped": "not applicable: the model has no bias parameters"}
        elif flags is None:
            row = zero_shot(args, args.runs / name)
        else:
            row = trained_row(name, flags, args, args.runs / name)
        if not args.quick:
            keep(args.runs / name, args.results.parent / "e2e-table" / name)
        results = read_rows(args.results) | {name: row}  # re-read: another command may have added rows meanwhile
        args.results.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.results.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=2) + "\n")
        tmp.replace(args.results)  # a finished row survives any later crash
    return read_rows(args.results)


def shown(path: Path) -> str:
    """`path` relative to the checkout when it lies inside it (what a committed report should print), else as is."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def describe(args: argparse.Namespace) -> str:
    decoding = "greedy" if args.num_beams == 1 else f"beam {args.num_beams}"
    return f"E2E test ({'first 4 MRs, quick' if args.quick else '630 MRs'}), {decoding}; results: {shown(args.results)}"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    names = [n for n in ALL_ROWS if n in args.only] if args.only else list(ROWS)  # always in the table's order
    results = run_rows(args, names)
    print(f"\n{describe(args)}")
    print(table(results, names))


if __name__ == "__main__":
    main()
