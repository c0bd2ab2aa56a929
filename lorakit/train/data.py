"""Training data: load a task's files, validate them before any training, tokenize, batch and collate.

`load_task` picks the files and the reader (`lorakit.train.readers`) for a task name and checks everything
a run would otherwise trip over hours in: missing files, wrong columns, empty splits, malformed lines, dev
labels unseen in train, invalid BIO tags. Every problem is a `DataError` naming the file, the line and the
fix. `encode` turns examples into token ids and label ids, `make_batches` groups indices (deterministic in
(seed, epoch), with little padding) and `collate` pads a batch into tensors.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from lorakit.train.chat import ChatExample, encode_chat, read_chat_jsonl
from lorakit.train.readers import (
    DataError,
    LMExample,
    TextExample,
    TokenExample,
    read_conll,
    read_e2e,
    read_glue_tsv,
    read_jsonl,
    read_label_lines,
)

_DATA_ROOT = Path(__file__).resolve().parent.parent / "data"
_BUNDLED = {"sst2": "sst2", "rte": "rte", "wnut17": "wnut17", "e2e": "e2e"}


@dataclass
class TaskData:
    """A validated task: kind is "classification" | "token_classification" | "causal_lm".

    `labels` is the sorted label list whose index is the class id (for NER the full BIO tag list,
    "O" first); empty for causal LM.
    """

    task: str
    kind: str
    train: list
    dev: list
    labels: list[str]
    dev_path: Path | None = None  # the file the dev split was read from


def bundled_data_dir(task: str) -> Path:
    """The directory of the copy of `task`'s data shipped inside the package (lorakit/data/<task>)."""
    if task not in _BUNDLED:
        raise DataError(f"no bundled data for task {task!r}; bundled tasks are {sorted(_BUNDLED)}. "
                        "Pass a data directory for other tasks.")
    return _DATA_ROOT / _BUNDLED[task]


# ------------------------------------------------------------------------------------------- load_task

# (train glob, dev glob, reader), tried in order; the first layout whose train file exists is used.
_CLASSIFICATION_FILES = [("train.tsv", "dev.tsv", read_glue_tsv), ("*.train", "*.dev", read_label_lines)]
_TASKS = {  # task name -> (kind, file layouts, sentence pairs?)
    "classification": ("classification", _CLASSIFICATION_FILES, False),
    "pair-classification": ("classification", _CLASSIFICATION_FILES, True),
    "ner": ("token_classification", [("*train*.conll", "*dev*.conll", read_conll)], None),
    "causal-lm": ("causal_lm", [("train.jsonl", "dev.jsonl", read_jsonl), ("valid.txt", "test.txt", read_e2e)],
                  None),
    "chat": ("causal_lm", [("train.jsonl", "dev.jsonl", read_chat_jsonl)], None),  # lorakit/train/chat.py
}
_ALIASES = {"sst2": "classification", "rte": "pair-classification", "wnut17": "ner", "e2e": "causal-lm"}
TASKS = sorted(_ALIASES) + sorted(_TASKS)


def load_task(task: str, data_dir: str | Path | None = None) -> TaskData:
    """Read and validate a task's train and dev splits; `data_dir=None` uses the bundled copy.

    Named tasks (sst2, rte, wnut17, e2e) and generic ones (classification, pair-classification, ner,
    causal-lm) find their files in `data_dir` by common names. Task e2e trains on `valid.txt` (the public
    E2E train split is not shipped) minus 10% of its MRs held out as dev (`split_by_mr`); `test.txt` is
    left for `lorakit eval`. The generic causal-lm on the same directory uses test.txt as dev.
    Raises `DataError` before any training for missing files, bad columns, empty splits, malformed lines,
    unseen dev labels, bad BIO tags.
    """
    generic = _ALIASES.get(task, task)
    if generic not in _TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {TASKS}.")
    if data_dir is None:
        if task not in _BUNDLED:
            raise DataError(f"task {task!r} has no bundled data; pass a data directory "
                            f"(bundled tasks: {sorted(_BUNDLED)}).")
        data_dir = bundled_data_dir(task)
    kind, layouts, pairs = _TASKS[generic]
    train_path, dev_path, reader = _find_files(Path(data_dir), task, layouts)
    train, dev = reader(train_path), reader(dev_path)
    for path, split in ((train_path, train), (dev_path, dev)):
        if not split:
            raise DataError(f"{path}: no examples found; the file is empty or holds only blank lines/header.")
    if task == "e2e" and reader is read_e2e:  # the paper's protocol: test.txt is reported once, never tuned on
        train, dev = split_by_mr(train, E2E_DEV_FRACTION)
    if kind == "classification":
        _check_pairs(task, train_path, train, pairs)
        labels = _classification_labels(train_path, train, dev_path, dev)
    elif kind == "token_classification":
        labels = _bio_labels(train_path, train, dev_path, dev)
    else:
        labels = []
    return TaskData(task=task, kind=kind, train=train, dev=dev, labels=labels, dev_path=dev_path)


