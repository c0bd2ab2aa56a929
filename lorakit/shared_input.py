"""Which adapted layers read the same input: the groups the decode and training plans compute together.

q/k/v and gate/up read one tensor in the architectures lorakit adapts (the layers vLLM and llama.cpp pack into one
matrix), so their LoRA terms can be computed together: x·[A₁; …; Aₖ]ᵀ is one rank-Σr product instead of k.
A group is a guess made from names; the plans that use it check that a later member sees the very tensor its first
member saw (T5's and BART's cross-attention call q on the decoder's states and k, v on the encoder's), and compute
alone otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from .layers import LoraLinear

# Sibling layer names that read one input in the architectures lorakit adapts (Llama/Mistral/Qwen, BERT/RoBERTa,
# T5), in the order their block calls them: a group's first eligible layer computes for all of it.
SHARED_INPUT: tuple[tuple[str, ...], ...] = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"),
                                             ("query", "key", "value"), ("q", "k", "v"))


def input_groups(model: nn.Module, eligible: Callable[[nn.Module], str | None]
                 ) -> list[tuple[str, list[LoraLinear]]]:
    """[(adapter, members)] for every layer `eligible` names an adapter for: siblings of one SHARED_INPUT entry
    under one parent, with the same adapter, weight dtype and device, in call order; any other layer alone."""
    layers = {}
    for path, m in model.named_modules():
        name = eligible(m)
        if name is not None:
            layers[path] = (m, name)
    seen: set[LoraLinear] = set()
    groups = []
    for path, (layer, name) in layers.items():
        if layer in seen:
            continue
        parent, _, leaf = path.rpartition(".")
        prefix = f"{parent}." if parent else ""
        siblings = next((s for s in SHARED_INPUT if leaf in s), (leaf,))
        w = layer.weight_out_in()
        members = [layers[prefix + s][0] for s in siblings if prefix + s in layers and layers[prefix + s][1] == name]
        members = [m for m in members if m not in seen and m.weight_out_in().dtype == w.dtype
                   and m.weight_out_in().device == w.device]
        seen.update(members)
        groups.append((name, members))
    return groups


def version(x: Tensor) -> int:
    """x's in-place version counter; -1 for an inference tensor, which keeps none (the same tensor is the check)."""
    return -1 if x.is_inference() else x._version


def holds(held: tuple | None, x: Tensor) -> bool:
    """Was `held` = (x, version, ...) recorded by a group's first member for this very x, unchanged since? A later
    member called with anything else computes its own."""
    return held is not None and held[0] is x and held[1] == version(x)


@contextmanager
def set_on_layers(entries: dict[LoraLinear, object], attr: str) -> Iterator[int]:
    """Set each layer's plan entry as instance attribute `attr` for the block (yields how many), and remove exactly
    those on exit: a nested or concurrent plan may have replaced one meanwhile, and keeps it."""
    for layer, entry in entries.items():
        layer.__dict__[attr] = entry
    try:
        yield len(entries)
    finally:
        for layer, entry in entries.items():
            if layer.__dict__.get(attr) is entry:
                del layer.__dict__[attr]
