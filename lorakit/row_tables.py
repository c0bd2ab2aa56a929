"""Slot tables for the per-row LoRA term at decode: every running adapter's factors copied once, between forwards,
into one table per layer, so a step reads each row's own A and B in place (punica's BGMV, on CPU through
`embedding_bag`) instead of stacking or looping over the adapters again in every layer of every step.

An adapter holds one slot, the same in every layer. Per LoRA Linear layer, R its table's rank (the largest rank
written there; smaller ranks are zero-padded, and a slot whose adapter skips the layer is all zero):
    T: (slots·in, R)   row slot·in + c = A[:, c]        (the slot's Aᵀ)
    U: (slots·R, out)  row slot·R + j  = s·B[:, j]      (the slot's s·Bᵀ, the scale folded in)
in fp32 whatever the base's dtype (the per-row delta is computed in fp32, as PEFT computes LoRA on a 16-bit base).

Only `sync` and `drop` write the tables, and the engine thread calls them between two forwards (`sync` before a
decode step; `drop` when an adapter is unloaded or installed again). A forward only reads them: the tables
reach the LoRA layers explicitly, through `adapter_rows(..., tables=...)`, never as state on the model.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from .injection import lora_modules
from .layers import LoraLinear, param_key


class RowTables:
    """Adapter name -> slot, and per LoRA Linear layer its (T, U) tables of `slots` slots."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self.slot: dict[str, int] = {}
        self.tables: dict[LoraLinear, tuple[Tensor, Tensor]] = {}

    @torch.inference_mode()  # the tables are only ever read under no_grad / inference_mode (rows.table)
    def sync(self, model: nn.Module, names: Iterable[str | None]) -> bool:
        """Give every adapter in `names` (None = the base) a slot, copying its factors into every layer's table,
        evicting adapters not in `names` when slots run out. False when they do not all fit (more distinct
        adapters than slots): the forward then takes `functional.mixed_lora_delta` without tables."""
        wanted = {n for n in names if n is not None}
        new = [n for n in wanted if n not in self.slot]
        if not new:
            return True
        if len(wanted) > self.slots:
            return False
        for n in [n for n in self.slot if n not in wanted][:max(0, len(new) - self.free())]:
            del self.slot[n]
        layers = [m for _, m in lora_modules(model) if isinstance(m, LoraLinear)]
        live = set(layers)
        self.tables = {m: t for m, t in self.tables.items() if m in live}  # not layers unwrapped since
        free = sorted(set(range(self.slots)) - set(self.slot.values()))
        for name, slot in zip(sorted(new), free, strict=False):
            self.slot[name] = slot
            for m in layers:
                self._write(m, name, slot)
        return True

    def free(self) -> int:
        return self.slots - len(self.slot)

    def drop(self, name: str) -> None:
        """Forget adapter `name` (unloaded, or about to be installed again from a new file); its slot is reused."""
        self.slot.pop(name, None)
        if not self.slot:
            self.tables = {}

    def _write(self, m: LoraLinear, name: str, slot: int) -> None:
        has = param_key(name) in getattr(m, m.a_name)
        A, B = m.dense_factors(name) if has else (None, None)
        r = A.shape[0] if has else 0
        if m not in self.tables:
            if not has:
                return  # no table yet and nothing to write: this layer stays off the tables until an adapter has it
            self.tables[m] = self._empty(m, r)
        T, U = self.tables[m]
        if r > T.shape[1]:
            T, U = self._grow(m, T, U, r)
        R = T.shape[1]
        t, u = T.view(self.slots, m.in_features, R)[slot], U.view(self.slots, R, m.out_features)[slot]
        t.zero_(), u.zero_()
        if has:
            t[:, :r] = A.t()
            u[:r] = B.t() * m.scale[name]

    def _empty(self, m: LoraLinear, r: int) -> tuple[Tensor, Tensor]:
        device = m.A(m.adapter_names[0]).device
        return (torch.zeros(self.slots * m.in_features, r, device=device),
                torch.zeros(self.slots * r, m.out_features, device=device))

    def _grow(self, m: LoraLinear, T: Tensor, U: Tensor, r: int) -> tuple[Tensor, Tensor]:
        """A wider table (rank r), the slots already written copied in, zero-padded."""
        T2, U2 = self._empty(m, r)
        R = T.shape[1]
        T2.view(self.slots, m.in_features, r)[:, :, :R] = T.view(self.slots, m.in_features, R)
        U2.view(self.slots, r, m.out_features)[:, :R] = U.view(self.slots, R, m.out_features)
        self.tables[m] = (T2, U2)
        return T2, U2
