"""parity: can a LoRA recipe reach full fine-tuning's SST-2 dev accuracy (issue 11), and at what train time?

Full fine-tuning, the default LoRA recipe and the candidate recipes below on MiniLM, 3 seeds each. The report
gives each recipe's gap to full fine-tuning's mean in points, whether it is within the issue's 0.3-point bar,
and its train time as a multiple of full fine-tuning's.
"""

from __future__ import annotations

from pathlib import Path
from statistics import mean

from experiments.plots import plot_lines
from experiments.rank import SST2_DEV
from experiments.recipes import recipe
from experiments.runner import (
    Experiment,
    Spec,
    group_rows,
    machines_text,
    markdown_table,
    mean_std,
    memory_text,
    train_seconds,
    trainable_text,
    write_text,
)
from lorakit.train.config import TrainConfig

SEEDS = 3
BAR = 0.3  # points of dev accuracy a recipe may fall short of full fine-tuning's mean (the bar)

# Each candidate is an overlay on the default LoRA recipe (recipe("lora"): all-linear, r=8, alpha=16, lr 1e-3,
# batch 16, 3 epochs), which is 1.0 point below full fine-tuning over 3 seeds (0.8735 vs 0.8834, README).
CANDIDATES: dict[str, dict] = {
    # The paper trains LoRA far longer (60 epochs on RoBERTa-base SST-2). The earlier 8-epoch try at lr 1e-3
    # overfit after epoch 5 (its dev loss rose), so: twice the default schedule at half its lr.
    "lora-long": {"lr": 5e-4, "epochs": 6},
    # LoRA+ (Hayou et al., 2024): B learns lora_plus_ratio times faster than A (here A at 5e-4, B at 4e-3); its
    # authors report better accuracy and faster convergence at the same cost, so a gain here costs no extra time.
    "lora-plus": {"lr": 5e-4, "lora_plus_ratio": 8.0, "epochs": 3},
    # Twice the rank at the same alpha / r = 2 and schedule: tests whether r=8 is what limits the default.
    "lora-r16": {"r": 16, "alpha": 32.0, "epochs": 3},
    # Every bias trains too (PEFT's bias="all"; BitFit's values on top of LoRA's: +26k): full fine-tuning updates
    # the biases, LoRA alone does not, and BitFit alone reaches 0.827 here, so they carry signal of their own.
    "lora-bias": {"bias": "all", "epochs": 3},
    # Every LayerNorm trains too (+10k values on MiniLM): full fine-tuning re-centres and re-scales each block's
    # output; LoRA's low-rank updates to the linear layers cannot reach the norms' gains and shifts.
    "lora-ln": {"extra_trainable": ["*LayerNorm"], "epochs": 3},
    # Dropout 0.1 on the LoRA input path (the paper's GPT-2 setting): ~6.9k training sentences, LoRA at lr 1e-3
    # peaks by epoch 2-3 and its seed 1 sits near an instability edge; a regulariser at no extra cost.
    "lora-drop": {"dropout": 0.1, "epochs": 3},
    # lora-ln's two stable seeds were the best LoRA runs yet (0.8739, 0.8773) but its seed 1 collapsed to chance
    # by epoch 2, as r16's and bias's did; lora-drop's seed 1 did not. Both, with a longer warmup (10%) against
    # the early divergence.
    "lora-ln-drop": {"extra_trainable": ["*LayerNorm"], "dropout": 0.1, "warmup_ratio": 0.1, "epochs": 3},
    # Half of MiniLM's values are its word embeddings (30,522 x 384), which full fine-tuning updates and all-linear
    # LoRA never touches: LoRA on them too (an Embedding LoRA layer, +247k values at r 8).
    "lora-emb": {"targets": ["query", "key", "value", "dense", "word_embeddings"], "epochs": 3},
    # lora-ln-drop (the closest, -0.80) with twice the rank: r16 alone was no better than r8 on its two stable seeds
    # and collapsed on seed 1; the norms, dropout and warmup may let the extra capacity train stably.
    "lora-ln-drop-r16": {"extra_trainable": ["*LayerNorm"], "dropout": 0.1, "warmup_ratio": 0.1, "r": 16,
                         "alpha": 32.0, "epochs": 3},
    # lora-ln-drop peaked at its last epoch on 2 of 3 seeds (full fine-tuning on all 3): 5 epochs at the same lr.
    "lora-ln-drop-5ep": {"extra_trainable": ["*LayerNorm"], "dropout": 0.1, "warmup_ratio": 0.1, "epochs": 5},
}
# Candidates stopped after a screen on their first seeds (label: seeds run): lora-emb's seed 0 was 4.4 points
# below full fine-tuning with its dev loss rising from epoch 1, so its other seeds were not worth ~13 minutes.
SCREENED: dict[str, int] = {"lora-emb": 1}


