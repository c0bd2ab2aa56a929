"""Many adapters on one model: activate, delete, disable, merge / unmerge / unload, combine."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import nn

from .config import LoraConfig
from .errors import AdapterNotFound, LoraConfigError, LoraStateError
from .inject import _set_submodule, lora_configs
from .layers import LoraLinear, LoraModule, SavedModule


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoraModule | SavedModule]]:
    """(name, module) for every LoRA layer and saved-module wrapper in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, LoraModule | SavedModule):
            yield name, module


def _check_names(model: nn.Module, names: list[str]) -> None:
    known = list(lora_configs(model))
    for n in names:
        if n not in known:
            raise AdapterNotFound(f"adapter {n!r} is not on this model; adapters present: {known or 'none'} "
                                  "(add one with inject or load_adapter)")


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (several = their deltas summed); only they train."""
    names = [names] if isinstance(names, str) else list(names)
    _check_names(model, names)
    if any(m.merged for _, m in lora_modules(model) if isinstance(m, LoraModule)):
        unmerge(model)  # the merged set must equal the active set; unmerge rather than mix them up
    for _, m in lora_modules(model):
        m.active = [n for n in names if n in m.adapter_names]
    _refresh_trainable(model)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names, in activation order."""
    return _active(model)


def _active(model: nn.Module) -> list[str]:
    seen: list[str] = []
    for _, m in lora_modules(model):
        seen += [n for n in m.active if n not in seen]
    return seen


def _refresh_trainable(model: nn.Module) -> None:
    # Declared, not found by substring: only active adapters' tensors, and biases per the bias mode.
    active = _active(model)
    configs = lora_configs(model)
    for p in model.parameters():
        p.requires_grad_(False)
    modes = {configs[n].bias for n in active if n in configs}
    for _, m in lora_modules(model):
        for n in m.active:
            for p in m.adapter_params(n):
                p.requires_grad_(True)
        if "lora_only" in modes and isinstance(m, LoraModule) and getattr(m.base_layer, "bias", None) is not None:
            m.base_layer.bias.requires_grad_(True)
    if "all" in modes:
        for pname, p in model.named_parameters():
            if pname.endswith("bias") and ".lora_" not in pname and ".original_module." not in pname:
                p.requires_grad_(True)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere (unmerge it first if merged)."""
    _check_names(model, [name])
    for _, m in lora_modules(model):
        if name in m.adapter_names:
            m.delete_adapter(name)
    del lora_configs(model)[name]
    _refresh_trainable(model)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block (merged adapters are unmerged, then merged back)."""
    was_merged = any(m.merged for _, m in lora_modules(model) if isinstance(m, LoraModule))
    unmerge(model)
    for _, m in lora_modules(model):
        m.disabled = True
    try:
        yield model
    finally:
        for _, m in lora_modules(model):
            m.disabled = False
        if was_merged:
            merge(model)


@contextmanager
def per_row_adapters(model: nn.Module, names: list[str | None]) -> Iterator[nn.Module]:
    """Inside the block, row i of each batch uses adapter `names[i]` (None = the bare base), in one forward.

    Semantics: model(x)[i] == (model with only names[i] active)(x[i:i+1]). Merged adapters would be
    counted twice, so the model must be unmerged. Works on Linear LoRA layers and saved modules.
    """
    known = [n for n in dict.fromkeys(names) if n is not None]
    _check_names(model, known)
    if any(m.merged for _, m in lora_modules(model) if isinstance(m, LoraModule)):
        raise LoraStateError("per_row_adapters needs an unmerged model; call unmerge(model) first")
    device = next(model.parameters()).device
    ids = torch.tensor([known.index(n) if n is not None else len(known) for n in names], device=device)
    for _, m in lora_modules(model):
        m.row_adapters = (known, ids)  # id len(known) means "no adapter"
    try:
        yield model
    finally:
        for _, m in lora_modules(model):
            m.row_adapters = None


def merge(model: nn.Module) -> nn.Module:
    """W0 += Σ active ΔW in every LoRA layer; idempotent. Outputs are unchanged, latency is the base's."""
    for _, m in lora_modules(model):
        if isinstance(m, LoraModule):
            m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge (W0 -= ΔW, in fp32); idempotent."""
    for _, m in lora_modules(model):
        if isinstance(m, LoraModule):
            m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and replace every lorakit module by its plain base module."""
    merge(model)
    for name, m in list(lora_modules(model)):
        _set_submodule(model, name, m.unwrap())
    model.__dict__.pop("_lorakit_configs", None)
    return model