# Readers for one file, by kind: the first whose suffix the name ends with ("" = any). The suffixes are what
# tells the formats apart in the training layouts too (dev.tsv vs *.dev, dev.jsonl vs test.txt).
_FILE_READERS = {"classification": [(".tsv", read_glue_tsv), ("", read_label_lines)],
                 "token_classification": [("", read_conll)],
                 "causal_lm": [(".jsonl", read_jsonl), ("", read_e2e)]}


def load_eval_file(task: str, path: str | Path) -> TaskData:
    """One data file of `task` as an evaluation split (TaskData.dev; train empty): its format from its name
    (GLUE `.tsv` or label lines; CoNLL; `.jsonl` or E2E), its labels those it holds (a subset suffices)."""
    generic = _ALIASES.get(task, task)
    if generic not in _TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {TASKS}.")
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; pass a data file or a directory holding a dev split.")
    kind, _, pairs = _TASKS[generic]
    reader = next(r for suffix, r in _FILE_READERS[kind] if path.name.endswith(suffix))
    examples = reader(path)
    if not examples:
        raise DataError(f"{path}: no examples found; the file is empty or holds only blank lines/header.")
    if kind == "classification":
        _check_pairs(task, path, examples, pairs)
        labels = _sort_labels({ex.label for ex in examples})
    elif kind == "token_classification":
        types = sorted({tag[2:] for ex in examples for tag in ex.tags if tag != "O"})
        labels = ["O"] + [f"{p}-{t}" for t in types for p in "BI"]
    else:
        labels = []
    return TaskData(task=task, kind=kind, train=[], dev=examples, labels=labels, dev_path=path)


E2E_DEV_FRACTION = 0.1  # task e2e: this share of valid.txt's MRs (all their references) is the dev split


def split_by_mr(examples: list[LMExample], fraction: float, seed: str = "lorakit:e2e-dev"
                ) -> tuple[list[LMExample], list[LMExample]]:
    """(train, dev): round(fraction · #MRs) MRs, drawn by a fixed seed, go to dev with every one of their
    references, so no MR is in both parts; both keep file order."""
    mrs = list(dict.fromkeys(ex.prompt for ex in examples))
    random.Random(seed).shuffle(mrs)
    held = set(mrs[:round(fraction * len(mrs))])
    return [ex for ex in examples if ex.prompt not in held], [ex for ex in examples if ex.prompt in held]


def _find_files(directory: Path, task: str, layouts: list) -> tuple[Path, Path, Callable[[Path], list]]:
    if not directory.is_dir():
        raise DataError(f"data directory {directory} for task {task!r} does not exist or is not a directory.")
    for train_glob, dev_glob, reader in layouts:
        trains = sorted(directory.glob(train_glob))
        if not trains:
            continue
        devs = sorted(directory.glob(dev_glob))
        for split, found, pattern in (("train", trains, train_glob), ("dev", devs, dev_glob)):
            if len(found) != 1:
                what = "no file" if not found else f"{len(found)} files ({', '.join(p.name for p in found)})"
                raise DataError(f"{directory}: {what} matching {pattern!r} for the {split} split of task "
                                f"{task!r}; expected exactly one. Rename or remove files so one matches.")
        return trains[0], devs[0], reader
    looked = "; ".join(f"{t} + {d}" for t, d, _ in layouts)
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise DataError(f"{directory}: no data files for task {task!r}; looked for {looked}. Files present: "
                    f"{present}. Rename the files or pick the task that matches their format.")


def _check_pairs(task: str, path: Path, train: list[TextExample], pairs: bool) -> None:
    has_pair = train[0].text_pair is not None
    if has_pair != pairs:
        want, found = ("sentence pairs", "single sentences") if pairs else ("single sentences", "sentence pairs")
        other = "classification" if has_pair is False else "pair-classification"
        raise DataError(f"{path}: task {task!r} expects {want} but the file holds {found}; "
                        f"use task {other!r} for this data.")


def _sort_labels(labels: set[str]) -> list[str]:
    """Numeric labels in numeric order ("2" before "10"), others alphabetically: ids are reproducible."""
    if all(re.fullmatch(r"-?\d+", s) for s in labels):
        return sorted(labels, key=int)
    return sorted(labels)


