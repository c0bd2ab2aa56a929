"""targets: which weights to adapt at an equal budget (the paper's Table 5), SST-2: r=8 on one matrix type,
r=4 on two, r=2 on four, so every row trains 2·(r·d + d·r) values per matrix type × types = the same count
(all of MiniLM's q, k, v, o are d × d)."""

from __future__ import annotations

from pathlib import Path

from experiments.recipes import RECIPES
from experiments.runner import Experiment, Spec, markdown_table, mean_std, write_text

NAMES = {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"}  # BERT's module names
SETS = ("q", "k", "v", "o", "qk", "qv", "qkvo")
BUDGET_RANK = 8  # rank when one matrix type is adapted


def specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    return [Spec(f"sst2-{s}-s{seed}", "{" + ",".join(s) + "}",
                 {"task": "sst2", **RECIPES["lora-qv"], "targets": [NAMES[c] for c in s], "r": BUDGET_RANK // len(s)},
                 seed, {"set": s, "r": BUDGET_RANK // len(s)})
            for s in SETS for seed in range(seeds or 1)]


def report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    rows = []
    for s in SETS:
        rs = [x for x in results if x["meta"]["set"] == s]
        if rs:
            rows.append(["{W" + ", W".join(s) + "}", str(rs[0]["meta"]["r"]), f"{rs[0]['summary']['trainable']:,}",
                         mean_std([x["summary"]["metric"] for x in rs])])
    table = markdown_table(["adapted weights", "r", "trainable (incl. head)", "SST-2 dev accuracy"], rows)
    return [write_text(out / "targets.md", "# targets at an equal budget, SST-2 dev\n\n" + table, quick)]


EXPERIMENT = Experiment("targets", "{q},{k},{v},{o},{q,k},{q,v},{q,k,v,o} at equal budget, SST-2", specs, report)
