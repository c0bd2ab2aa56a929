"""E2E on SmolLM2-135M (the paper's Table 3 and the E2E half of Table 6, in miniature), scored by dev loss and
perplexity (the loop's dev metric; BLEU/NIST/METEOR/ROUGE-L/CIDEr come from the LLM issue's E2E evaluation).

    rank-e2e      LoRA on q, v at r in {1, 4, 16}, alpha 32 for every r (the paper's GPT-2 E2E alpha)
    e2e-methods   LoRA q, v r=4 against AdapterH, AdapterL, PreLayer and PreEmbed

One epoch of E2E takes ~40 minutes on 2 CPU cores, so each run trains one epoch (the paper trains 5).
The base model is "smollm2", resolved by lorakit.models (or pass --model DIR).
"""

from __future__ import annotations

from pathlib import Path

from experiments.runner import Experiment, Spec, method_table, write_text
from lorakit.train.bottleneck import ADAPTER_LR
from lorakit.train.prefix import PREFIX_LR, PROMPT_LR

# targets None: the architecture's q, v (q_proj, v_proj on SmolLM2; c_attn's q, v slices on GPT-2)
BASE = {"task": "e2e", "model": "smollm2", "epochs": 1, "batch_size": 8, "max_length": 128}
LORA = {"method": "lora", "targets": None, "r": 4, "alpha": 32, "lr": 2e-4, "dropout": 0.1}
METHODS = {"lora": LORA, "adapter": {"method": "adapter", "lr": ADAPTER_LR},
           "adapter-l": {"method": "adapter-l", "lr": ADAPTER_LR}, "prefix": {"method": "prefix", "lr": PREFIX_LR},
           "prompt": {"method": "prompt", "lr": PROMPT_LR}}
RANKS = (1, 4, 16)


def rank_specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    return [Spec(f"e2e-qv-r{r}-s{seed}", f"r={r}", {**BASE, **LORA, "r": r}, seed, {"r": r})
            for r in RANKS for seed in range(seeds or 1)]


def method_specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    return [Spec(f"e2e-{label}-s{seed}", label, {**BASE, **cfg}, seed, {"label": label})
            for label, cfg in METHODS.items() for seed in range(seeds or 1)]


def rank_report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    return [write_text(out / "rank_e2e.md", "# rank on E2E (SmolLM2, q, v; dev loss, lower is better)\n\n"
                       + method_table(results), quick)]


def method_report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    return [write_text(out / "e2e_methods.md", "# E2E on SmolLM2: LoRA vs adapters and prefixes (dev loss)\n\n"
                       + method_table(results), quick)]


RANK = Experiment("rank-e2e", "r in {1,4,16} on q,v, E2E, SmolLM2", rank_specs, rank_report)
METHODS_EXPERIMENT = Experiment("e2e-methods", "LoRA vs AdapterH/L, PreLayer, PreEmbed on E2E, SmolLM2",
                                method_specs, method_report)
