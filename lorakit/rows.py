"""Per-row adapter choice for the forwards inside a block, passed through a context variable.

Nothing is written on the model: the LoRA layers read `current_rows()` in forward. A context variable is
local to its thread (and asyncio task), so two threads each inside their own block never see each other's
choice, and a model shared by them is never mutated by it.

    with adapter_rows(["sst2", "rte"], torch.tensor([0, 1, -1, 0])):   # the engine's per-step form
        logits = model(input_ids).logits                               # row 2 runs the bare base

Semantics (reference): out[i] == (model with only names[ids[i]] active)(x[i:i+1]); ids[i] == -1 is the base.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .errors import LoraConfigError, LoraStateError
from .functional import bag_indices

if TYPE_CHECKING:
    from .row_tables import RowTables


@dataclass(frozen=True)
class RowAdapters:
    """Which adapter each batch row uses: `names[ids[i]]`, or the base where ids[i] == -1.

    expand: accept a batch that is k·len(ids) rows, row j using ids[j // k] — what `generate` makes of a
    batch with `num_beams` or `num_return_sequences` k (it repeats each row k times, in place).
    tables: slot tables holding every named adapter's factors (row_tables.py), for the decode kernel.
    uniform / only: every row makes the same choice (a single stream, or a batch under one adapter), and that
    choice (a name, or None for the base); the layers then skip the per-row grouping altogether.
    """

    names: tuple[str, ...]
    ids: Tensor  # (batch,) long
    expand: bool = False
    tables: RowTables | None = None
    _groups: dict[int, list[tuple[str, Tensor]]] = field(default_factory=dict, compare=False, repr=False)
    _bags: dict[tuple[int, int, int], tuple | None] = field(default_factory=dict, compare=False, repr=False)
    uniform: bool = field(init=False, compare=False)
    only: str | None = field(init=False, compare=False)

    def __post_init__(self) -> None:
        first = int(self.ids[0]) if self.ids.numel() else -1
        uniform = self.ids.numel() > 0 and bool((self.ids == first).all())
        object.__setattr__(self, "uniform", uniform)
        object.__setattr__(self, "only", self.names[first] if uniform and first >= 0 else None)

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

    def table(self, layer, x: Tensor) -> tuple | None:
        """`layer`'s (T, U, rows, bags...) for `functional.table_lora_delta` when slot tables hold it and every
        named adapter, x is one token per row and no gradient is wanted; else None (the other kernels)."""
        tables, one_token = self.tables, x.numel() == x.shape[0] * x.shape[-1]
        if tables is None or layer not in tables.tables or not one_token or torch.is_grad_enabled():
            return None
        groups = self.groups(x.shape[0])
        if len(groups) == 1 and groups[0][1].numel() == x.shape[0]:
            return None  # one adapter on every row: two plain matmuls read its A and B once (mixed_lora_delta)
        T, U = tables.tables[layer]
        key = (x.shape[0], x.shape[-1], T.shape[1])
        if key not in self._bags:  # once per step and layer shape, shared by the layers
            self._bags[key] = None
            if all(n in tables.slot for n in self.names):
                slot = torch.tensor([tables.slot[n] for n in self.names] + [-1], device=x.device)
                slot = slot[self.ids_for(key[0])]  # (batch,), -1 for base rows
                rows = (slot >= 0).nonzero(as_tuple=True)[0]
                self._bags[key] = (None if rows.numel() == key[0] else rows, *bag_indices(slot[rows], *key[1:]))
        return None if self._bags[key] is None else (T, U, *self._bags[key])


_ROWS: ContextVar[RowAdapters | None] = ContextVar("lorakit_row_adapters", default=None)
# How many `adapter_rows` blocks are open, in all threads and tasks. While it is 0 no forward anywhere can have rows,
# so `current_rows` answers None without reading the context variable: torch.compile cannot trace
# ContextVar.get (a graph break in every LoRA layer), but it guards a compiled graph on this plain global, so a
# graph compiled outside any block is never reused inside one. Raised before the variable is set, lowered after
# it is reset: whenever a block is open the variable itself (per thread / task) is the answer.
_OPEN_BLOCKS = 0
_OPEN_LOCK = threading.Lock()


def current_rows() -> RowAdapters | None:
    """The per-row adapter choice of the enclosing `adapter_rows` block in this thread/task, if any."""
    if _OPEN_BLOCKS == 0:
        return None
    return _ROWS.get()


def _count_open(delta: int) -> None:
    global _OPEN_BLOCKS
    with _OPEN_LOCK:
        _OPEN_BLOCKS += delta


@contextmanager
def adapter_rows(names: Sequence[str], ids: Tensor | Sequence[int], expand: bool = False,
                 tables: RowTables | None = None) -> Iterator[RowAdapters]:
    """Inside the block, forwards in this thread use adapter `names[ids[i]]` for row i (-1 = the base).

    The low-level form for a server engine: it checks only the ids, not the model (see `per_row_adapters`).
    `tables`, synced with these names between forwards (`RowTables.sync`), let decode steps read each row's
    factors in place.
    """
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.dim() != 1 or (ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= len(names))):
        raise LoraConfigError(f"adapter ids {ids.tolist()}: expected a 1-d list of values in [-1, {len(names)}) "
                              f"indexing names {list(names)} (-1 = the base model)")
    rows = RowAdapters(tuple(names), ids, expand, tables)
    _count_open(1)
    try:
        token = _ROWS.set(rows)
        try:
            yield rows
        finally:
            _ROWS.reset(token)
    finally:
        _count_open(-1)
