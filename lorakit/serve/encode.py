"""Embeddings and classification: the inputs of several requests stacked (right-padded) into one forward, each
row under its own request's adapter; the engine runs it between two decode steps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .jobs import Job
from .kv import stack_right
from .schemas import ServeError


def no_head(adapter: str | None) -> ServeError:
    return ServeError(400, f"adapter {adapter!r} has no classification head (its file has no modules_to_save such "
                           "as 'classifier'); use /v1/embeddings, or an adapter trained for classification",
                      param="model", code="wrong_task")


@torch.inference_mode()
def encode(model: nn.Module, jobs: list[Job], pad_id: int, rows) -> tuple[list[str | None], list[Tensor]]:
    """One forward for every input of these jobs (all "embed" or all "classify"); returns the per-row adapter
    names and each job's result: mean-pooled last hidden states (embed) or class probabilities (classify).
    `rows(names)` is the engine's per-row adapter context."""
    inputs, sizes = stack_right([j.inputs for j in jobs], pad_id)
    names = [j.adapter for j, n in zip(jobs, sizes, strict=True) for _ in range(n)]
    with rows(names):
        if jobs[0].kind == "embed":
            hidden = model.base_model(**inputs).last_hidden_state  # (rows, seq, hidden)
            m = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            result = (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # mean over real tokens
        else:
            result = F.softmax(model(**inputs).logits.float(), -1)
    return names, list(result.float().split(sizes))
