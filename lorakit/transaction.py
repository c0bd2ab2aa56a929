"""All-or-nothing verbs: snapshot what a verb may change, and put it all back if the verb raises.

Each verb checks, then builds, then swaps in inside `all_or_nothing(model)`. The snapshot is shallow and
cheap (dict copies per module): the module tree, parameter and buffer slots, train/eval flags, every
parameter's requires_grad, the lorakit layers' own bookkeeping (`STATE`) and the adapter configs. In-place
writes into existing tensors are the one thing a snapshot cannot see: a verb registers their undo itself.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

_CONFIGS = "_lorakit_configs"


def _take(model: nn.Module) -> tuple[list[tuple[Any, ...]], list[tuple[nn.Parameter, bool]], Any]:
    modules = []
    for m in model.modules():
        keys = dict(m._keys) if isinstance(getattr(m, "_keys", None), dict) else None  # ParameterDict's order
        state = {a: copy.copy(getattr(m, a)) for a in getattr(m, "STATE", ())}
        modules.append((m, dict(m._modules), dict(m._parameters), dict(m._buffers), m.training, keys, state))
    grads = [(p, p.requires_grad) for p in model.parameters()]
    configs = model.__dict__.get(_CONFIGS)
    return modules, grads, dict(configs) if configs is not None else None


def _restore(model: nn.Module, snapshot: tuple[list[tuple[Any, ...]], list[tuple[nn.Parameter, bool]], Any]) -> None:
    modules, grads, configs = snapshot
    for m, children, params, buffers, training, keys, state in modules:
        for slot, saved in ((m._modules, children), (m._parameters, params), (m._buffers, buffers)):
            slot.clear()
            slot.update(saved)
        if keys is not None:
            m._keys.clear()
            m._keys.update(keys)
        m.training = training
        for a, v in state.items():
            setattr(m, a, v)
    for p, flag in grads:
        p.requires_grad_(flag)
    if configs is None:
        model.__dict__.pop(_CONFIGS, None)
    else:  # in place: callers may hold the dict
        live = model.__dict__.setdefault(_CONFIGS, {})
        live.clear()
        live.update(configs)


@contextmanager
def all_or_nothing(model: nn.Module) -> Iterator[list[Callable[[], None]]]:
    """Run the block; if it raises, undo everything it changed on `model` and re-raise.

    Yields a list where the block appends undo callables for in-place tensor writes (run newest first).
    """
    snapshot = _take(model)
    undo: list[Callable[[], None]] = []
    try:
        yield undo
    except BaseException:
        for fn in reversed(undo):
            fn()
        _restore(model, snapshot)
        raise