def candidate(label: str) -> dict:
    """The SST-2 configuration of candidate `label`: the default LoRA recipe with its overlay. Raises
    LoraConfigError naming any overlay field TrainConfig lacks (or a bad value) before anything trains."""
    config = {"task": "sst2", **recipe("lora"), **CANDIDATES[label]}
    TrainConfig.from_dict(config)
    return config


def specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    n = seeds or (1 if quick else SEEDS)
    # full and lora are glue-mini's SST-2 configurations exactly ({"task": "sst2", **recipe(label)}; the lr-sweep
    # tunes neither), so where glue-mini has finished them the runner reuses its runs instead of training again.
    configs = {label: {"task": "sst2", **recipe(label)} for label in ("full", "lora")}
    configs |= {label: candidate(label) for label in CANDIDATES}
    # A control, not a candidate: full fine-tuning peaked at its last epoch on every seed, so does it gain from the
    # 5 epochs that brought lora-ln-drop-5ep within the bar? (The gap column stays measured against "full".)
    configs["full-5ep"] = {"task": "sst2", **recipe("full"), "epochs": 5}
    # Seed by seed, so a stopped experiment already compares every recipe at seed 0.
    return [Spec(f"sst2-{label}-s{seed}", label, config, seed, {"label": label})
            for seed in range(n) for label, config in configs.items() if seed < SCREENED.get(label, n)]


def report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    groups = group_rows(results)
    accuracy = {label: [r["summary"]["metric"] for r in rs] for label, rs in groups.items()}
    seconds = {label: mean(train_seconds(r) for r in rs) for label, rs in groups.items()}
    full = groups.get("full")
    rows = []
    for label, rs in groups.items():
        gap = 100 * (mean(accuracy[label]) - mean(accuracy["full"])) if full else None
        within = "reference" if label == "full" else "–" if gap is None else "yes" if gap >= -BAR - 1e-9 else "no"
        rows.append([label, mean_std(accuracy[label]), "–" if gap is None else f"{gap:+.2f}", within,
                     trainable_text(rs[0]["summary"]), f"{seconds[label]:.0f} s",
                     f"{seconds[label] / seconds['full']:.2f}×" if full else "–", memory_text(rs), str(len(rs))])
    table = markdown_table(["recipe", "dev accuracy (mean ± std)", "gap to full (points)", f"within {BAR}",
                            "trainable (% of total)", "train time", "× full's", "peak memory", "seeds"], rows)
    configs = {label: rs[0]["config"] for label, rs in groups.items()}
    recipes = markdown_table(["recipe", "method", "lr", "B lr × (LoRA+)", "r", "alpha", "epochs", "batch", "also"],
                             [[label, c["method"], f"{c['lr']:g}", *_lora_cells(c), str(c["epochs"]),
                               str(c["batch_size"]), _also(label)] for label, c in configs.items()])
    reused = sorted(r["name"] for r in results if r.get("reused"))
    figure = plot_lines({label: [(r["seed"], [r["summary"]["metric"]]) for r in rs] for label, rs in groups.items()},
                        out / "parity.png", "SST-2 dev accuracy per seed", "seed",
                        "accuracy (bars: ±1 s.e. of one seed)", n_eval=0 if quick else SST2_DEV)
    text = ["# parity: SST-2 dev accuracy on all-MiniLM-L6-v2, LoRA recipes vs full fine-tuning\n\n", table,
            f"\nGap: a recipe's mean minus full fine-tuning's mean, in points (negative = below); within {BAR}: the "
            f"gap is ≥ −{BAR}. Accuracy is each run's best dev epoch. Train time: optimizer steps only (mean step "
            "time × steps), the mean over seeds.\n",
            "\n## recipes (B lr ×: LoRA+'s lora_plus_ratio)\n\n", recipes]
    screened = [f"{label} after {n} seed{'s' if n > 1 else ''}" for label, n in SCREENED.items() if label in groups]
    if screened and not quick:
        text.append(f"\nScreened out (stopped on purpose, see experiments/parity.py): {', '.join(screened)}.\n")
    if reused:
        text.append(f"\nReused from sibling experiments (trained and timed when those ran): {', '.join(reused)}.\n")
    text.append(machines_text(results))
    text.append("\nFigure: parity.png\n")
    return [write_text(out / "parity.md", "".join(text), quick), figure]


def _also(label: str) -> str:
    """A candidate's overlay fields that the recipes table has no column for (bias, dropout, warmup, ...)."""
    shown = {"lr", "lora_plus_ratio", "r", "alpha", "epochs", "batch_size"}
    extra = {k: v for k, v in CANDIDATES.get(label, {}).items() if k not in shown}
    return ", ".join(f"{k}={'/'.join(v) if isinstance(v, list) else v}" for k, v in extra.items()) or "–"


def _lora_cells(config: dict) -> list[str]:
    if config["method"] != "lora":
        return ["–"] * 3
    return [f"{config['lora_plus_ratio']:g}", str(config["r"]), f"{config['alpha']:g}"]


EXPERIMENT = Experiment("parity", "SST-2: full FT (3, 5 epochs), default LoRA, 10 candidates, 3 seeds", specs, report)
