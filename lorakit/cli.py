"""`lorakit train | eval | predict | merge | inspect | demo`.

`train`'s flags are TrainConfig's fields, one to one (`--max_steps 100` or `--max-steps 100`), with the
field's docstring line as help. Errors lorakit raises on bad input print as one line and exit with 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import MISSING, fields
from typing import get_type_hints

from lorakit.errors import LoraError
from lorakit.train.config import TrainConfig, field_help
from lorakit.train.readers import DataError

DEMO_SENTENCES = ["a gripping , beautifully acted film that stays with you .",
                  "a dull , lifeless mess that never finds its footing .",
                  "the plot is thin , but the performances make it worth seeing ."]
_REGEX_CHARS = re.compile(r"[*+?()\[\]|^$\\]")


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field; the type comes from the annotation, the help from the docstring."""
    hints, helps = get_type_hints(TrainConfig), field_help()
    for f in fields(TrainConfig):
        hint = str(hints[f.name])
        names = [f"--{f.name}"] + ([f"--{f.name.replace('_', '-')}"] if "_" in f.name else [])
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        kwargs: dict = {"dest": f.name, "default": default, "help": f"{helps.get(f.name, '')} (default: {default})"}
        if hints[f.name] is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif hint.startswith("list") or "list[" in hint:
            kwargs["nargs"] = "+"
        elif "int" in hint and "float" not in hint:
            kwargs["type"] = int
        elif "float" in hint:
            kwargs["type"] = float
        parser.add_argument(*names, **kwargs)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """A TrainConfig from parsed `train` flags; `--targets all-linear` or a regex becomes a string spec,
    `--targets default` the architecture's q, v (None)."""
    values = {f.name: getattr(args, f.name) for f in fields(TrainConfig)}
    targets = values["targets"]
    if targets == ["default"]:
        values["targets"] = None
    elif isinstance(targets, list) and len(targets) == 1 and (targets[0] == "all-linear"
                                                              or _REGEX_CHARS.search(targets[0])):
        values["targets"] = targets[0]
    return TrainConfig(**values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", description="LoRA fine-tuning: small, exact, PEFT-compatible.")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_config_flags(sub.add_parser("train", help="train an adapter (or a baseline method) on a task"))
    ev = sub.add_parser("eval", help="evaluate a trained adapter on a dev split")
    ev.add_argument("--adapter", required=True, help="RUN/adapter of a finished `lorakit train` run")
    ev.add_argument("--data", default=None, help="data directory (default: the run's data)")
    ev.add_argument("--task", default=None, help="task name (default: the run's task)")
    ev.add_argument("--model", default=None, help="base model directory (default: the run's base)")
    ev.add_argument("--dev_limit", "--dev-limit", type=int, default=0, help="first N dev examples; 0 = all")
    ev.add_argument("--batch_size", "--batch-size", type=int, default=64)
    pr = sub.add_parser("predict", help="predict raw texts with a trained adapter")
    pr.add_argument("--adapter", required=True, help="RUN/adapter of a finished `lorakit train` run")
    pr.add_argument("--model", default=None, help="base model directory (default: the run's base)")
    pr.add_argument("texts", nargs="+", help="texts; sentence pairs as 'first || second'; NER: words by spaces")
    mg = sub.add_parser("merge", help="export base + LoRA adapter merged, as a plain transformers model")
    mg.add_argument("--adapter", required=True, help="a PEFT-layout adapter directory")
    mg.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    mg.add_argument("--base", "--model", dest="model", default=None,
                    help="base model directory (default: the adapter's base_model_name_or_path)")
    mg.add_argument("--task", default=None, help="causal-lm, seq-cls, token-cls, ... (default: adapter's task_type)")
    ins = sub.add_parser("inspect", help="summarise an adapter directory: config, ranks, |dW| per module")
    ins.add_argument("adapter", help="a PEFT-layout adapter directory")
    from lorakit.serve.flags import add_serve_flags

    add_serve_flags(sub.add_parser("serve", help="OpenAI-compatible server: one base, many adapters per request"))
    dm = sub.add_parser("demo", help="train SST-2 LoRA on the bundled MiniLM with the defaults, then classify")
    dm.add_argument("--out", default="runs/demo")
    dm.add_argument("--max_steps", "--max-steps", type=int, default=0, help="a smaller budget; 0 = the full recipe")
    dm.add_argument("--dev_limit", "--dev-limit", type=int, default=0, help="first N dev sentences; 0 = all 872")
    return parser


def _cmd_train(args: argparse.Namespace) -> None:
    from lorakit.train.loop import train

    train(config_from_args(args))


def _cmd_eval(args: argparse.Namespace) -> None:
    from lorakit.train.inference import evaluate_adapter

    metrics = evaluate_adapter(args.adapter, args.data, args.task, args.model, args.dev_limit, args.batch_size)
    print(json.dumps(metrics))


def _format_prediction(pred: dict, names: dict[str, str] | None = None) -> str:
    if "label" in pred:
        return f"{(names or {}).get(pred['label'], pred['label'])} ({pred['prob']:.3f})"
    if "tags" in pred:
        return " ".join(word if tag == "O" else f"{word}/{tag}" for word, tag in pred["tags"])
    return pred["completion"]


def _cmd_predict(args: argparse.Namespace) -> None:
    from lorakit.train.inference import predict_texts

    for text, pred in zip(args.texts, predict_texts(args.adapter, args.texts, args.model), strict=True):
        print(f"{_format_prediction(pred)}\t{text}")


def _cmd_merge(args: argparse.Namespace) -> None:
    from lorakit.adapter_file import read_adapter
    from lorakit.export import export_merged

    base = args.model or read_adapter(args.adapter).config.base_model_name_or_path
    if not base:
        raise DataError(f"{args.adapter}: the adapter names no base model; pass --base DIR")
    print(export_merged(base, args.adapter, args.out, args.task))


def _cmd_inspect(args: argparse.Namespace) -> None:
    from lorakit.export import inspect_adapter

    print(inspect_adapter(args.adapter))


def _cmd_demo(args: argparse.Namespace) -> None:
    import time

    from lorakit.train.loop import train
    from lorakit.train.tasks import predict

    config = TrainConfig(out=args.out, max_steps=args.max_steps, dev_limit=args.dev_limit)
    budget = (f"{config.epochs} epochs of batch {config.batch_size} (the default recipe)"
              if not config.max_steps else f"{config.max_steps} steps of batch {config.batch_size}, a smaller budget "
              f"than the default recipe's {config.epochs} epochs")
    print(f"lorakit demo: LoRA ({config.targets}, r={config.r}, alpha={config.alpha:g}, lr={config.lr:g}) on the "
          "bundled all-MiniLM-L6-v2, "
          f"SST-2 (6,920 train / 872 dev sentences); {budget}.", flush=True)
    start = time.perf_counter()
    result = train(config)
    print(f"dev accuracy {result.dev['accuracy']:.4f} ({args.dev_limit or 872} sentences); "
          f"wall time {time.perf_counter() - start:.0f} s")
    preds = predict(result.model, result.tokenizer, "classification", ["0", "1"], DEMO_SENTENCES, config.max_length)
    for text, pred in zip(DEMO_SENTENCES, preds, strict=True):
        print(f"  {_format_prediction(pred, {'0': 'negative', '1': 'positive'}):<18} {text}")
    print(f"try: lorakit predict --adapter {result.adapter_dir} \"an utterly charming film .\"")


def _cmd_serve(args: argparse.Namespace) -> None:
    from lorakit.serve.flags import config_from_flags
    from lorakit.serve.server import run

    run(config_from_flags(args))


COMMANDS = {"serve": _cmd_serve, "train": _cmd_train, "eval": _cmd_eval, "predict": _cmd_predict, "merge": _cmd_merge,
            "inspect": _cmd_inspect, "demo": _cmd_demo}


def main(argv: list[str] | None = None) -> int:
    """Run one command; lorakit's own errors (bad config, data, adapter files) print one line, exit 2."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except (LoraError, DataError) as e:
        first, *items = [line.strip() for line in str(e).splitlines() if line.strip()]
        message = " ".join([first, "; ".join(item.removeprefix("- ") for item in items)]).strip()
        print(f"lorakit {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