def combine(model: nn.Module, names: list[str], weights: list[float], new_name: str,
            method: str = "linear", r: int | None = None) -> str:
    """Build adapter `new_name` from existing ones.

    cat:    A = [A₁; …; Aₖ], B = [w₁s₁B₁ … wₖsₖBₖ]; exactly ΔW = Σ wᵢ·ΔWᵢ at rank Σrᵢ.
    svd:    Σ wᵢ·ΔWᵢ truncated to rank r (default: max rᵢ) by SVD, per layer.
    linear: A = Σ √(wᵢsᵢ)·Aᵢ, B = Σ √(wᵢsᵢ)·Bᵢ (PEFT's "linear"; equal ranks; not the sum of deltas).
    The new adapter has scale 1 and is not activated.
    """
    _check_names(model, names)
    if len(weights) != len(names):
        raise LoraConfigError(f"combine: {len(names)} names but {len(weights)} weights; give one weight each")
    if method not in ("linear", "cat", "svd"):
        raise LoraConfigError(f"combine: method={method!r}; expected 'linear', 'cat' or 'svd'")
    if new_name in lora_configs(model):
        raise LoraConfigError(f"combine: adapter {new_name!r} already exists; pick another new_name")
    configs = [lora_configs(model)[n] for n in names]
    if method == "linear" and len({c.r for c in configs}) > 1:
        raise LoraConfigError(f"combine: method='linear' needs equal ranks, got {[c.r for c in configs]}; "
                              "use method='cat' or 'svd'")
    ranks: dict[str, int] = {}
    for lname, m in lora_modules(model):
        if isinstance(m, LoraModule) and any(n in m.adapter_names for n in names):
            A, B, new_r = _combined_factors(m, names, weights, method, r)
            m.add_adapter(new_name, new_r, float(new_r), 0.0, "kaiming")  # alpha = r: scale 1
            with torch.no_grad():
                m.A(new_name).copy_(A)
                m.B(new_name).copy_(B)
            ranks[lname] = new_r
        elif isinstance(m, SavedModule) and any(n in m.adapter_names for n in names):
            src = next(n for n in names if n in m.adapter_names)
            m.add_adapter(new_name)
            m.modules_to_save[new_name].load_state_dict(m.modules_to_save[src].state_dict())
    base_r = max(ranks.values())
    lora_configs(model)[new_name] = replace(
        configs[0], r=base_r, alpha=float(base_r), dropout=0.0, use_rslora=False, slices={},
        targets=sorted(ranks), rank_pattern={k: v for k, v in ranks.items() if v != base_r},
        alpha_pattern={k: float(v) for k, v in ranks.items() if v != base_r})
    _refresh_trainable(model)
    return new_name


def _combined_factors(m: LoraModule, names: list[str], weights: list[float], method: str,
                      r: int | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The new adapter's (A, B) in the layer's layout, and its rank (per slice for a per-slice layer)."""
    present = [(n, w) for n, w in zip(names, weights, strict=True) if n in m.adapter_names]
    rank = r or max(m.r[n] for n, _ in present)
    with torch.no_grad():
        if isinstance(m, LoraLinear) and m.slices is not None:
            # Each enabled slice is its own low-rank update: combine slice by slice, then stack the same way.
            per_name = [(m.slice_factors(n), m.scale[n], w) for n, w in present]
            blocks = [_combine([(fs[i][0], fs[i][1], s, w) for fs, s, w in per_name], method, rank)
                      for i in range(sum(m.slices))]
            return torch.cat([a for a, _ in blocks], 0), torch.cat([b for _, b in blocks], 0), blocks[0][0].shape[0]
        if method == "svd":  # in the layer's (out, in)-like matrix layout, then back to its factor shapes
            delta = sum(_as_matrix(m, m.delta_weight(n)) * w for n, w in present).float()
            A, B = _from_matrix(m, *_truncated_svd(delta, rank))
        else:
            A, B = _combine([(m.A(n), m.B(n), m.scale[n], w) for n, w in present], method, rank)
        return A, B, A.shape[0]


def _combine(factors: list[tuple[torch.Tensor, torch.Tensor, float, float]], method: str,
             rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) at scale 1 from [(Aᵢ, Bᵢ, sᵢ, wᵢ)], each ΔWᵢ = sᵢ·Bᵢ·Aᵢ (see `combine` for the methods)."""
    if method == "cat":
        return torch.cat([A for A, _, _, _ in factors], 0), torch.cat([B * (w * s) for _, B, s, w in factors], 1)
    if method == "linear":
        A = sum(A * math.sqrt(abs(w * s)) for A, _, s, w in factors)
        B = sum(B * (math.copysign(1, w) * math.sqrt(abs(w * s))) for _, B, s, w in factors)
        return A, B
    return _truncated_svd(sum((B @ A) * (w * s) for A, B, s, w in factors).float(), rank)


def _truncated_svd(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B·A the best rank-`rank` approximation of `delta` (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank]


def _as_matrix(m: LoraModule, delta: torch.Tensor) -> torch.Tensor:
    # ΔW in the (out, in)-like layout that B·A has, whatever the base layout.
    if isinstance(m, LoraLinear):
        return delta.t() if m.fan_in_fan_out else delta
    if m.a_name == "lora_embedding_A":
        return delta.t()
    return delta.flatten(1)


def _from_matrix(m: LoraModule, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if m.a_name == "lora_A" and not isinstance(m, LoraLinear):  # conv: A (r, in, *k), B (out, r, 1…)
        shape = m.base_layer.weight.shape
        A = A.reshape(A.shape[0], *shape[1:])
        B = B.reshape(*B.shape, *([1] * (len(shape) - 2)))
    return A, B


__all__ = ["LoraConfig", "active_adapters", "combine", "delete_adapter", "disabled", "lora_modules",
           "merge", "merge_and_unload", "per_row_adapters", "set_adapter", "unmerge"]
