"""Use a trained run: rebuild base + adapter from a run directory, evaluate it on a dev split, predict texts.

A run directory (`lorakit train --out RUN`) holds `adapter/` and, beside it, `task.json` (task kind, label
list, base model, max_length): together they are enough to rebuild the trained model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from lorakit.errors import AdapterFileError, LoraConfigError
from lorakit.io import load_adapter
from lorakit.train.config import TrainConfig
from lorakit.train.data import DataError, TaskData, encode, load_eval_file, load_task, pad_token_id
from lorakit.train.loop import RUN_INFO, TRAINABLE_FILE
from lorakit.train.methods import STRUCTURAL_METHODS, install_structure, load_trainable_state
from lorakit.train.tasks import evaluate, load_model, load_tokenizer, predict, resolve_model_path


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


def resolve_device(name: str = "cpu") -> torch.device:
    """The torch device for `--device`: cpu, cuda, cuda:N, or auto (cuda if available, else cpu).

    A device this machine does not have is a LoraConfigError naming it, before any model loads.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise LoraConfigError(f"--device {name!r}: not a device; expected cpu, cuda, cuda:N or auto") from None
    if device.type not in ("cpu", "cuda"):
        raise LoraConfigError(f"--device {name!r}: lorakit runs on cpu or cuda; expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LoraConfigError(f"--device {name}: CUDA is not available here (torch {torch.__version__}, "
                                  f"{'built without CUDA' if torch.version.cuda is None else 'no GPU visible'}); "
                                  "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise LoraConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                                  f"numbered from 0; use --device cuda:0")
    return device


def load_trained(adapter_dir: str | Path, model_dir: str | None = None,
                 device: str = "cpu") -> tuple[nn.Module, object, dict]:
    """(model with the trained adapter on `device`, tokenizer, task info); `model_dir` overrides the recorded
    base."""
    dev = resolve_device(device)
    adapter_dir = Path(adapter_dir)
    info = run_info(adapter_dir)
    base = resolve_model_path(model_dir or info.get("model"))
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
    return model.to(dev).eval(), load_tokenizer(base), info


def eval_data(adapter_dir: str | Path, data: str | None = None, task: str | None = None) -> TaskData:
    """What `evaluate_adapter` scores (in .dev; .dev_path says which file): `data` a file (the whole file, its
    format as training detects it) or a directory (its dev split); default the run's own data and task.

    The data's labels must all be in the adapter's label set: a label the head never learned cannot be
    predicted, so it raises DataError before anything runs.
    """
    info = run_info(adapter_dir)
    if data is None and task is None:
        data = info.get("data")
    if data is not None and Path(data).is_file():
        task_data = load_eval_file(task or info["task"], data)
    else:
        task_data = load_task(task or info["task"], data)
    if task_data.kind != info["kind"]:
        raise DataError(f"task {task_data.task!r} is {task_data.kind}, but the adapter was trained for "
                        f"{info['kind']} ({info['task']}); evaluate it on data of its own kind")
    unknown = sorted(set(task_data.labels) - set(info["labels"]))
    if unknown:
        raise DataError(f"labels {unknown} occur in {data or 'the bundled data'} but not in the adapter's label set "
                        f"{info['labels']}; evaluate on data with the labels it was trained on")
    return task_data


def evaluate_adapter(adapter_dir: str | Path, data: str | None = None, task: str | None = None,
                     model_dir: str | None = None, dev_limit: int = 0, batch_size: int = 64, device: str = "cpu",
                     split: TaskData | None = None) -> dict[str, float]:
    """Metrics of a trained adapter on `split`, or on `eval_data(adapter_dir, data, task)` (see there)."""
    split = split if split is not None else eval_data(adapter_dir, data, task)
    model, tokenizer, info = load_trained(adapter_dir, model_dir, device)
    dev = split.dev[:dev_limit or None]
    items = encode(dev, info["kind"], tokenizer, info["labels"], info["max_length"])
    return evaluate(model, info["kind"], items, info["labels"], batch_size, pad_token_id(tokenizer),
                    next(model.parameters()).device)


def predict_texts(adapter_dir: str | Path, texts: list[str], model_dir: str | None = None,
                  device: str = "cpu") -> list[dict]:
    """Predictions of a trained adapter for raw texts (see tasks.predict for the output of each kind)."""
    model, tokenizer, info = load_trained(adapter_dir, model_dir, device)
    return predict(model, tokenizer, info["kind"], info["labels"], texts, info["max_length"], info.get("pairs", False))


__all__ = ["eval_data", "evaluate_adapter", "load_trained", "predict_texts", "resolve_device", "run_info"]