def _classification_labels(train_path: Path, train: list[TextExample], dev_path: Path,
                           dev: list[TextExample]) -> list[str]:
    labels = _sort_labels({ex.label for ex in train})
    if len(labels) < 2:
        raise DataError(f"{train_path}: only one label ({labels[0]!r}) in the training split; classification "
                        "needs at least two. Check the label column.")
    known = set(labels)
    for ex in dev:
        if ex.label not in known:
            raise DataError(f"{dev_path}:{ex.line}: label {ex.label!r} never occurs in the training file "
                            f"{train_path} (train labels: {labels}); fix the label or add training examples.")
    return labels


def _bio_labels(train_path: Path, train: list[TokenExample], dev_path: Path,
                dev: list[TokenExample]) -> list[str]:
    """The full BIO tag list: "O", then B-/I- for every entity type seen in train, types sorted."""
    types = sorted({tag[2:] for ex in train for tag in ex.tags if tag != "O"})
    if not types:
        raise DataError(f"{train_path}: every tag is 'O'; token classification needs entity tags (B-/I-).")
    for ex in dev:
        for i, tag in enumerate(ex.tags):
            if tag != "O" and tag[2:] not in types:
                raise DataError(f"{dev_path}:{ex.line + i}: entity type {tag[2:]!r} (tag {tag!r}) never occurs "
                                f"in the training file {train_path} (train types: {types}); fix the tag or add "
                                "training examples of that type.")
    return ["O"] + [f"{p}-{t}" for t in types for p in "BI"]


# ---------------------------------------------------------------------------------------- tokenization

LM_SEPARATOR = " ||"  # causal LM: ids = tok(prompt + LM_SEPARATOR) + tok(" " + completion) + [eos]
IGNORE_INDEX = -100  # label value that torch's cross-entropy (and HF models) skip


def pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id; GPT-2 has none, so its eos doubles as padding (masked out anyway)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tokenizer, name, None)
        if value is not None:
            return int(value)
    raise DataError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an eos token; "
                    "set tokenizer.pad_token before training.")


def encode(examples: list, kind: str, tokenizer, labels: list[str], max_length: int) -> list[dict]:
    """Tokenize one split into items of python lists: input_ids, attention_mask, [token_type_ids], labels.

    classification:       labels = class id (index into `labels`).
    token_classification: labels[t] = tag id of word w if t is the FIRST subword of w, else -100
                          (special tokens, later subwords); words cut by truncation get no label.
    causal_lm:            ids = prompt + LM_SEPARATOR + " " + completion + eos; labels = -100 on the
                          prompt part and the ids themselves on completion + eos, so the loss (HF models
                          shift labels by one) is on the completion only.
    chat (ChatExample):   the chat template; labels on assistant answers only (lorakit.train.chat).
    Sequences longer than `max_length` tokens are truncated (chat: the prompt, never the answer).
    """
    if not examples:
        return []
    if kind == "classification":
        return _encode_classification(examples, tokenizer, labels, max_length)
    if kind == "token_classification":
        return _encode_tokens(examples, tokenizer, labels, max_length)
    if kind == "causal_lm" and isinstance(examples[0], ChatExample):
        return encode_chat(examples, tokenizer, max_length)
    if kind == "causal_lm":
        return _encode_lm(examples, tokenizer, max_length)
    raise DataError(f"unknown kind {kind!r}; expected 'classification', 'token_classification' or 'causal_lm'.")


def _label_ids(labels: list[str], label: str, ex) -> int:
    try:
        return labels.index(label)
    except ValueError:
        raise DataError(f"line {ex.line}: label {label!r} is not in the label list {labels}; "
                        "encode with the labels of the TaskData the examples came from.") from None


def _items(enc, n: int) -> list[dict]:
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc]
    return [{k: list(enc[k][i]) for k in keys} for i in range(n)]


def _encode_classification(examples, tokenizer, labels, max_length) -> list[dict]:
    pairs = [ex.text_pair for ex in examples]
    enc = tokenizer([ex.text for ex in examples], pairs if pairs[0] is not None else None,
                    truncation=True, max_length=max_length)
    items = _items(enc, len(examples))
    for item, ex in zip(items, examples, strict=True):
        item["labels"] = _label_ids(labels, ex.label, ex)
    return items


def _encode_tokens(examples, tokenizer, labels, max_length) -> list[dict]:
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"token classification needs a fast tokenizer (for word_ids()); got "
                        f"{type(tokenizer).__name__}. Load it with AutoTokenizer.from_pretrained(..., use_fast=True).")
    words = [list(ex.tokens) for ex in examples]
    kwargs = {"is_split_into_words": True, "truncation": True, "max_length": max_length}
    enc = tokenizer(words, **kwargs)
    if any([_unk_empty_words(tokenizer, words[i], enc.word_ids(i)) for i in range(len(words))]):
        enc = tokenizer(words, **kwargs)
    items = _items(enc, len(examples))
    for i, (item, ex) in enumerate(zip(items, examples, strict=True)):
        tag_ids = [_label_ids(labels, tag, ex) for tag in ex.tags]
        out, prev = [], None
        for w in enc.word_ids(i):  # None for [CLS]/[SEP]; a word's subwords are consecutive
            out.append(IGNORE_INDEX if w is None or w == prev else tag_ids[w])
            prev = w
        item["labels"] = out
    return items


