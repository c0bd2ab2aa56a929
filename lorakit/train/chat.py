"""Chat / instruction data: read it, render it with the model's chat template, train on the answers only.

    jsonl, one conversation per line, either
      {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}   (OpenAI chat format)
      {"prompt": "...", "completion": "..."}          (= one user message and one assistant answer)

Every assistant message is a target: its tokens after the template's assistant header, up to and
including the end-of-turn token (eos), get labels; everything else (system, user, headers) is -100.
The last message must be the assistant's (that is what the example teaches). A conversation longer
than max_length loses tokens from its start (the prompt), never from its last answer; the number of
conversations cut is reported.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from lorakit.train.readers import DataError, jsonl_objects

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant")


@dataclass
class ChatExample:
    """One conversation; `line` is its 1-based line in the jsonl file."""

    messages: list[dict[str, str]]
    line: int = field(default=0, compare=False, repr=False)


def _messages(obj, where: str) -> list[dict[str, str]]:
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("completion"), str):
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if not isinstance(msgs, list) or not msgs:
        raise DataError(f"{where}: expected {{\"messages\": [...]}} or {{\"prompt\": .., \"completion\": ..}}, found "
                        f"{sorted(obj) if isinstance(obj, dict) else type(obj).__name__}; rename or add those fields.")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} is {str(m)[:60]!r}; each message needs a role in {ROLES} and a "
                            "string content.")
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant answer (the one to learn); "
                        f"found role {msgs[-1]['role']!r}.")
    return [{"role": m["role"], "content": m["content"]} for m in msgs]


def read_chat_jsonl(path: str | Path) -> list[ChatExample]:
    """Read chat jsonl (see the module docstring); every bad line is a DataError naming file:line."""
    path = Path(path)
    return [ChatExample(_messages(obj, f"{path}:{n}"), line=n) for n, obj in jsonl_objects(path)]


def _ids(tokenizer, messages: list[dict], generation_prompt: bool = False) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_spans(tokenizer, messages: list[dict]) -> tuple[list[int], list[tuple[int, int]]]:
    """(ids of the whole conversation, [start, end) of every assistant answer in them).

    Renders each prefix of the conversation: an answer spans from the end of `messages[:i]` + the
    assistant header to the eos closing `messages[:i+1]`. Raises DataError if the template does not
    render turn by turn (a prefix's tokens are not a prefix of the whole), as then no clean mask exists.
    """
    ids = _ids(tokenizer, messages)
    eos = tokenizer.eos_token_id
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        head, upto = _ids(tokenizer, messages[:i], generation_prompt=True), _ids(tokenizer, messages[:i + 1])
        if ids[:len(head)] != head or ids[:len(upto)] != upto or len(upto) <= len(head):
            raise DataError(f"the chat template of {type(tokenizer).__name__} does not render turn by turn, so the "
                            "assistant tokens cannot be located; use a template that renders each message in turn")
        end = len(upto)
        if eos in upto[len(head):]:  # stop after the end-of-turn token (drop e.g. the newline after it)
            end = len(head) + len(upto[len(head):]) - upto[len(head):][::-1].index(eos)
        spans.append((len(head), end))
    return ids, spans


def chat_items(examples: list[ChatExample], tokenizer, max_length: int) -> tuple[list[dict], int]:
    """(items with input_ids, attention_mask and labels, how many conversations were cut to max_length)."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"chat data needs a tokenizer with a chat template; {type(tokenizer).__name__} has none. "
                        "Use an instruct model (e.g. --model smollm2) or prompt/completion data with task causal-lm.")
    items, cut = [], 0
    for ex in examples:
        ids, spans = answer_spans(tokenizer, ex.messages)
        labels = [IGNORE_INDEX] * len(ids)
        for s, e in spans:
            labels[s:e] = ids[s:e]
        start, end = spans[-1]
        ids, labels = ids[:end], labels[:end]  # nothing after the last answer's eos is learned
        if end - start > max_length:
            raise DataError(f"line {ex.line}: the last answer alone is {end - start} tokens, max_length is "
                            f"{max_length}; answers are never cut. Raise max_length or shorten that answer.")
        if len(ids) > max_length:
            ids, labels, cut = ids[-max_length:], labels[-max_length:], cut + 1
        items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    return items, cut


def encode_chat(examples: list[ChatExample], tokenizer, max_length: int) -> list[dict]:
    """`chat_items`, reporting on stderr how many conversations lost prompt tokens to max_length."""
    items, cut = chat_items(examples, tokenizer, max_length)
    if cut:
        print(f"chat: {cut} of {len(examples)} conversations are longer than max_length={max_length}; their "
              "prompt was cut from the start (answers are kept whole)", file=sys.stderr, flush=True)
    return items


__all__ = ["ChatExample", "answer_spans", "chat_items", "encode_chat", "read_chat_jsonl"]
