"""Choosing the next token (greedy, temperature, top-p with a per-request seed) and turning tokens into text
incrementally (stop strings, incomplete UTF-8 held back)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


def make_generator(seed: int | None, index: int) -> torch.Generator:
    """A per-choice generator: choice `index` of a seeded request draws the same tokens on every run."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed) * 1000003 + index)
    return g


def next_token(logits: Tensor, params: Sampling, gen: torch.Generator) -> int:
    """One row's next token: argmax at temperature 0, else a draw from the top-p nucleus of softmax(l/T)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, -1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < params.top_p  # the smallest prefix reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
    return int(torch.multinomial(probs, 1, generator=gen))


class TextStream:
    """Decoded text of the generated tokens, released in pieces that never cut a character or a stop string."""

    def __init__(self, tokenizer, stop: list[str]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.sent = 0  # characters already released
        self.text = ""

    def update(self, tokens: list[int]) -> bool:
        """Decode `tokens`; True if a stop string appeared (the text is then cut before it)."""
        self.text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        hits = [i for i in (self.text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            return True
        return False

    def delta(self, final: bool) -> str:
        """The next releasable piece of text (everything left when `final`)."""
        end = len(self.text)
        if not final:
            end = len(self.text.rstrip("\ufffd")) - self.hold  # an incomplete character decodes to U+FFFD
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece
