"""E2E NLG evaluation: generate one text per MR of an `MR||reference` file, score it as the official
script does (lorakit.e2e_metrics), and write what any other scorer needs beside the numbers.

Prompt styles:
    plain     "MR ||"  - the format lorakit's causal-LM training uses (task e2e); the model continues it
    instruct  the chat template with an instruction and the MR - the zero-shot base model
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lorakit.e2e_metrics import METRICS, e2e_scores, format_scores, group_by_mr
from lorakit.generate import generate
from lorakit.train.data import LM_SEPARATOR

INSTRUCTION = ("Write one short, plain sentence about this restaurant that states every attribute below and "
               "adds nothing else.\nAttributes: {mr}")
PROMPT_STYLES = ("plain", "instruct")


@dataclass
class E2EResult:
    """Scores (None where not computed), notes, the outputs (one per MR, file order) and where they went."""

    scores: dict[str, float | None]
    notes: list[str]
    outputs: list[str]
    out_dir: Path | None
    generate_s: float


def e2e_prompt(mr: str, style: str) -> str:
    """The prompt for one MR: the training format (plain) or an instruction for a chat model (instruct)."""
    if style == "plain":
        return mr + LM_SEPARATOR
    if style == "instruct":
        return INSTRUCTION.format(mr=mr)
    raise ValueError(f"prompt style {style!r}: expected one of {PROMPT_STYLES}")


def write_outputs(out_dir: str | Path, groups: list[tuple[str, list[str]]], outputs: list[str],
                  scores: dict, notes: list[str], meta: dict) -> Path:
    """outputs.txt (one line per MR, file order), references.txt (the official multi-reference layout:
    each MR's references on consecutive lines, a blank line between MRs), mrs.txt and scores.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "outputs.txt").write_text("".join(o + "\n" for o in outputs), encoding="utf-8")
    (out / "references.txt").write_text("\n".join("".join(r + "\n" for r in refs) for _, refs in groups),
                                        encoding="utf-8")
    (out / "mrs.txt").write_text("".join(mr + "\n" for mr, _ in groups), encoding="utf-8")
    (out / "scores.json").write_text(json.dumps({"scores": scores, "notes": notes, **meta}, indent=2) + "\n",
                                     encoding="utf-8")
    return out


def evaluate_e2e(model: nn.Module, tokenizer, data: str | Path, *, style: str = "plain", limit: int = 0,
                 batch_size: int = 8, num_beams: int = 1, max_new_tokens: int = 96,
                 out_dir: str | Path | None = None) -> E2EResult:
    """Generate for every MR of `data` (the first `limit` MRs if > 0; greedy unless num_beams > 1), score
    the outputs against all references of each MR, and write them to `out_dir` if given."""
    groups = group_by_mr(data)[:limit or None]
    prompts = [e2e_prompt(mr, style) for mr, _ in groups]
    start = time.perf_counter()
    raw = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, num_beams=num_beams,
                   batch_size=batch_size, chat=style == "instruct")
    seconds = time.perf_counter() - start
    outputs = [" ".join(text.split()) for text in raw]  # one line per MR
    scores, notes = e2e_scores(outputs, [refs for _, refs in groups])
    notes.append(f"decoding: {'greedy' if num_beams == 1 else f'beam {num_beams}'}, max_new_tokens {max_new_tokens}, "
                 f"prompt style {style}; {len(groups)} MRs of {data}")
    meta = {"data": str(data), "mrs": len(groups), "num_beams": num_beams, "max_new_tokens": max_new_tokens,
            "style": style, "generate_s": round(seconds, 1)}
    written = write_outputs(out_dir, groups, outputs, scores, notes, meta) if out_dir is not None else None
    return E2EResult(scores, notes, outputs, written, seconds)


def report(result: E2EResult) -> str:
    """What `lorakit eval` prints: the five metrics, the notes, and where the outputs are."""
    lines = [format_scores(result.scores)] + [f"  note: {n}" for n in result.notes]
    if result.out_dir is not None:
        lines.append(f"  outputs (one per MR, file order): {result.out_dir / 'outputs.txt'}; references: "
                     f"{result.out_dir / 'references.txt'}; scores: {result.out_dir / 'scores.json'}")
    return "\n".join(lines)


__all__ = ["INSTRUCTION", "METRICS", "PROMPT_STYLES", "E2EResult", "e2e_prompt", "evaluate_e2e", "report",
           "write_outputs"]
