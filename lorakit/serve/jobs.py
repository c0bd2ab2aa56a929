"""A request as the engine sees it (`Job`), one generated choice of it (`Seq`), and the events they send back.

The engine thread never awaits anything: it hands events to the request's asyncio queue with
`call_soon_threadsafe`. Events: ("text", index, piece), ("finish", index, reason), ("done", usage),
("result", payload) for embeddings/classify, ("error", ServeError).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from .sampling import Sampling, TextStream, make_generator


@dataclass
class Job:
    kind: str  # "generate" | "embed" | "classify"
    adapter: str | None  # None: the bare base
    label: str  # the `model` the client named (metrics label)
    loop: asyncio.AbstractEventLoop
    prompt: list[int] = field(default_factory=list)  # generate
    inputs: dict[str, torch.Tensor] | None = None  # embed / classify: a padded tokenizer batch
    sampling: Sampling | None = None
    n: int = 1
    offset: int = 0  # choice index of this job's first choice (a request with several prompts)
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    start: float = field(default_factory=time.perf_counter)
    first_token: float | None = None
    counted: bool = False  # adapter cache hit/miss recorded
    closed: bool = False
    remaining: int = 0
    completion_tokens: int = 0

    def emit(self, *event: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the event loop is gone (server shutting down): nobody is listening
            pass

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class Seq:
    """One choice being generated: its prompt, tokens so far, sampler and text stream."""

    job: Job
    index: int
    tokenizer: Any
    max_context: int
    eos: set[int]
    generated: list[int] = field(default_factory=list)
    last: int = -1  # the token to feed next step

    def __post_init__(self) -> None:
        s = self.job.sampling
        self.gen = make_generator(s.seed, self.index)
        self.text = TextStream(self.tokenizer, s.stop)

    @property
    def adapter(self) -> str | None:
        return self.job.adapter

    def push(self, token: int) -> str | None:
        """Take the sampled token; returns the finish reason once the choice is complete, else None."""
        job, s = self.job, self.job.sampling
        if job.first_token is None:
            job.first_token = time.perf_counter()
        if token in self.eos:
            return "stop"
        self.generated.append(token)
        self.last = token
        job.completion_tokens += 1
        if self.text.update(self.generated):
            return "stop"
        if len(self.generated) >= s.max_tokens or len(job.prompt) + len(self.generated) >= self.max_context:
            return "length"
        piece = self.text.delta(final=False)
        if piece:
            job.emit("text", job.offset + self.index, piece)
        return None

    def finish(self, reason: str) -> None:
        piece = self.text.delta(final=True)
        if piece:
            self.job.emit("text", self.job.offset + self.index, piece)
        self.job.emit("finish", self.job.offset + self.index, reason)
