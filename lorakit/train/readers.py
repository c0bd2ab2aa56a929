"""Readers for the four on-disk training formats, each returning plain dataclasses.

    GLUE tsv      header row; `sentence` or `sentence1`/`sentence2`, and `label`     -> TextExample
    label lines   `<label> <sentence>` per line (SST-2 `stsa.binary.*`)               -> TextExample
    CoNLL         `token<TAB>tag` per line, blank line between sentences (BIO tags)   -> TokenExample
    jsonl / E2E   `{"prompt": .., "completion": ..}` per line, or `MR||reference`      -> LMExample

Every malformed line is a `DataError` naming file:line and the fix. `lorakit.train.data` is the public
face (task loading, validation, tokenization, batching) and re-exports all of these.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.errors import LoraError


class DataError(LoraError, ValueError):
    """A data file is missing or malformed; the message names the file, the line and the fix."""


@dataclass
class TextExample:
    """One (pair) classification example; `line` is the 1-based source line (0 = unknown)."""

    text: str
    text_pair: str | None
    label: str
    line: int = field(default=0, compare=False, repr=False)


@dataclass
class TokenExample:
    """One sentence for token classification: words and their BIO tags, same length."""

    tokens: list[str]
    tags: list[str]
    line: int = field(default=0, compare=False, repr=False)


@dataclass
class LMExample:
    """One causal-LM example: the loss is on `completion` only, conditioned on `prompt`."""

    prompt: str
    completion: str
    line: int = field(default=0, compare=False, repr=False)



_TEXT_COLUMNS = [("sentence1", "sentence2"), ("question1", "question2"), ("question", "sentence"),
                 ("premise", "hypothesis"), ("sentence", None), ("text", None)]


def _open(path: Path):
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path or the data directory.")
    return open(path, encoding="utf-8-sig", newline="")  # -sig: a BOM must not rename column 1


def _text_lines(path: Path):
    """(line number, line without its newline) for every non-blank line of a text file."""
    with _open(path) as f:
        for n, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if line.strip():
                yield n, line


def read_glue_tsv(path: str | Path) -> list[TextExample]:
    """Read a GLUE-style tsv with a header; text columns are auto-detected (see `_TEXT_COLUMNS`).

    Parsed with `csv.QUOTE_NONE`: RTE has fields that begin with a `"`, and default quoting would
    merge rows. Fields are stripped (GLUE SST-2 sentences end with a space). Blank lines are skipped.
    """
    path = Path(path)
    with _open(path) as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [h.strip() for h in next(reader, [])]
        cols = _pick_columns(path, header)
        out = []
        for row in reader:
            if not row or row == [""]:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{reader.line_num}: found {len(row)} tab-separated fields, expected "
                                f"{len(header)} as in the header {header}; fix or remove that line.")
            values = [row[i].strip() for i in cols]
            text, pair, label = values[0], (values[1] if len(cols) == 3 else None), values[-1]
            for name, value in zip(("text", "text_pair", "label"), (text, pair, label), strict=True):
                if value == "":
                    raise DataError(f"{path}:{reader.line_num}: empty {name} field; fill it or remove "
                                    "that line.")
            out.append(TextExample(text, pair, label, line=reader.line_num))
    return out


def _pick_columns(path: Path, header: list[str]) -> list[int]:
    """Indices of (text[, text_pair], label) in the header, or a DataError listing what was found."""
    expected = " or ".join("/".join(c for c in pair if c) for pair in _TEXT_COLUMNS)
    if "label" not in header:
        raise DataError(f"{path}:1: header has columns {header} but no 'label' column; expected a header "
                        f"with 'label' and {expected} (tab-separated). Test splits without labels cannot be "
                        "used for training or evaluation.")
    for first, second in _TEXT_COLUMNS:
        if first in header and (second is None or second in header):
            names = [first] + ([second] if second else []) + ["label"]
            return [header.index(n) for n in names]
    raise DataError(f"{path}:1: header has columns {header}; expected text columns {expected} "
                    "next to 'label'. Rename the header columns.")


def read_label_lines(path: str | Path) -> list[TextExample]:
    """Read `<label> <sentence>` lines (SST-2 `stsa.binary.*`); the label is the first space-separated token."""
    path = Path(path)
    out = []
    for n, line in _text_lines(path):
        label, _, text = line.partition(" ")
        if not label or not text.strip():
            raise DataError(f"{path}:{n}: expected '<label> <sentence>', got {line[:60]!r}; "
                            "put the label, one space, then the text.")
        out.append(TextExample(text.strip(), None, label, line=n))
    return out


_BIO = re.compile(r"^(O|[BI]-\S+)$")


def read_conll(path: str | Path) -> list[TokenExample]:
    """Read CoNLL `token<TAB>tag` lines, sentences separated by blank (or whitespace-only) lines.

    Without a tab the line is split on whitespace (CoNLL-2003 style: token first, tag last).
    `-DOCSTART-` lines are skipped. Tags must be BIO: `O`, `B-<type>` or `I-<type>`.
    """
    path = Path(path)
    out: list[TokenExample] = []
    tokens: list[str] = []
    tags: list[str] = []
    start = 0
    with _open(path) as f:
        for n, raw in enumerate(f, start=1):
            line = raw.rstrip("\r\n")
            if not line.strip() or line.startswith("-DOCSTART-"):
                if tokens:
                    out.append(TokenExample(tokens, tags, line=start))
                tokens, tags = [], []
                continue
            parts = line.split("\t") if "\t" in line else line.split()
            token, tag = parts[0].strip(), parts[-1].strip()
            if len(parts) < 2 or not token:
                raise DataError(f"{path}:{n}: expected 'token<TAB>tag', got {line[:60]!r}; "
                                "use one token and its tag per line and a blank line between sentences.")
            if not _BIO.match(tag):
                raise DataError(f"{path}:{n}: tag {tag!r} is not a BIO tag; expected 'O', 'B-<type>' or "
                                "'I-<type>' (convert IOBES/IO tags to BIO first).")
            if not tokens:
                start = n
            tokens.append(token)
            tags.append(tag)
    if tokens:
        out.append(TokenExample(tokens, tags, line=start))
    return out


def jsonl_objects(path: str | Path, expected: str = "") -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) for every non-blank line; a line that is not JSON is a DataError naming
    file:line (and `expected`, a hint of the format)."""
    path = Path(path)
    for n, line in _text_lines(path):
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: invalid JSON ({e.msg}, column {e.colno}){expected}.") from None


def read_jsonl(path: str | Path) -> list[LMExample]:
    """Read causal-LM jsonl: one object per line with string fields "prompt" and "completion"."""
    path = Path(path)
    out = []
    for n, obj in jsonl_objects(path, '; expected {"prompt": "...", "completion": "..."}'):
        if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in ("prompt", "completion")):
            found = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
            raise DataError(f"{path}:{n}: expected an object with string fields 'prompt' and "
                            f"'completion', found {found}; rename or add those fields.")
        if not obj["completion"].strip():
            raise DataError(f"{path}:{n}: empty 'completion'; there is nothing to learn from that line.")
        out.append(LMExample(obj["prompt"], obj["completion"], line=n))
    return out


def read_e2e(path: str | Path) -> list[LMExample]:
    """Read E2E `MR||reference` lines (the LoRA repo's format); prompt = MR, completion = reference, stripped."""
    path = Path(path)
    out = []
    for n, line in _text_lines(path):
        parts = line.split("||")
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise DataError(f"{path}:{n}: expected 'MR||reference' with exactly one '||' and both sides "
                            f"non-empty, got {line[:60]!r}.")
        out.append(LMExample(parts[0].strip(), parts[1].strip(), line=n))
    return out
