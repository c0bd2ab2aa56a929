"""glue-mini: SST-2 and RTE on MiniLM, every method with its own recipe, 3 seeds (the paper's Table 2 in miniature)."""

from __future__ import annotations

from pathlib import Path

from experiments.recipes import RECIPES, recipe, tuned_lrs
from experiments.runner import Experiment, Spec, machines_text, markdown_table, mean_std, method_table, write_text

TASKS = ("sst2", "rte")
SEEDS = 3


def specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    tuned = {} if quick else tuned_lrs(out.parent / "lr-sweep")  # the lr-sweep's choices, when it has run
    n = seeds or (1 if quick else SEEDS)
    return [Spec(f"{task}-{label}-s{seed}", f"{task} {label}", {"task": task, **recipe(label, tuned)}, seed,
                 {"task": task, "label": label})
            for seed in range(n) for task in TASKS for label in RECIPES]  # seed outermost: each seed completes a table


def report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    text = ["# glue-mini: SST-2 and RTE dev accuracy on all-MiniLM-L6-v2\n"]
    for task in TASKS:
        rows = [r for r in results if r["meta"]["task"] == task]
        if rows:
            text += [f"\n## {task}\n\n", method_table(rows)]
    lrs = sorted({(r["meta"]["label"], r["config"]["lr"], r["config"]["batch_size"]) for r in results})
    text += ["\n## recipes (lr, batch)\n\n", markdown_table(["method", "lr", "batch"],
                                                          [[m, f"{lr:g}", str(b)] for m, lr, b in lrs])]
    compact = [[r["meta"]["label"]] + [mean_std([x["summary"]["metric"] for x in results
                                                 if x["meta"]["label"] == r["meta"]["label"]
                                                 and x["meta"]["task"] == t]) for t in TASKS]
               for r in results if r["meta"]["task"] == TASKS[0] and r["seed"] == 0]
    text += ["\n## side by side (accuracy)\n\n", markdown_table(["method", *TASKS], compact)]
    text.append(machines_text(results))
    return [write_text(out / "glue_mini.md", "".join(text), quick)]


EXPERIMENT = Experiment("glue-mini", "SST-2 and RTE, 10 methods, 3 seeds", specs, report)
