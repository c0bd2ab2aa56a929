"""E2E on SmolLM2-135M, two views over the E2E table's rows (experiments/e2e_table.py), scored on test.txt
(BLEU, NIST, METEOR, ROUGE-L, CIDEr; greedy) like every row of that table:

    e2e-methods   LoRA q,v r=4 against AdapterH, AdapterL, PreLayer and PreEmbed (the paper's Table 3 rows)
    rank-e2e      LoRA q,v at r in {1, 4, 16}, alpha 8 for every r (the E2E half of the paper's Table 6)

Both run only the rows the table has not finished, into the table's own store (runs/e2e-table and
experiments/results/e2e-table.json), so the r=4 row is the table's lora-qv-r4 and nothing trains twice.
With --quick or --model the rows go into OUT/runs and OUT/results.json instead. One seed (as the table).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from experiments import e2e_table
from experiments.plots import plot_lines
from experiments.runner import Experiment, write_text
from lorakit.errors import LoraConfigError

METHOD_ROWS = ("lora-qv-r4", "adapter", "adapter-l", "prefix", "prompt")
RANK_ROWS = {"lora-qv-r1": 1, "lora-qv-r4": 4, "lora-qv-r16": 16}


def table_args(out: Path, quick: bool, model: str | None, seeds: int | None, log: Callable):
    """The E2E table's settings for these rows: its store for a full run on SmolLM2, OUT's otherwise."""
    if seeds not in (None, 1):
        raise LoraConfigError(f"--seeds {seeds}: the E2E rows run one seed (40 minutes each); leave --seeds out")
    argv = ["--quick"] * quick + (["--model", model] if model else [])
    if quick or model:
        argv += ["--runs", str(out / "runs"), "--results", str(out / "results.json")]
    args = e2e_table.parse_args(argv)
    args.log = log
    return args


def _note(args) -> str:
    shared = (" Rows are shared with `python experiments/e2e_table.py` (a row either one finished is not trained "
              "again)." if args.results == e2e_table.RESULTS / "e2e-table.json" else "")
    return f"\n{e2e_table.describe(args)}; run directories: {e2e_table.shown(args.runs)}.{shared}\n"


def _view(out: Path, quick: bool, model: str | None, seeds: int | None, log: Callable, rows: dict,
          title: str) -> tuple[dict, str]:
    """Run the table rows `rows` that are missing; (all results, the view's markdown: title, table, note)."""
    args = table_args(out, quick, model, seeds, log)
    results = e2e_table.run_rows(args, rows)
    out.mkdir(parents=True, exist_ok=True)
    return results, f"# {title}\n\n" + e2e_table.table(results, rows) + "\n" + _note(args)


def run_methods(out: Path, quick: bool, model: str | None, seeds: int | None, log: Callable) -> list[Path]:
    _, text = _view(out, quick, model, seeds, log, METHOD_ROWS,
                    "E2E on SmolLM2: LoRA vs adapters and prefixes (test set)")
    return [write_text(out / "e2e_methods.md", text, quick)]


def run_rank(out: Path, quick: bool, model: str | None, seeds: int | None, log: Callable) -> list[Path]:
    results, text = _view(out, quick, model, seeds, log, RANK_ROWS,
                          "rank on E2E (SmolLM2, LoRA on q, v, alpha 8; test set)")
    points = [(r, [100 * results[name]["scores"]["BLEU"]]) for name, r in RANK_ROWS.items()]
    full = results.get("full", {}).get("scores", {}).get("BLEU")  # the table's full fine-tuning row, if run
    references = {"full fine-tuning": 100 * full} if full is not None else {}
    scores = [v[0] for _, v in points] + list(references.values())
    ylim = (math.floor(min(scores)) - 3, math.ceil(max(scores)) + 3)  # a few tenths of BLEU drawn as what they are
    figure = plot_lines({"LoRA q, v": points}, out / "rank_e2e.png", "E2E test BLEU vs rank (q, v)", "rank r",
                        "BLEU", log_base=2, ylim=ylim, references=references)
    return [write_text(out / "rank_e2e.md", text, quick), figure]


RANK = Experiment("rank-e2e", "r in {1,4,16} on q,v, E2E test, SmolLM2 (rows of the E2E table)", run=run_rank)
METHODS_EXPERIMENT = Experiment("e2e-methods", "LoRA vs AdapterH/L, PreLayer, PreEmbed on E2E test, SmolLM2 "
                                "(rows of the E2E table)", run=run_methods)
