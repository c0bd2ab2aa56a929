"""Decode plans for engine steps whose rows all use one adapter (a single stream, or a batch under one adapter).

Such a step runs the adapter's LoRA terms fused per group of layers that read one input (lorakit.decode_plan: at
batch 1 on SmolLM2 all-linear ~1.10x the base's step instead of ~1.16x per row). The plan's factors are copies, so
one is kept per adapter and load version (the registry gives every install a new version) and built again after a
reload; the entries are set on the layers only around the step's forward, on the engine thread, which owns the
model. Only an fp32 model uses plans: on a 16-bit base the per-row path adds the LoRA term computed in fp32, and a
plan would compute it in the base's dtype.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from lorakit.decode_plan import PlanEntry, installed, plan_entries
from lorakit.layers import LoraLinear

from .registry import AdapterRegistry


class StepPlans:
    """Built plan entries by adapter name, each with the load version it was built from."""

    def __init__(self, model: nn.Module, registry: AdapterRegistry) -> None:
        self.model, self.registry = model, registry
        self.fp32 = getattr(model, "dtype", None) == torch.float32
        self.built: dict[str, tuple[int, dict[LoraLinear, PlanEntry]]] = {}

    def for_step(self, names: list[str | None]) -> AbstractContextManager:
        """The plan to hold around a step whose rows use `names` (None = the base), or a no-op context."""
        first = names[0] if names else None
        version = self.registry.loaded.get(first) if first is not None else None
        if version is None or not self.fp32 or any(n != first for n in names):
            return nullcontext()
        hit = self.built.get(first)
        if hit is None or hit[0] != version:
            # drop plans of unloaded or reloaded adapters (they hold copies of old factors), then build this one
            self.built = {n: b for n, b in self.built.items() if self.registry.loaded.get(n) == b[0]}
            hit = self.built[first] = (version, plan_entries(self.model, first))
        return installed(hit[1])
