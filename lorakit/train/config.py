"""TrainConfig: every knob of a training run as a plain value; `lorakit train --<field> VALUE` sets one."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from lorakit.config import from_plain_dict
from lorakit.errors import LoraConfigError
from lorakit.train.bottleneck import ADAPTER_BATCH, ADAPTER_LR
from lorakit.train.prefix import PREFIX_BATCH, PREFIX_LR, PROMPT_BATCH, PROMPT_LR

METHODS = ("lora", "full", "top-k", "bitfit", "head", "adapter", "adapter-l", "prefix", "prompt")
SCHEDULES = ("linear", "cosine", "constant")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
# Each method's default peak lr and global batch, used where lr / batch_size are left None (README, "The
# recipe": the values of its SST-2 table; top-k as full fine-tuning). An explicit value always wins.
METHOD_RECIPES: dict[str, dict[str, float | int]] = {
    "lora": {"lr": 1e-3, "batch_size": 16},
    "full": {"lr": 5e-5, "batch_size": 32},
    "top-k": {"lr": 5e-5, "batch_size": 32},
    "bitfit": {"lr": 1e-3, "batch_size": 32},
    "head": {"lr": 1e-2, "batch_size": 32},
    "adapter": {"lr": ADAPTER_LR, "batch_size": ADAPTER_BATCH},
    "adapter-l": {"lr": ADAPTER_LR, "batch_size": ADAPTER_BATCH},
    "prefix": {"lr": PREFIX_LR, "batch_size": PREFIX_BATCH},
    "prompt": {"lr": PROMPT_LR, "batch_size": PROMPT_BATCH},
}


@dataclass
class TrainConfig:
    """One training run. The defaults are lorakit's LoRA recipe for small encoders (README, "The recipe"):
    all-linear targets, r=8, alpha=16, no dropout, lr 1e-3, batch 16, 3 epochs, 6% warmup, linear decay.
    lr and batch_size left None take the method's own recipe (METHOD_RECIPES), e.g. full: lr 5e-5, batch 32.

    model: base model directory (Hugging Face layout) or a bundled model's name (minilm, smollm2); None = minilm.
    task: sst2, rte, wnut17, e2e, or a generic classification, pair-classification, ner, causal-lm.
    data: data directory holding the train and dev files; None = the task's bundled copy.
    out: run directory (adapter/, metrics.jsonl, config.json, curves.png); None = runs/<task>-<method>.
    method: what trains: lora, full, top-k (last top_k blocks + head), bitfit (biases + head), head,
        adapter (AdapterH) / adapter-l (AdapterL) / prefix (PreLayer) / prompt (PreEmbed), each + head.
    targets: LoRA target modules (names, a regex, or all-linear); None (CLI: default) = the architecture's q, v.
    r: LoRA rank.
    alpha: LoRA scaling numerator; the update is scaled by alpha / r.
    dropout: dropout probability on the LoRA input path.
    bias: LoRA bias mode: none, all (every bias trains too, as BitFit), lora_only.
    use_rslora: scale LoRA by alpha / sqrt(r) instead of alpha / r.
    top_k: for method top-k: how many of the last transformer blocks train, beside the head.
    bottleneck: for methods adapter / adapter-l: the adapter's bottleneck size m; 0 = hidden size / 32.
    prefix_length: for methods prefix / prompt: how many trainable virtual tokens.
    extra_trainable: modules trained in full beside the head, e.g. ["pooler"], or globs, e.g. ["*LayerNorm"].
    lr: peak learning rate (AdamW); None = the method's recipe.
    lora_plus_ratio: LoRA+: the B matrices learn at lr * lora_plus_ratio (1 = plain LoRA).
    epochs: passes over the training split (used when max_steps is 0).
    max_steps: optimizer steps to run; 0 = epochs * steps per epoch.
    batch_size: the global batch: examples per forward pass, all processes together; None = the method's recipe.
    eval_batch_size: examples per forward pass at evaluation, per process (each scores its share of dev).
    max_length: longest tokenized sequence; longer ones are truncated.
    warmup_ratio: fraction of the steps with a linear warmup from 0 to lr.
    schedule: learning-rate decay after warmup: linear (to 0), cosine (to 0) or constant.
    weight_decay: AdamW decoupled weight decay on matrices (never on biases and norm weights).
    grad_accum: micro-batches accumulated per optimizer step.
    max_grad_norm: clip the global gradient norm to this value; 0 = no clipping.
    seed: seed of model init, LoRA init, dropout and batch order.
    eval_every: evaluate on dev every N optimizer steps; 0 = at the end of each epoch.
    checkpoint_every: write a resumable checkpoint every N optimizer steps; 0 = never.
    resume: continue from the latest checkpoint in out/checkpoints.
    train_limit: use only the first N training examples; 0 = all.
    dev_limit: use only the first N dev examples; 0 = all.
    threads: torch CPU threads per process; 0 = the cores not busy with other work, shared by local processes.
    device: auto (cuda if available), cpu or cuda.
    precision: fp32, or bf16 (the training forward under torch.autocast; weights, gradients and optimizer stay fp32).
    gradient_checkpointing: recompute each block's activations in backward instead of keeping them (less memory).
    progress: show the progress bar (rank 0 only).
    """

    model: str | None = None
    task: str = "sst2"
    data: str | None = None
    out: str | None = None
    method: str = "lora"
    targets: list[str] | str | None = "all-linear"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    bias: str = "none"
    use_rslora: bool = False
    top_k: int = 2
    bottleneck: int = 0
    prefix_length: int = 10
    extra_trainable: list[str] = field(default_factory=list)
    lr: float | None = None
    lora_plus_ratio: float = 1.0
    epochs: int = 3
    max_steps: int = 0
    batch_size: int | None = None
    eval_batch_size: int = 64
    max_length: int = 128
    warmup_ratio: float = 0.06
    schedule: str = "linear"
    weight_decay: float = 0.0
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    seed: int = 0
    eval_every: int = 0
    checkpoint_every: int = 0
    resume: bool = False
    train_limit: int = 0
    dev_limit: int = 0
    threads: int = 0
    device: str = "auto"
    precision: str = "fp32"
    gradient_checkpointing: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        recipe = METHOD_RECIPES.get(self.method, METHOD_RECIPES["lora"])  # unknown method: validate names it
        for name, value in recipe.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        self.extra_trainable = list(self.extra_trainable or [])
        if isinstance(self.targets, tuple):
            self.targets = list(self.targets)
        if self.out is None:
            self.out = str(Path("runs") / f"{self.task}-{self.method}")
        self.validate()

    def validate(self) -> None:
        """Collect every invalid field and raise one LoraConfigError listing them all."""
        problems = []
        for name in ("r", "top_k", "epochs", "batch_size", "eval_batch_size", "max_length", "grad_accum",
                     "prefix_length"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: expected an integer >= 1")
        for name in ("max_steps", "eval_every", "checkpoint_every", "train_limit", "dev_limit", "threads", "seed",
                     "bottleneck"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}: expected an integer >= 0 (0 = off/default)")
        for name in ("alpha", "lr", "lora_plus_ratio"):
            if not _is_number(getattr(self, name)) or getattr(self, name) <= 0:
                problems.append(f"{name}={getattr(self, name)!r}: expected a number > 0")
        for name in ("weight_decay", "max_grad_norm"):
            if not _is_number(getattr(self, name)) or getattr(self, name) < 0:
                problems.append(f"{name}={getattr(self, name)!r}: expected a number >= 0")
        for name in ("dropout", "warmup_ratio"):
            if not _is_number(getattr(self, name)) or not 0 <= getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)!r}: expected a number in [0, 1)")
        for name, allowed in (("method", METHODS), ("schedule", SCHEDULES), ("device", DEVICES),
                              ("precision", PRECISIONS)):
            if getattr(self, name) not in allowed:
                problems.append(f"{name}={getattr(self, name)!r}: expected one of {', '.join(allowed)}")
        if not isinstance(self.task, str) or not self.task:
            problems.append(f"task={self.task!r}: expected a task name such as sst2")
        if problems:
            raise LoraConfigError("invalid TrainConfig:\n  - " + "\n  - ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        return from_plain_dict(cls, data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))


def field_help() -> dict[str, str]:
    """{field: its one-line description} parsed from TrainConfig's docstring (the CLI's help text)."""
    out = {}
    for line in (TrainConfig.__doc__ or "").splitlines():
        name, sep, text = line.strip().partition(": ")
        if sep and name.isidentifier():
            out[name] = text
    return out


def recipe_line(config: TrainConfig) -> str:
    """One line: the values that shape the optimisation, then which were given; the rest are defaults (the
    field's default, or for lr and batch_size the method's recipe)."""
    names = ["lr", "batch_size", "max_steps" if config.max_steps else "epochs", "warmup_ratio", "schedule",
             "weight_decay", "grad_accum", "max_grad_norm", "seed", "precision"]
    names = {"lora": ["targets", "r", "alpha", "dropout"], "top-k": ["top_k"]}.get(config.method, []) + names
    defaults = {f.name: f.default for f in fields(TrainConfig)} | METHOD_RECIPES.get(config.method, {})
    shown = [f"{n} {_show(getattr(config, n))}" for n in names]
    shown[names.index("batch_size")] += " (global)"
    given = [n for n in names if getattr(config, n) != defaults[n]]
    tail = (f"given: {', '.join(given)}; the rest are {config.method}'s defaults" if given
            else f"all {config.method}'s defaults")
    return f"recipe (method {config.method}): {', '.join(shown)} ({tail})"


def _show(value: Any) -> str:
    if value is None:  # targets
        return "the architecture's q,v"
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


# Fields that may differ between a run and its resumption (they do not change the numbers).
RESUMABLE_CHANGES = ("resume", "progress", "out", "device", "threads", "gradient_checkpointing")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


# `lorakit train --task T` with no other flag: the fields below replace TrainConfig's defaults (which are
# the small-encoder recipe); any flag given on the command line wins. Python's TrainConfig never applies
# them (call `with_recipe`).
# e2e: LoRA on every linear layer of SmolLM2-135M-Instruct, r=8, lr 1e-3 (METHOD_RECIPES), one epoch of
# the train part of valid.txt (4,179 pairs, 523 steps of batch 8: ~40 min at the ~4-5 s/step measured here
# on 2 cores). Other methods keep their own lr (METHOD_RECIPES) at the same batch and budget.
RECIPES: dict[str, dict[str, Any]] = {
    "e2e": {"model": "smollm2", "targets": "all-linear", "r": 8, "alpha": 16.0, "batch_size": 8, "epochs": 1,
            "max_length": 160, "warmup_ratio": 0.06, "eval_every": 200, "eval_batch_size": 32},
}


def with_recipe(values: dict[str, Any], given: set[str]) -> dict[str, Any]:
    """TrainConfig field values with the task's recipe (RECIPES) filled into every field not in `given`."""
    recipe = RECIPES.get(values.get("task", ""), {})
    return {**values, **{k: v for k, v in recipe.items() if k not in given}}
