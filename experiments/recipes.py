"""Each method's recipe on the bundled MiniLM (the paper tunes each method's lr on dev; so do we).

full, bitfit, head, lora-qv and lora are the recipes of README.md's SST-2 table (lora = TrainConfig's default
recipe). top-k, the adapters, prefix and prompt start from untuned values (their modules' constants); the
lr-sweep experiment tries each at lr/3, lr and 3·lr on SST-2 dev (seed 0) and writes best_lr.json, which
glue-mini then uses (`tuned_lrs`).
"""

from __future__ import annotations

import json
from pathlib import Path

from lorakit.train.bottleneck import ADAPTER_BATCH, ADAPTER_LR
from lorakit.train.prefix import PREFIX_BATCH, PREFIX_LR, PROMPT_BATCH, PROMPT_LR

RECIPES: dict[str, dict] = {
    "full": {"method": "full", "lr": 5e-5, "batch_size": 32},
    "top-k": {"method": "top-k", "top_k": 2, "lr": 1e-4, "batch_size": 32},
    "bitfit": {"method": "bitfit", "lr": 1e-3, "batch_size": 32},
    "head": {"method": "head", "lr": 1e-2, "batch_size": 32},
    "adapter": {"method": "adapter", "lr": ADAPTER_LR, "batch_size": ADAPTER_BATCH},
    "adapter-l": {"method": "adapter-l", "lr": ADAPTER_LR, "batch_size": ADAPTER_BATCH},
    "prefix": {"method": "prefix", "lr": PREFIX_LR, "batch_size": PREFIX_BATCH},
    "prompt": {"method": "prompt", "lr": PROMPT_LR, "batch_size": PROMPT_BATCH},
    "lora-qv": {"method": "lora", "targets": ["query", "value"], "r": 8, "alpha": 16, "lr": 5e-4, "batch_size": 32,
                "dropout": 0.1},
    "lora": {"method": "lora"},  # the default recipe: all-linear, r=8, alpha=16, lr 1e-3, batch 16
}
UNTUNED = ("top-k", "adapter", "adapter-l", "prefix", "prompt")
SWEEP_FACTORS = (1 / 3, 1.0, 3.0)
TUNED_FILE = "best_lr.json"


def tuned_lrs(sweep_dir: Path) -> dict[str, float]:
    """{method label: lr} chosen by the lr-sweep experiment, or {} if it has not run."""
    path = Path(sweep_dir) / TUNED_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def recipe(label: str, tuned: dict[str, float] | None = None) -> dict:
    out = dict(RECIPES[label])
    if tuned and label in tuned:
        out["lr"] = tuned[label]
    return out
