"""Merged export (base + adapter -> a plain transformers checkpoint) and a readable summary of an adapter file.

    export_merged("models/minilm", "out/sst2", "out/sst2-merged")   # AutoModel*.from_pretrained loads it
    print(inspect_adapter("out/sst2"))                               # config, ranks, ‖ΔW‖_F per module

Backs the CLI's `lorakit merge` and `lorakit inspect`; transformers is imported only here, lazily.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

from torch import Tensor

from .adapter_file import CONFIG_NAME, WEIGHTS_NAME, AdapterFile, read_adapter
from .adapters import merge_and_unload
from .errors import AdapterFileError, LoraConfigError
from .io import _fsync_dir, load_adapter

TASKS = {"causal-lm": "AutoModelForCausalLM", "seq-cls": "AutoModelForSequenceClassification",
         "token-cls": "AutoModelForTokenClassification", "seq2seq-lm": "AutoModelForSeq2SeqLM",
         "question-answering": "AutoModelForQuestionAnswering", "feature-extraction": "AutoModel"}
PEFT_TASKS = {"CAUSAL_LM": "causal-lm", "SEQ_CLS": "seq-cls", "TOKEN_CLS": "token-cls",
              "SEQ_2_SEQ_LM": "seq2seq-lm", "QUESTION_ANS": "question-answering",
              "FEATURE_EXTRACTION": "feature-extraction"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "vocab.json",
                   "merges.txt", "added_tokens.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
                   "chat_template.jinja", "chat_template.json", "preprocessor_config.json")


def model_class(base_dir: str | Path, task: str | None, adapter: AdapterFile) -> type:
    """The transformers class to load the base with: `task`, else the adapter's task_type, else `architectures`."""
    import transformers

    if task is None and adapter.config.task_type:
        task = PEFT_TASKS.get(adapter.config.task_type)
    if task is not None:
        if task not in TASKS:
            raise LoraConfigError(f"task={task!r}: expected one of {sorted(TASKS)}")
        return getattr(transformers, TASKS[task])
    archs = json.loads((Path(base_dir) / "config.json").read_text()).get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs and isinstance(archs[0], str) else None
    return cls if isinstance(cls, type) else transformers.AutoModel


def _num_labels(adapter: AdapterFile) -> int | None:
    # A classification head trained as modules_to_save fixes the label count: weight (num_labels, hidden).
    for key, t in adapter.other.items():
        parts = key.split(".")
        if parts[-1] == "weight" and parts[-2:-1] in (["classifier"], ["score"], ["out_proj"]) and t.dim() == 2:
            return int(t.shape[0])
    return None