def _unk_empty_words(tokenizer, words: list[str], word_ids: list) -> bool:
    """Replace (in place) words the tokenizer maps to no token by its unk token; True if any was.

    WNUT-17 has lone U+FE0F variation selectors, which BERT's normalizer deletes: such a word would lose
    its label and silently drop out of evaluation. Words cut by truncation still tokenize and are kept.
    """
    seen = set(word_ids)
    changed = False
    for w, word in enumerate(words):
        if w not in seen and tokenizer.unk_token is not None and not tokenizer.tokenize(word):
            words[w] = tokenizer.unk_token
            changed = True
    return changed


def _encode_lm(examples, tokenizer, max_length) -> list[dict]:
    eos = getattr(tokenizer, "eos_token_id", None)
    eos = eos if eos is not None else getattr(tokenizer, "sep_token_id", None)
    if eos is None:
        raise DataError(f"tokenizer {type(tokenizer).__name__} has no eos (or sep) token to end completions; "
                        "set tokenizer.eos_token.")
    prompts = tokenizer([ex.prompt + LM_SEPARATOR for ex in examples], add_special_tokens=False)["input_ids"]
    comps = tokenizer([" " + ex.completion for ex in examples], add_special_tokens=False)["input_ids"]
    items = []
    for ex, p, c in zip(examples, prompts, comps, strict=True):
        ids = (list(p) + list(c) + [eos])[:max_length]
        labels = ([IGNORE_INDEX] * len(p) + list(c) + [eos])[:max_length]
        if len(p) >= max_length:
            raise DataError(f"line {ex.line}: the prompt alone is {len(p)} tokens, max_length is {max_length}: "
                            "no completion token would be trained on. Raise max_length or shorten the prompt.")
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return items


# -------------------------------------------------------------------------------------------- batching

def make_batches(n_items: int, lengths: list[int], batch_size: int, seed: int, epoch: int,
                 shuffle: bool = True, sort_by_length: bool = True) -> list[list[int]]:
    """Split indices 0..n_items-1 into batches; every index appears exactly once.

    Deterministic in (seed, epoch): shuffle the indices, sort by `lengths` within chunks of 50 batches
    (so a batch holds similar lengths and pads little), then shuffle the batch order (so the order of
    lengths seen in training stays random). Without `shuffle` the index order is kept (evaluation).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if sort_by_length and len(lengths) != n_items:
        raise ValueError(f"lengths has {len(lengths)} entries but n_items is {n_items}; pass one length per item.")
    rng = random.Random(f"lorakit:{seed}:{epoch}")  # str seeds hash with sha512: same on every run/platform
    order = list(range(n_items))
    if shuffle:
        rng.shuffle(order)
    if sort_by_length:
        chunk = 50 * batch_size
        order = [i for s in range(0, n_items, chunk) for i in sorted(order[s:s + chunk], key=lengths.__getitem__)]
    batches = [order[s:s + batch_size] for s in range(0, n_items, batch_size)]
    if shuffle:
        rng.shuffle(batches)
    return batches


_PAD_VALUE = {"input_ids": None, "attention_mask": 0, "token_type_ids": 0, "labels": IGNORE_INDEX}


def collate(items: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad a batch on the right to its longest sequence: (batch, seq) int64 tensors; int labels -> (batch,).

    input_ids are padded with `pad_id`, attention_mask/token_type_ids with 0, per-token labels with -100.
    """
    if not items:
        raise ValueError("collate got an empty batch.")
    out = {}
    for key, first in items[0].items():
        values = [item[key] for item in items]
        if not isinstance(first, list):
            out[key] = torch.tensor(values, dtype=torch.long)
            continue
        if key not in _PAD_VALUE:
            raise ValueError(f"collate cannot pad key {key!r}; known keys are {sorted(_PAD_VALUE)}.")
        fill = pad_id if key == "input_ids" else _PAD_VALUE[key]
        width = max(len(v) for v in values)
        out[key] = torch.tensor([v + [fill] * (width - len(v)) for v in values], dtype=torch.long)
    return out


__all__ = ["DataError", "TextExample", "TokenExample", "LMExample", "TaskData", "TASKS", "bundled_data_dir",
           "load_eval_file", "load_task", "read_glue_tsv", "read_label_lines", "read_conll", "read_jsonl", "read_e2e",
           "encode", "make_batches", "collate", "pad_token_id", "split_by_mr", "E2E_DEV_FRACTION", "LM_SEPARATOR",
           "IGNORE_INDEX"]
