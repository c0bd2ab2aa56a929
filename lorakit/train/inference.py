"""Use a trained run: rebuild base + adapter from a run directory, evaluate it on a dev split, predict texts.

A run directory (`lorakit train --out RUN`) holds `adapter/` and, beside it, `task.json` (task kind, label
list, base model, max_length): together they are enough to rebuild the trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from torch import nn

from lorakit.errors import AdapterFileError
from lorakit.io import load_adapter
from lorakit.train.config import TrainConfig
from lorakit.train.data import DataError, encode, load_task, pad_token_id
from lorakit.train.loop import RUN_INFO, TRAINABLE_FILE
from lorakit.train.methods import STRUCTURAL_METHODS, install_structure, load_trainable_state
from lorakit.train.tasks import default_model_path, evaluate, load_model, load_tokenizer, predict


def run_info(adapter_dir: str | Path) -> dict:
    """The task.json beside `adapter_dir` (RUN/adapter -> RUN/task.json)."""
    path = Path(adapter_dir).parent / RUN_INFO
    if not Path(adapter_dir).is_dir():
        raise AdapterFileError(f"adapter {adapter_dir}: no such directory; pass the adapter/ folder of a run "
                               "directory written by `lorakit train --out RUN`")
    if not path.is_file():
        raise AdapterFileError(f"{path}: not found; eval and predict need the task.json that `lorakit train` "
                               "writes beside adapter/ (task kind, labels, base model)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_trained(adapter_dir: str | Path, model_dir: str | None = None) -> tuple[nn.Module, object, dict]:
    """(model with the trained adapter, tokenizer, task info); `model_dir` overrides the recorded base."""
    adapter_dir = Path(adapter_dir)
    info = run_info(adapter_dir)
    base = model_dir or info.get("model") or default_model_path()
    model = load_model(base, info["kind"], info["labels"])
    if (adapter_dir / "adapter_config.json").is_file():
        load_adapter(model, adapter_dir)
    elif (adapter_dir / TRAINABLE_FILE).is_file():
        if info.get("method") in STRUCTURAL_METHODS:  # adapters/prefix/prompt: rebuild their modules first
            install_structure(model, TrainConfig.load(adapter_dir.parent / "config.json"))
        load_trainable_state(model, load_file(str(adapter_dir / TRAINABLE_FILE)))
    else:
        raise AdapterFileError(f"{adapter_dir}: neither adapter_config.json (method lora) nor {TRAINABLE_FILE} "
                               "(other methods); is this the adapter/ folder of a finished run?")
    return model.eval(), load_tokenizer(base), info


def evaluate_adapter(adapter_dir: str | Path, data: str | None = None, task: str | None = None,
                     model_dir: str | None = None, dev_limit: int = 0, batch_size: int = 64) -> dict[str, float]:
    """Dev metrics of a trained adapter on `data` (default: the run's own data, for the run's own task).

    The data's labels must all be in the adapter's label set: a label the head never learned cannot be
    predicted, so it raises DataError before anything runs.
    """
    info = run_info(adapter_dir)
    if data is None and task is None:
        data = info.get("data")
    task_data = load_task(task or info["task"], data)
    if task_data.kind != info["kind"]:
        raise DataError(f"task {task_data.task!r} is {task_data.kind}, but the adapter was trained for "
                        f"{info['kind']} ({info['task']}); evaluate it on data of its own kind")
    unknown = sorted(set(task_data.labels) - set(info["labels"]))
    if unknown:
        raise DataError(f"labels {unknown} occur in {data or 'the bundled data'} but not in the adapter's label set "
                        f"{info['labels']}; evaluate on data with the labels it was trained on")
    model, tokenizer, info = load_trained(adapter_dir, model_dir)
    dev = task_data.dev[:dev_limit or None]
    items = encode(dev, info["kind"], tokenizer, info["labels"], info["max_length"])
    return evaluate(model, info["kind"], items, info["labels"], batch_size, pad_token_id(tokenizer))


def predict_texts(adapter_dir: str | Path, texts: list[str], model_dir: str | None = None) -> list[dict]:
    """Predictions of a trained adapter for raw texts (see tasks.predict for the output of each kind)."""
    model, tokenizer, info = load_trained(adapter_dir, model_dir)
    return predict(model, tokenizer, info["kind"], info["labels"], texts, info["max_length"], info.get("pairs", False))


__all__ = ["evaluate_adapter", "load_trained", "predict_texts", "run_info"]