def export_merged(base_dir: str | Path, adapter_dir: str | Path, out_dir: str | Path,
                  task: str | None = None) -> Path:
    """Write base + adapter, merged (W = W0 + s·B·A), as a standard transformers checkpoint in `out_dir`.

    The result (config, safetensors weights, the base's tokenizer files) loads with
    `AutoModel*.from_pretrained(out_dir)` without lorakit and computes what base + adapter computed.
    `task` ("causal-lm", "seq-cls", ...) picks the head; by default the adapter's task_type, else the
    base's `architectures`. Written atomically: `out_dir` must not exist or be empty.
    """
    base_dir, out_dir = Path(base_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AdapterFileError(f"{out_dir}: exists and is not empty; pick a new output directory")
    if not (base_dir / "config.json").is_file():
        raise AdapterFileError(f"{base_dir}: no config.json; expected a transformers model directory")
    adapter = read_adapter(adapter_dir)
    cls = model_class(base_dir, task, adapter)
    kwargs = {}
    if cls.__name__.endswith(("SequenceClassification", "TokenClassification")) and _num_labels(adapter):
        kwargs["num_labels"] = _num_labels(adapter)
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # a fresh head is expected to be "newly initialized": the adapter brings it
    try:
        model = cls.from_pretrained(base_dir, **kwargs).eval()
    finally:
        logging.set_verbosity(verbosity)
    load_adapter(model, adapter.path)
    merge_and_unload(model)  # unties a merged weight that was tied (e.g. the embedding and the LM head)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp)
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy2(base_dir / name, tmp / name)
        if out_dir.exists():
            out_dir.rmdir()  # empty, checked above
        os.replace(tmp, out_dir)
        _fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


# -- inspect ---------------------------------------------------------------------------------------------------
def delta_norm(A: Tensor, B: Tensor, scale: float) -> float:
    """‖s·B·A‖_F from the factors: s·√(Σ (BᵀB) ∘ (AAᵀ)), never forming the (out, in) matrix."""
    a, b = A.detach().double().reshape(A.shape[0], -1), B.detach().double().reshape(B.shape[0], -1)
    return abs(scale) * math.sqrt(max(float(((b.t() @ b) * (a @ a.t())).sum()), 0.0))


def inspect_adapter(adapter_dir: str | Path) -> str:
    """A printable summary of an adapter directory: config, target modules, ranks, sizes and ‖ΔW‖_F per module.

    Validates the files as `load_adapter` does (without a model) and raises AdapterFileError on a bad one.
    """
    a = read_adapter(adapter_dir)
    c = a.config
    root = math.sqrt if c.use_rslora else float
    lora_values = sum(A.numel() + B.numel() for A, B, _ in a.lora.values())
    other_values = sum(t.numel() for t in a.other.values())
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for A, B, _ in a.lora.values() for t in (A, B)}
                    | {str(t.dtype).removeprefix("torch.") for t in a.other.values()})
    lines = [
        f"adapter        {a.path}",
        f"files          {CONFIG_NAME}, {WEIGHTS_NAME} ({a.size:,} bytes, {a.size / 2**20:.2f} MiB; {dtypes})",
        f"peft_type      LORA   task_type {c.task_type}   base model {c.base_model_name_or_path}",
        f"r {c.r}   alpha {c.alpha:g}   dropout {c.dropout:g}   rslora {c.use_rslora}   bias {c.bias}   "
        f"init {a.peft.get('init_lora_weights')}",
        f"target_modules {c.targets}" + (f"   exclude {c.exclude}" if c.exclude else ""),
        f"modules_to_save {c.modules_to_save or None}",
    ]
    if c.rank_pattern or c.alpha_pattern:
        lines.append(f"rank_pattern {c.rank_pattern}   alpha_pattern {c.alpha_pattern}")
    lines += [f"trainable values {lora_values + other_values:,} (LoRA {lora_values:,}; modules_to_save and biases "
              f"{other_values:,}) in {len(a.lora)} LoRA modules", "",
              f"{'module':<56}{'kind':>7}{'r':>5}{'out x in':>14}{'scale':>9}{'|dW|_F':>12}"]
    for module, (A, B, emb) in sorted(a.lora.items()):
        r = A.shape[0]
        if c.rank_for(module) != r:
            raise AdapterFileError(f"{a.path / WEIGHTS_NAME}: {module}: rank {r}, but the config (r / rank_pattern) "
                                   f"says {c.rank_for(module)}; the config and weights disagree")
        scale = c.alpha_for(module) / root(r)
        out, inp = (A.shape[1], B.shape[0]) if emb else (B.shape[0], math.prod(A.shape[1:]))
        kind = "embed" if emb else "conv" if A.dim() > 2 else "linear"
        name = module if len(module) <= 55 else "…" + module[-54:]
        lines.append(f"{name:<56}{kind:>7}{r:>5}{f'{out}x{inp}':>14}{scale:>9.4g}{delta_norm(A, B, scale):>12.4g}")
    for key, t in sorted(a.other.items()):
        lines.append(f"{key:<56}{'full':>7}{'':>5}{'x'.join(map(str, t.shape)):>14}")
    return "\n".join(lines)


__all__ = ["delta_norm", "export_merged", "inspect_adapter", "model_class"]
