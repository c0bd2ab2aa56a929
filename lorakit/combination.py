"""combine: a new adapter built from existing ones (PEFT's add_weighted_adapter: linear, cat, svd)."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor, nn

from .errors import LoraConfigError
from .injection import check_adapter_name, check_names, lora_configs, lora_modules, refresh_trainable
from .layers import LoraModule
from .saved import SavedModule
from .transaction import all_or_nothing

METHODS = ("linear", "cat", "svd")


def combine(model: nn.Module, names: list[str], weights: list[float], new_name: str,
            method: str = "linear", r: int | None = None) -> str:
    """Build adapter `new_name` from existing ones, as PEFT's `add_weighted_adapter` does (same factors).

    cat:    A = [w₁s₁A₁; …; wₖsₖAₖ], B = [B₁ … Bₖ]; exactly ΔW = Σ wᵢ·ΔWᵢ at rank Σrᵢ.
    svd:    Σ wᵢ·ΔWᵢ truncated to rank r (default: max rᵢ) by SVD, per layer.
    linear: A = Σ sign(wᵢ)·√|wᵢsᵢ|·Aᵢ, B = Σ √|wᵢsᵢ|·Bᵢ (PEFT's "linear"; equal ranks; not the sum of deltas).
    Per-slice layers (GPT-2's q, v of c_attn) combine slice by slice. The new adapter has scale 1 and is not
    activated. All or nothing: every layer's factors are built before the model changes.
    """
    check_names(model, names)
    if len(weights) != len(names) or not all(isinstance(w, int | float) and math.isfinite(w) for w in weights):
        raise LoraConfigError(f"combine: {len(names)} names but weights {list(weights)}; give one finite number each")
    if method not in METHODS:
        raise LoraConfigError(f"combine: method={method!r}; expected 'linear', 'cat' or 'svd'")
    check_adapter_name(new_name)
    if new_name in lora_configs(model):
        raise LoraConfigError(f"combine: adapter {new_name!r} already exists; pick another new_name")
    built: list[tuple[str, LoraModule | SavedModule, tuple]] = []
    for lname, m in lora_modules(model):
        present = [(n, w) for n, w in zip(names, weights, strict=True) if n in m.adapter_names]
        if present and isinstance(m, LoraModule):
            built.append((lname, m, _combined_factors(lname, m, present, method, r)))
        elif present:
            built.append((lname, m, (m.new_copy(trainable=False), m.copy(present[0][0]).state_dict())))
    ranks = {lname: f[2] for lname, m, f in built if isinstance(m, LoraModule)}
    base_r = max(ranks.values())
    config = replace(
        lora_configs(model)[names[0]], r=base_r, alpha=float(base_r), dropout=0.0, use_rslora=False, slices={},
        targets=sorted(ranks), rank_pattern={k: v for k, v in ranks.items() if v != base_r},
        alpha_pattern={k: float(v) for k, v in ranks.items() if v != base_r})
    with all_or_nothing(model):
        for _, m, parts in built:
            if isinstance(m, LoraModule):
                A, B, new_r = parts
                m.install(new_name, A, B, new_r, float(new_r), 0.0, trainable=False)  # alpha = r: scale 1
            else:
                copy, state = parts
                copy.load_state_dict(state)
                m.install(new_name, copy)
        lora_configs(model)[new_name] = config
        refresh_trainable(model)
    return new_name


def _combined_factors(lname: str, m: LoraModule, present: list[tuple[str, float]], method: str,
                      r: int | None) -> tuple[Tensor, Tensor, int]:
    """The new adapter's (A, B) in the layer's form, and its rank, from each block of the layer."""
    ranks = [m.r[n] for n, _ in present]
    if method == "linear" and len(set(ranks)) > 1:
        raise LoraConfigError(f"combine: method='linear' needs equal ranks, but at {lname} the adapters "
                              f"{[n for n, _ in present]} have ranks {ranks}; use method='cat' or 'svd'")
    rank = r or max(ranks)
    with torch.no_grad():
        per_name = [(m.combine_blocks(n), m.scale[n], w) for n, w in present]
        blocks = []
        for i in range(len(per_name[0][0])):
            factors = [(fs[i][0], fs[i][1], s, w) for fs, s, w in per_name]
            if method == "svd":  # in the (out, in·k…) matrix layout B·A has, then back to the factor shapes
                delta = sum((B.flatten(1) @ A.flatten(1)) * (w * s) for A, B, s, w in factors).float()
                A2, B2 = _truncated_svd(delta, rank)
                a_shape, b_shape = factors[0][0].shape[1:], factors[0][1].shape[2:]
                blocks.append((A2.reshape(A2.shape[0], *a_shape), B2.reshape(*B2.shape, *b_shape)))
            else:
                blocks.append(_combine(factors, method))
        dtype = m.A(present[0][0]).dtype
        A, B, new_r = m.from_blocks(blocks)
        return A.to(dtype).contiguous(), B.to(dtype).contiguous(), new_r


def _combine(factors: list[tuple[Tensor, Tensor, float, float]], method: str) -> tuple[Tensor, Tensor]:
    """(A, B) at scale 1 from [(Aᵢ, Bᵢ, sᵢ, wᵢ)], each ΔWᵢ = sᵢ·Bᵢ·Aᵢ (see `combine` for the methods)."""
    if method == "cat":
        return torch.cat([A * (w * s) for A, _, s, w in factors], 0), torch.cat([B for _, B, _, _ in factors], 1)
    A = sum(A * (math.copysign(1, w * s) * math.sqrt(abs(w * s))) for A, _, s, w in factors)
    B = sum(B * math.sqrt(abs(w * s)) for _, B, s, w in factors)
    return A, B


def _truncated_svd(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """(A, B) with B·A the best rank-`rank` approximation of `delta` (Eckart–Young)."""
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    return Vh[:rank], U[:, :rank] * S[:rank]
