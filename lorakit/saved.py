"""SavedModule: a module trained in full as one copy per adapter (a classifier head), PEFT's modules_to_save."""

from __future__ import annotations

from copy import deepcopy

from torch import nn

from .layers import adapter_name, param_key
from .rows import current_rows


class SavedModule(nn.Module):
    """A module trained in full, one copy per adapter (e.g. a classifier head); the original stays frozen."""

    STATE = ("active", "disabled")

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original_module"), name)

    @property
    def adapter_names(self) -> list[str]:
        return [adapter_name(k) for k in self.modules_to_save.keys()]

    def copy(self, name: str) -> nn.Module:
        return self.modules_to_save[param_key(name)]

    def new_copy(self, trainable: bool = True) -> nn.Module:
        """A trainable copy of the original (build step; nothing installed)."""
        copy = deepcopy(self.original_module)
        for p in copy.parameters():
            p.requires_grad_(trainable)
        return copy

    def install(self, name: str, copy: nn.Module) -> None:
        self.modules_to_save[param_key(name)] = copy

    def add_adapter(self, name: str) -> None:
        self.install(name, self.new_copy())

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[param_key(name)]
        self.active = [a for a in self.active if a != name]

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        return list(self.copy(name).parameters())

    def current(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        if not self.disabled:
            for n in self.active:
                if param_key(n) in self.modules_to_save:
                    return self.copy(n)
        return self.original_module

    def forward(self, *args, **kwargs):
        rows = current_rows()
        if rows is None or self.disabled:
            return self.current()(*args, **kwargs)
        # per-row adapters: every row goes through its adapter's copy (or the original); args[0] is batch-first
        x, rest = args[0], args[1:]
        out = self.original_module(x, *rest, **kwargs)
        for n, idx in rows.groups(x.shape[0]):
            if param_key(n) in self.modules_to_save:
                out = out.index_copy(0, idx, self.copy(n)(x.index_select(0, idx), *rest, **kwargs))
        return out

    def unwrap(self) -> nn.Module:
        return self.current()
