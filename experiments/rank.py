"""rank: LoRA on q, v with r in {1, 2, 4, 8, 64} on SST-2 (the paper's Table 6). alpha stays 16 for every r, as
the paper fixes alpha to the first r it tries and does not tune it."""

from __future__ import annotations

from pathlib import Path

from experiments.plots import plot_lines
from experiments.recipes import RECIPES
from experiments.runner import Experiment, Spec, markdown_table, mean_std, train_seconds, write_text

RANKS = (1, 2, 4, 8, 64)
SST2_DEV = 872  # sentences in the bundled SST-2 dev split (the binomial error bars of a single seed)


def specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    return [Spec(f"sst2-qv-r{r}-s{seed}", f"r={r}", {"task": "sst2", **RECIPES["lora-qv"], "r": r}, seed, {"r": r})
            for r in RANKS for seed in range(seeds or 1)]


def report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    rows, points = [], []
    for r in RANKS:
        rs = [x for x in results if x["meta"]["r"] == r]
        if rs:
            s, accuracies = rs[0]["summary"], [x["summary"]["metric"] for x in rs]
            rows.append([str(r), f"{s['trainable']:,}", mean_std(accuracies),
                         f"{sum(map(train_seconds, rs)) / len(rs):.0f} s"])
            points.append((r, accuracies))
    table = markdown_table(["rank r (q, v)", "trainable", "SST-2 dev accuracy", "train time"], rows)
    figure = plot_lines({"SST-2 dev accuracy": points}, out / "rank.png", "rank of LoRA on Wq, Wv (SST-2 dev)",
                        "rank r", "accuracy (bars: ±1 s.e. or seed std)", log_base=2, n_eval=0 if quick else SST2_DEV)
    return [write_text(out / "rank.md", "# rank: LoRA on Wq, Wv, SST-2 dev\n\n" + table + "\nFigure: rank.png\n",
                       quick), figure]


EXPERIMENT = Experiment("rank", "r in {1,2,4,8,64} on q,v, SST-2", specs, report)
