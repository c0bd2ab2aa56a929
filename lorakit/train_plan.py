"""A training plan: the adapted layers that read one input (q/k/v, gate/up) run as one autograd function.

Each adapted layer of a training step is a forward and a backward of its own autograd function, with four rank-r
products over its input or output gradient. Inside `train_plan(model)`, a group of layers that read one tensor
(lorakit.shared_input) is computed by its first layer in one function (functional._SharedInputLora): one product
x·[A₁; …; Aₖ]ᵀ, one for every A's gradient, x's gradient summed in one buffer, one node instead of k. On SmolLM2
all-linear (batch 8 × 256) that takes ~2% off the layers' forward and backward, ~1% for q,v (benchmarks/RESULTS.md,
session 14). Loss and gradients equal the dense formula's.

A group is a guess from names, so the plan confirms it before fusing: the first forward in the plan runs every
layer on its own path and watches whether the later members are called with the very tensor (same version) the
first one was; only then does the first member compute for all, and the others take their outputs. A group whose
member later sees another input (T5's and BART's cross-attention call q on the decoder's states and k, v on the
encoder's) goes back to watching, and that member computes its own output. So the plan pays from the second step
on: `lorakit train` enters it around its whole loop. Your own loop can too:

    with lorakit.train_plan(model):
        for batch in batches:
            model(**batch).loss.backward(); optimizer.step(); optimizer.zero_grad()

A call takes its layer's own path unless it is what the plan was built for: gradients on, no autocast, no per-row
adapters, no torch.compile tracing, x in the weights' dtype, every member still enabled, unmerged, with the same one
active adapter, no dropout in training mode (each layer draws its own mask), and enough rows that folding B·A into
W pays (training batches, `fold_pays`). Not with activation checkpointing: a group confirmed between a forward and
its recomputation would save other tensors, which torch.utils.checkpoint refuses, so the plan covers nothing in a
transformers model with checkpointing on (`--gradient_checkpointing`); torch.utils.checkpoint called in your own
model's forward it cannot see: do not enter the plan around that.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .functional import _SharedInputLora, fold_pays
from .layers import LoraLinear
from .rows import current_rows
from .shared_input import holds, input_groups, set_on_layers, version


class _Group:
    """The members of one group (in call order) and what the plan knows of it.

    confirmed: the later members were seen called with the first member's input, so the first computes for all.
    probe: (x, version, members seen with it) while watching; outs: (x, version, outputs) of a fused call."""

    __slots__ = ("members", "name", "confirmed", "probe", "outs")

    def __init__(self, members: list[LoraLinear], name: str) -> None:
        self.members, self.name = members, name
        self.confirmed = False
        self.probe: tuple[Tensor, int, int] | None = None
        self.outs: tuple[Tensor, int, tuple[Tensor, ...]] | None = None

    def runnable(self, x: Tensor) -> bool:
        """Can one function compute every member for this x? (each member's state, factors and the row count)"""
        rows, name = x.numel() // x.shape[-1], self.name
        for m in self.members:  # the state the plan was built for (`_eligible`), then what this call brings
            if (_eligible(m) != name or not fold_pays(rows, m.out_features, m.in_features)
                    or any(t.dtype != x.dtype for t in (m.base_layer.weight, *m._factors_of(name)))):
                return False
        return True

    def fused(self, x: Tensor) -> tuple[Tensor, ...]:
        name, ms = self.name, self.members
        factors = [m._factors_of(name) for m in ms]
        return _SharedInputLora.apply(x, tuple(m.scale[name] for m in ms), *(m.base_layer.weight for m in ms),
                                      *(m.base_layer.bias for m in ms), *(A for A, _ in factors),
                                      *(B for _, B in factors))


class TrainEntry:
    """One layer's part of a training plan: its group and its place in it."""

    __slots__ = ("group", "i", "device_type")

    def __init__(self, group: _Group, i: int, layer: LoraLinear) -> None:
        self.group, self.i, self.device_type = group, i, layer.base_layer.weight.device.type

    def __call__(self, x: Tensor) -> Tensor | None:
        """The layer's output through the plan, or None: the layer computes its own."""
        if (current_rows() is not None or torch.is_autocast_enabled(self.device_type) or x.is_inference()
                or torch.compiler.is_compiling()):
            return None
        g, i = self.group, self.i
        if i == 0:
            g.outs = None
            if g.confirmed and g.runnable(x):
                outs = g.fused(x)
                g.outs = (x, version(x), outs)
                return outs[0]
            g.probe = (x, version(x), 1)
            return None
        if g.outs is not None:
            if holds(g.outs, x):
                y = g.outs[2][i]
                if i == len(g.members) - 1:
                    g.outs = None  # the last member: let go of x and the outputs
                return y
            g.outs, g.confirmed = None, False  # a member read another input: watch the group again
        elif not g.confirmed:
            if holds(g.probe, x) and g.probe[2] == i:
                g.probe = (x, version(x), i + 1)
                if i == len(g.members) - 1:
                    g.confirmed, g.probe = True, None
            else:
                g.probe = None  # not this step: let go of the first member's x
        return None


def _checkpointing(model: nn.Module) -> bool:
    """Does transformers recompute this model's blocks in backward? (`is_activation_checkpointing`, formerly
    `is_gradient_checkpointing`.) Other checkpointing, e.g. torch.utils.checkpoint called in your own model's
    forward, is not visible here: do not enter the plan around it."""
    flag = getattr(model, "is_activation_checkpointing", None)
    return bool(getattr(model, "is_gradient_checkpointing", False) if flag is None else flag)


def _eligible(m: nn.Module) -> str | None:
    """The one active adapter a training plan computes in layer `m`, or None if it cannot."""
    if (type(m) is not LoraLinear or m.disabled or m.merged or len(m.active) != 1 or m.fan_in_fan_out
            or not m.base_layer.weight.is_floating_point() or m.base_layer.weight.requires_grad):
        return None
    name = m.active[0]
    return name if m._factors_of(name) is not None and not (m.training and m.dropout[name]) else None


def train_entries(model: nn.Module) -> dict[LoraLinear, TrainEntry]:
    """{layer: its entry} for the layers of every group of two or more that read one input (a layer alone keeps
    its own path: there is nothing to share); none for a transformers model with activation checkpointing on."""
    entries: dict[LoraLinear, TrainEntry] = {}
    if _checkpointing(model):
        return entries
    for name, members in input_groups(model, _eligible):
        if len(members) > 1:
            group = _Group(members, name)
            for i, m in enumerate(members):
                entries[m] = TrainEntry(group, i, m)
    return entries


@contextmanager
def train_plan(model: nn.Module) -> Iterator[int]:
    """Train `model`'s LoRA layers that read one input as one autograd function per group inside the block (yields
    how many layers it covers); see the module's docstring. Do not add, delete, activate or merge adapters inside."""
    entries = train_entries(model)
    try:
        with set_on_layers(entries, "_train_plan") as n:
            yield n
    finally:
        for entry in entries.values():
            entry.group.outs = entry.group.probe = None
