"""Per-row adapter choice for the forwards inside a block, passed through a context variable.

Nothing is written on the model: the LoRA layers read `current_rows()` in forward. A context variable is
local to its thread (and asyncio task), so two threads each inside their own block never see each other's
choice, and a model shared by them is never mutated by it.

    with adapter_rows(["sst2", "rte"], torch.tensor([0, 1, -1, 0])):   # the engine's per-step form
        logits = model(input_ids).logits                               # row 2 runs the bare base

Semantics (reference): out[i] == (model with only names[ids[i]] active)(x[i:i+1]); ids[i] == -1 is the base.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .errors import LoraConfigError, LoraStateError


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each batch row uses: `names[ids[i]]`, or the base where ids[i] == -1.

    expand: accept a batch that is k·len(ids) rows, row j using ids[j // k] — what `generate` makes of a
    batch with `num_beams` or `num_return_sequences` k (it repeats each row k times, in place).
    """

    names: tuple[str, ...]
    ids: Tensor  # (batch,) long
    expand: bool = False
    _groups: dict[int, list[tuple[str, Tensor]]] = field(default_factory=dict, compare=False, repr=False)

    def ids_for(self, batch: int) -> Tensor:
        """The (batch,) ids for a forward of `batch` rows; LoraStateError if they do not fit."""
        n = self.ids.shape[0]
        if batch == n:
            return self.ids
        if self.expand and batch % n == 0:
            return self.ids.repeat_interleave(batch // n)
        hint = (f"; it is {batch // n}x the names — if generate expanded it (num_beams / num_return_sequences), "
                "pass expand=True" if batch % n == 0 and not self.expand else "")
        raise LoraStateError(f"per-row adapters: the batch has {batch} rows but {n} adapter names were given; "
                             f"give one name (or None) per row{hint}")

    def groups(self, batch: int) -> list[tuple[str, Tensor]]:
        """[(adapter name, its row indices)] for a forward of `batch` rows, base rows left out; computed once."""
        if batch not in self._groups:
            ids = self.ids_for(batch)
            self._groups[batch] = [(n, rows) for k, n in enumerate(self.names)
                                   if (rows := (ids == k).nonzero(as_tuple=True)[0]).numel()]
        return self._groups[batch]


_ROWS: ContextVar[RowAdapters | None] = ContextVar("lorakit_row_adapters", default=None)


def current_rows() -> RowAdapters | None:
    """The per-row adapter choice of the enclosing `adapter_rows` block in this thread/task, if any."""
    return _ROWS.get()


@contextmanager
def adapter_rows(names: Sequence[str], ids: Tensor | Sequence[int], expand: bool = False) -> Iterator[RowAdapters]:
    """Inside the block, forwards in this thread use adapter `names[ids[i]]` for row i (-1 = the base).

    The low-level form for a server engine: it checks only the ids, not the model (see `per_row_adapters`).
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1 or (ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= len(names))):
        raise LoraConfigError(f"adapter ids {ids.tolist()}: expected a 1-d list of values in [-1, {len(names)}) "
                              f"indexing names {list(names)} (-1 = the base model)")
    token = _ROWS.set(RowAdapters(tuple(names), ids, expand))
    try:
        yield _ROWS.get()
    finally:
        _ROWS.reset(token)
