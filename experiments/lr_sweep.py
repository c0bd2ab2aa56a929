"""lr-sweep: each method without a known recipe at lr/3, lr, 3·lr on SST-2 dev, seed 0; writes best_lr.json.

This is the only tuning, and it uses the dev split (as the paper's appendix does); glue-mini then runs the
chosen lr with 3 seeds.
"""

from __future__ import annotations

import json
from pathlib import Path

from experiments.plots import plot_lines
from experiments.recipes import RECIPES, SWEEP_FACTORS, TUNED_FILE, UNTUNED
from experiments.runner import Experiment, Spec, markdown_table, write_text


def specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    return [Spec(f"sst2-{label}-lr{RECIPES[label]['lr'] * f:.3g}", label,
                 {"task": "sst2", **RECIPES[label], "lr": RECIPES[label]["lr"] * f}, 0, {"label": label})
            for label in UNTUNED for f in SWEEP_FACTORS]


def report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    best: dict[str, tuple[float, float]] = {}
    rows = []
    for r in results:
        label, lr, acc = r["meta"]["label"], r["config"]["lr"], r["summary"]["metric"]
        rows.append([label, f"{lr:.3g}", f"{acc:.4f}"])
        if label not in best or acc > best[label][1]:
            best[label] = (lr, acc)
    (out / TUNED_FILE).write_text(json.dumps({k: v[0] for k, v in best.items()}, indent=2) + "\n", encoding="utf-8")
    table = markdown_table(["method", "lr", "SST-2 dev accuracy (seed 0)"], rows)
    curves: dict = {}
    for r in results:
        curves.setdefault(r["meta"]["label"], []).append((r["config"]["lr"], [r["summary"]["metric"]]))
    figure = plot_lines(curves, out / "lr_sweep.png", "lr sweep (SST-2 dev, seed 0)", "peak lr", "accuracy",
                        log_base=10)
    text = "# lr sweep on SST-2 dev\n\n" + table + "\nFigure: lr_sweep.png\n"
    return [write_text(out / "lr_sweep.md", text, quick), out / TUNED_FILE, figure]


EXPERIMENT = Experiment("lr-sweep", "lr/3, lr, 3lr for top-k, adapters, prefix, prompt on SST-2 dev", specs, report)
