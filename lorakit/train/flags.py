"""`lorakit train` flags: one per TrainConfig field, plus the Hugging Face / PEFT spellings that mean the same.

Kept apart from the CLI's commands (as serve/flags.py is for `lorakit serve`) and free of heavy imports.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from dataclasses import MISSING, fields
from typing import get_type_hints

from lorakit.errors import LoraConfigError
from lorakit.train.config import METHOD_RECIPES, TrainConfig, field_help, with_recipe

_REGEX_CHARS = re.compile(r"[*+?()\[\]|^$\\]")

# Other spellings of TrainConfig fields that mean exactly the same: Hugging Face TrainingArguments' and
# PEFT LoraConfig's (as in HF's example scripts). `--learning_rate 2e-4` is `--lr 2e-4`.
TRAIN_ALIASES = {
    "model": ["model_name_or_path"],
    "out": ["output_dir"],
    "lr": ["learning_rate"],
    "epochs": ["num_train_epochs"],
    "grad_accum": ["gradient_accumulation_steps"],
    "eval_batch_size": ["per_device_eval_batch_size"],  # evaluation is per process: each rank scores its share
    "eval_every": ["eval_steps"],
    "checkpoint_every": ["save_steps"],
    "alpha": ["lora_alpha"],
    "dropout": ["lora_dropout"],
    "targets": ["target_modules"],
}
# HF's lr_scheduler_type values that have a lorakit schedule (HF's "constant" skips the warmup: no match).
HF_SCHEDULES = {"linear": "linear", "cosine": "cosine", "constant_with_warmup": "constant"}


def _int(text: str) -> int:
    """An integer flag value; "3.0" (HF's float num_train_epochs) is accepted as 3, "2.5" is not."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r}: expected a whole number")
    return int(value)


def _hf_schedule(text: str) -> str:
    if text not in HF_SCHEDULES:
        raise argparse.ArgumentTypeError(
            f"{text!r}: lorakit has {', '.join(HF_SCHEDULES)} (constant_with_warmup = --schedule constant); for "
            "HF's 'constant' (no warmup) use --schedule constant --warmup_ratio 0")
    return HF_SCHEDULES[text]


def _hf_warmup(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: lorakit's warmup is a fraction of the steps; pass a value in [0, 1) "
                                         "(as HF's warmup_steps < 1 or --warmup_ratio)")
    return value


def _flag_help(name: str, text: str, default) -> str:
    if name in ("lr", "batch_size"):
        recipes = ", ".join(f"{m} {r[name]:g}" for m, r in METHOD_RECIPES.items())
        return f"{text} (default: the method's recipe: {recipes})"
    return f"{text} (default: {default})"


def add_train_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (+ its TRAIN_ALIASES); the type comes from the annotation, the help from
    the docstring."""
    hints, helps = get_type_hints(TrainConfig), field_help()
    for f in fields(TrainConfig):
        hint = str(hints[f.name])
        spellings = [f.name, *TRAIN_ALIASES.get(f.name, [])]
        names = [f"--{n}" for n in spellings] + [f"--{n.replace('_', '-')}" for n in spellings if "_" in n]
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict = {"dest": f.name, "default": default, "help": _flag_help(f.name, helps.get(f.name, ""), default)}
        if hints[f.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif hint.startswith("list") or "list[" in hint:
            kwargs["nargs"] = "+"
        elif "int" in hint and "float" not in hint:
            kwargs["type"] = _int
        elif "float" in hint:
            kwargs["type"] = float
        parser.add_argument(*names, **kwargs)
    _add_hf_flags(parser)


def _add_hf_flags(parser: argparse.ArgumentParser) -> None:
    """HF TrainingArguments flags that map onto a TrainConfig field with a conversion."""
    hf = parser.add_argument_group("Hugging Face TrainingArguments spellings")
    hf.add_argument("--per_device_train_batch_size", "--per-device-train-batch-size", type=_int, default=None,
                    help="HF's per-process batch N: sets the global --batch_size to N x the number of processes "
                         "(WORLD_SIZE, 1 without torchrun); --grad_accum still multiplies it per optimizer step")
    hf.add_argument("--lr_scheduler_type", "--lr-scheduler-type", dest="schedule", type=_hf_schedule,
                    default=argparse.SUPPRESS, help="linear, cosine or constant_with_warmup (= --schedule constant)")
    hf.add_argument("--warmup_steps", "--warmup-steps", dest="warmup_ratio", type=_hf_warmup, default=argparse.SUPPRESS,
                    help="HF 5's warmup: a fraction of the steps below 1 (= --warmup_ratio); a step count is refused")
    hf.add_argument("--bf16", dest="precision", action="store_const", const="bf16", default=argparse.SUPPRESS,
                    help="= --precision bf16")
    hf.add_argument("--use_cpu", "--use-cpu", dest="device", action="store_const", const="cpu",
                    default=argparse.SUPPRESS, help="= --device cpu")


def given_fields(argv: list[str]) -> set[str]:
    """The TrainConfig fields set explicitly on a `train` command line (argv after the word `train`)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_train_flags(parser)
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(parser.parse_known_args(argv)[0]))
    return given | ({"batch_size"} if "per_device_train_batch_size" in given else set())


def config_from_args(args: argparse.Namespace, given: set[str] | None = None) -> TrainConfig:
    """A TrainConfig from parsed `train` flags; `--targets all-linear` or a regex becomes a string spec,
    `--targets default` the architecture's q, v (None). With `given` (the flags on the command line), the
    task's recipe (train.config.RECIPES, e.g. e2e on SmolLM2) fills every field not given."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    if given is not None:
        values = with_recipe(values, given)
    per_device = getattr(args, "per_device_train_batch_size", None)
    if per_device is not None:
        if values["batch_size"] is not None:
            raise LoraConfigError(f"--batch_size {values['batch_size']} and --per_device_train_batch_size "
                                  f"{per_device} both given; pass one (--batch_size is the global batch)")
        values["batch_size"] = per_device * int(os.environ.get("WORLD_SIZE", "1"))
    targets = values["targets"]
    if targets == ["default"]:
        values["targets"] = None
    elif isinstance(targets, list) and len(targets) == 1 and (targets[0] == "all-linear"
                                                              or _REGEX_CHARS.search(targets[0])):
        values["targets"] = targets[0]
    return TrainConfig(**values)
