"""ner: WNUT-17 entity F1 on MiniLM, LoRA (default recipe) vs full fine-tuning, 3 seeds."""

from __future__ import annotations

from pathlib import Path

from experiments.recipes import recipe
from experiments.runner import Experiment, Spec, method_table, write_text

LABELS = ("lora", "full")


def specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    n = seeds or (1 if quick else 3)
    return [Spec(f"wnut17-{label}-s{seed}", label, {"task": "wnut17", **recipe(label)}, seed, {"label": label})
            for label in LABELS for seed in range(n)]


def report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    return [write_text(out / "ner.md", "# ner: WNUT-17 dev entity F1\n\n" + method_table(results), quick)]


EXPERIMENT = Experiment("ner", "WNUT-17, lora vs full, 3 seeds", specs, report)
