"""Many adapters on one model: activate, delete, disable, merge / unmerge / unload, per-row batches.

Every verb is all or nothing (see transaction.py): it checks, builds, then swaps in, and a failure leaves
the model as it was. `combine` lives in combination.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .combination import combine
from .config import LoraConfig
from .errors import LoraConfigError, LoraStateError
from .injection import (
    _set_submodule,
    activate,
    active_names,
    check_names,
    is_merged,
    lora_configs,
    lora_modules,
    refresh_trainable,
)
from .layers import LoraModule
from .rows import adapter_rows
from .saved import SavedModule
from .transaction import all_or_nothing


def set_adapter(model: nn.Module, names: str | list[str]) -> None:
    """Make `names` the active adapters (several = their deltas summed); only they train.

    A merged model is unmerged first (exactly: the original weights come back bit for bit).
    """
    names = [names] if isinstance(names, str) else list(names)
    check_names(model, names)
    with all_or_nothing(model):
        unmerge(model)  # the merged set must equal the active set; unmerge rather than mix them up
        activate(model, names)


def active_adapters(model: nn.Module) -> list[str]:
    """The active adapter names, in activation order."""
    return active_names(model)


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name` everywhere; refused (before any change) while it is merged."""
    check_names(model, [name])
    merged = [p for p, m in lora_modules(model) if isinstance(m, LoraModule) and name in m.merged]
    if merged:
        raise LoraStateError(f"adapter {name!r} is merged into {merged[0]} ({len(merged)} layers); "
                             "call unmerge(model) before deleting it")
    with all_or_nothing(model):
        for _, m in lora_modules(model):
            if name in m.adapter_names:
                m.delete_adapter(name)
        del lora_configs(model)[name]
        refresh_trainable(model)


@contextmanager
def disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the bare base model inside the block (merged adapters are unmerged, then merged back)."""
    was_merged = is_merged(model)
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
def per_row_adapters(model: nn.Module, names: list[str | None], expand: bool = False) -> Iterator[nn.Module]:
    """Inside the block, row i of each batch uses adapter `names[i]` (None = the bare base), in one forward.

    Semantics: model(x)[i] == (model with only names[i] active)(x[i:i+1]), saved modules (heads) included.
    Nothing is written on the model: the choice travels in a context variable (rows.py), so threads each
    inside their own block never see each other's adapters. A batch whose size is not len(names) raises
    LoraStateError; with `expand=True` a batch of k·len(names) rows is taken as `generate`'s expansion for
    num_beams / num_return_sequences k (row j uses names[j // k]). The model must be unmerged, and LoRA
    dropout is not applied per row, so training mode with dropout > 0 is refused; gradients do flow.
    """
    if not isinstance(names, list | tuple) or not all(n is None or isinstance(n, str) for n in names):
        raise LoraConfigError(f"per_row_adapters: names={names!r}; expected a list of adapter names or None")
    known = [n for n in dict.fromkeys(names) if n is not None]
    check_names(model, known)
    if is_merged(model):
        raise LoraStateError("per_row_adapters needs an unmerged model; call unmerge(model) first")
    dropping = [n for n in known if model.training and lora_configs(model)[n].dropout > 0]
    if dropping:
        raise LoraStateError(f"per_row_adapters runs without LoRA dropout, but the model is in training mode and "
                             f"adapters {dropping} have dropout > 0; call model.eval()")
    device = next(model.parameters()).device
    ids = torch.tensor([known.index(n) if n is not None else -1 for n in names], device=device)
    with adapter_rows(known, ids, expand):
        yield model


def merge(model: nn.Module) -> nn.Module:
    """W = W0 + Σ active ΔW in every LoRA layer; idempotent. Outputs are unchanged, latency is the base's.

    The original weights are kept (one copy of each adapted weight) so `unmerge` is exact in every dtype,
    and a weight tied to another module (an output head tied to the input embedding) stays as it was there.
    """
    with all_or_nothing(model):
        for _, m in lora_modules(model):
            if isinstance(m, LoraModule):
                m.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo merge: the original weights come back bit for bit; idempotent."""
    for _, m in lora_modules(model):
        if isinstance(m, LoraModule):
            m.unmerge()
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge the active adapters and replace every lorakit module by its plain base module.

    A merged weight (or a trained head copy) whose original was tied to another module is untied (that module
    keeps the original), and `model.config.tie_word_embeddings` is set False, so a saved and reloaded model
    computes the same.
    """
    with all_or_nothing(model):
        merge(model)
        originals = set()  # parameters the unloaded model no longer uses where they were (merged, or a head copy)
        for _, m in lora_modules(model):
            if isinstance(m, LoraModule) and m._unmerged:
                originals.add(id(m._unmerged[0]))
            elif isinstance(m, SavedModule) and m.unwrap() is not m.original_module:
                originals |= {id(p) for p in m.original_module.parameters()}
        for name, m in list(lora_modules(model)):
            _set_submodule(model, name, m.unwrap())
    model.__dict__.pop("_lorakit_configs", None)
    if any(id(p) in originals for p in model.parameters()):
        for cfg in (getattr(model, "config", None), getattr(getattr(model, "config", None), "text_config", None)):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False
    return model


__all__ = ["LoraConfig", "active_adapters", "combine", "delete_adapter", "disabled", "lora_modules",
           "merge", "merge_and_unload", "per_row_adapters", "set_adapter", "unmerge"]
