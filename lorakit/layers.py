"""LoRA layers: wrap a frozen base layer and hold named adapters {A, B, scale}; forward, merge, unmerge.

Every layer follows one small protocol: `add_adapter`, `delta_weight(name)` (ΔW in the base weight's
own layout), `forward`, `merge` / `unmerge`, `adapter_params(name)`. The math lives in functional.py.
"""

from __future__ import annotations

import math
from copy import deepcopy

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraConfigError, LoraStateError
from .functional import lora_linear, mixed_lora_delta


class LoraModule(nn.Module):
    """Shared bookkeeping: the frozen `base_layer`, per-adapter A, B, r, alpha, scale, dropout."""

    a_name, b_name = "lora_A", "lora_B"  # parameter names; equal to PEFT's file keys

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        setattr(self, self.a_name, nn.ParameterDict())
        setattr(self, self.b_name, nn.ParameterDict())
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scale: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.disabled = False
        self.row_adapters: tuple[list[str], Tensor] | None = None  # (names, per-row ids); see per_row_adapters

    def __getattr__(self, name: str):
        # Callers (transformers' weight tying, GPT-2's `nf`) read attributes of the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    # -- adapter bookkeeping -------------------------------------------------------------------
    def A(self, name: str) -> nn.Parameter:
        return getattr(self, self.a_name)[name]

    def B(self, name: str) -> nn.Parameter:
        return getattr(self, self.b_name)[name]

    @property
    def adapter_names(self) -> list[str]:
        return list(getattr(self, self.a_name).keys())

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of one adapter (declared, never found by substring)."""
        return [self.A(name), self.B(name)]

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: str,
                    use_rslora: bool = False) -> None:
        """Create A (r×in) and B (out×r, zero) so the layer's output is unchanged at init."""
        A, B = self._new_factors(r)
        self._init_factors(A, B, r, init)
        getattr(self, self.a_name)[name] = nn.Parameter(A)
        getattr(self, self.b_name)[name] = nn.Parameter(B)
        self.r[name], self.alpha[name], self.dropout[name] = r, alpha, dropout
        self.scale[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise LoraStateError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; "
                                 "call unmerge(model) before deleting it")
        for d in (getattr(self, self.a_name), getattr(self, self.b_name)):
            del d[name]
        for d in (self.r, self.alpha, self.scale, self.dropout):
            d.pop(name, None)
        self.active = [a for a in self.active if a != name]

    def _init_factors(self, A: Tensor, B: Tensor, r: int, init: str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
            else:  # PEFT's and nn.Linear's default
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def _param_like(self, *shape: int) -> Tensor:
        w = self.base_weight()
        dtype = w.dtype if w.dtype.is_floating_point else torch.float32
        return torch.empty(*shape, dtype=dtype, device=w.device)

    def base_weight(self) -> Tensor:
        return self.base_layer.weight

    # -- merge ---------------------------------------------------------------------------------
    def merge(self) -> None:
        """W0 += ΔW for every active adapter not yet merged (idempotent)."""
        for name in self.active:
            if name not in self.merged:
                self._add_to_weight(self.delta_weight(name), +1)
                self.merged.append(name)

    def unmerge(self) -> None:
        """W0 -= ΔW for every merged adapter (idempotent); computed in fp32."""
        while self.merged:
            self._add_to_weight(self.delta_weight(self.merged.pop()), -1)

    @torch.no_grad()
    def _add_to_weight(self, delta: Tensor, sign: int) -> None:
        w = self.base_weight()
        w.copy_((w.float() + sign * delta.float()).to(w.dtype))

    def _check_not_training_merged(self) -> None:
        if self.merged and self.training and torch.is_grad_enabled() and any(
            p.requires_grad for n in self.merged for p in self.adapter_params(n)
        ):
            raise LoraStateError(f"adapters {self.merged} are merged into the base weights, so training them "
                                 "would update nothing; call unmerge(model) before training")

    def _use_base_only(self) -> bool:
        self._check_not_training_merged()
        return self.disabled or not self.active or bool(self.merged)

    def _refuse_rows(self) -> None:
        if self.row_adapters is not None and not self.disabled:
            raise LoraStateError(f"per-row adapters work on Linear layers only, not {type(self.base_layer).__name__}; "
                                 "leave embeddings and convolutions out of the targets to serve mixed batches")

    def unwrap(self) -> nn.Module:
        """The base layer, with whatever is merged into it."""
        return self.base_layer

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scale={self.scale[n]:g}" for n in self.adapter_names)


class LoraLinear(LoraModule):
    """y = x·W0ᵀ + b + (α/r)·B·A·drop(x); A: (r, in), B: (out, r).

    Also wraps transformers' Conv1D (GPT-2; weight stored (in, out), `fan_in_fan_out=True`) and fused
    projections adapted per output slice (`slices=[True, False, True]` adapts q and v of a fused qkv
    only): then A is (r·k, in) and B is (out/n·k, r) for k enabled of n slices, as in loralib.
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False,
                 slices: list[bool] | None = None) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        w = base_layer.weight
        self.out_features, self.in_features = (w.shape[1], w.shape[0]) if fan_in_fan_out else w.shape
        if slices is not None and self.out_features % len(slices):
            raise LoraConfigError(f"slices={slices}: {self.out_features} output features do not split into "
                                  f"{len(slices)} equal slices; use a divisor of {self.out_features}")
        self.slices = list(slices) if slices is not None and not all(slices) else None

    def _new_factors(self, r: int) -> tuple[Tensor, Tensor]:
        if self.slices is None:
            return self._param_like(r, self.in_features), self._param_like(self.out_features, r)
        k, size = sum(self.slices), self.out_features // len(self.slices)
        return self._param_like(r * k, self.in_features), self._param_like(size * k, r)

    def weight_out_in(self) -> Tensor:
        """W0 as (out, in), a view for Conv1D."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def slice_factors(self, name: str) -> list[tuple[Tensor, Tensor]]:
        """Per enabled output slice, its own (Aᵢ (r, in), Bᵢ (out/n, r)): views into the stacked A and B."""
        A, B = self.A(name), self.B(name)
        r, size = self.r[name], self.out_features // len(self.slices)
        return [(A[i * r:(i + 1) * r], B[i * size:(i + 1) * size]) for i in range(sum(self.slices))]

    def dense_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) with ΔW = scale·B·A as plain (r', in) and (out, r'); fused slices become block-sparse B."""
        A, B = self.A(name), self.B(name)
        if self.slices is None:
            return A, B
        r, size = self.r[name], self.out_features // len(self.slices)
        full = B.new_zeros(self.out_features, A.shape[0])  # (out, r·k)
        on = [j for j, enabled in enumerate(self.slices) if enabled]
        for i, (j, (_, Bi)) in enumerate(zip(on, self.slice_factors(name), strict=True)):
            full[j * size:(j + 1) * size, i * r:(i + 1) * r] = Bi
        return A, full

    def delta_weight(self, name: str) -> Tensor:
        A, B = self.dense_factors(name)
        delta = (B @ A) * self.scale[name]  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    def forward(self, x: Tensor) -> Tensor:
        if self.row_adapters is not None and not self.disabled:
            return self._forward_rows(x)
        if self._use_base_only():
            return self.base_layer(x)
        bias = self.base_layer.bias
        drops = {self.dropout[n] for n in self.active}
        if len(self.active) == 1 or len(drops) == 1:
            A, B, s = self._stacked_factors()
            return lora_linear(x, self.weight_out_in(), bias, A, B, s, drops.pop(), self.training)
        out = self.base_layer(x)
        for n in self.active:  # adapters with different dropout: one delta each
            A, B = self.dense_factors(n)
            xd = F.dropout(x, self.dropout[n], self.training)
            out = out + F.linear(F.linear(xd, A), B) * self.scale[n]
        return out

    def _forward_rows(self, x: Tensor) -> Tensor:
        # One batch, one adapter per row: base for all rows + each adapter's delta on its rows only.
        names, ids = self.row_adapters
        present = [n for n in names if n in self.adapter_names]
        remap = torch.tensor([present.index(n) if n in present else -1 for n in names] + [-1], device=ids.device)
        pairs = [self.dense_factors(n) for n in present]
        delta = mixed_lora_delta(x, remap[ids], [a for a, _ in pairs], [b for _, b in pairs],
                                 [self.scale[n] for n in present]) if present else 0
        return self.base_layer(x) + delta

    def _stacked_factors(self) -> tuple[Tensor, Tensor, float]:
        # Several active adapters: Σ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … sₖBₖ]·[A₁; …; Aₖ], one rank-Σr update.
        if len(self.active) == 1:
            A, B = self.dense_factors(self.active[0])
            return A, B, self.scale[self.active[0]]
        pairs = [self.dense_factors(n) for n in self.active]
        A = torch.cat([a for a, _ in pairs], 0)
        B = torch.cat([b * self.scale[n] for (_, b), n in zip(pairs, self.active, strict=True)], 1)
        return A, B, 1.0


class LoraEmbedding(LoraModule):
    """y = E0[x] + (α/r)·(Aᵀ[x])·Bᵀ; A: (r, num_embeddings), B: (dim, r). A starts at 0, B ~ N(0, 1)."""

    a_name, b_name = "lora_embedding_A", "lora_embedding_B"  # PEFT's names for embeddings

    def _new_factors(self, r: int) -> tuple[Tensor, Tensor]:
        num, dim = self.base_layer.weight.shape
        return self._param_like(r, num), self._param_like(dim, r)

    def _init_factors(self, A: Tensor, B: Tensor, r: int, init: str) -> None:
        with torch.no_grad():  # as loralib and PEFT: the zero factor is A here
            nn.init.zeros_(A)
            nn.init.normal_(B)

    def delta_weight(self, name: str) -> Tensor:
        return (self.B(name) @ self.A(name)).t() * self.scale[name]  # (num, dim)

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        self._refuse_rows()
        if self._use_base_only():
            return out
        e = self.base_layer
        for n in self.active:
            after_a = F.embedding(x, self.A(n).t(), e.padding_idx, e.max_norm, e.norm_type,
                                  e.scale_grad_by_freq, e.sparse)  # (..., r)
            out = out + (after_a @ self.B(n).t()) * self.scale[n]
        return out


class LoraConv(LoraModule):
    """y = conv(x, W0) + (α/r)·conv₁ₓ₁(conv(drop(x), A), B); A: (r, in, *k), B: (out, r, 1, ...)."""

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1 or base_layer.padding_mode != "zeros":
            raise LoraConfigError(f"{base_layer}: LoRA supports convolutions with groups=1 and "
                                  "padding_mode='zeros'; exclude this module from targets")
        self.conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[base_layer.weight.dim() - 2]

    def _new_factors(self, r: int) -> tuple[Tensor, Tensor]:
        out, inp, *kernel = self.base_layer.weight.shape
        return self._param_like(r, inp, *kernel), self._param_like(out, r, *([1] * len(kernel)))

    def delta_weight(self, name: str) -> Tensor:
        A, B = self.A(name), self.B(name)
        delta = B.flatten(1) @ A.flatten(1)  # (out, in·k…)
        return delta.view(self.base_layer.weight.shape) * self.scale[name]

    def forward(self, x: Tensor) -> Tensor:
        out = self.base_layer(x)
        self._refuse_rows()
        if self._use_base_only():
            return out
        c = self.base_layer
        for n in self.active:
            xd = F.dropout(x, self.dropout[n], self.training) if self.dropout[n] else x
            h = self.conv(xd, self.A(n), None, c.stride, c.padding, c.dilation)
            out = out + self.conv(h, self.B(n)) * self.scale[n]
        return out


class SavedModule(nn.Module):
    """A module trained in full, one copy per adapter (e.g. a classifier head); the original stays frozen."""

    def __init__(self, original_module: nn.Module) -> None:
        super().__init__()
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.active: list[str] = []
        self.disabled = False
        self.row_adapters: tuple[list[str], Tensor] | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("original_module"), name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.modules_to_save.keys())

    def add_adapter(self, name: str) -> None:
        copy = deepcopy(self.original_module)
        for p in copy.parameters():
            p.requires_grad_(True)
        self.modules_to_save[name] = copy

    def delete_adapter(self, name: str) -> None:
        del self.modules_to_save[name]
        self.active = [a for a in self.active if a != name]

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        return list(self.modules_to_save[name].parameters())

    def current(self) -> nn.Module:
        """The copy of the first active adapter that has one, else the original."""
        if not self.disabled:
            for n in self.active:
                if n in self.modules_to_save:
                    return self.modules_to_save[n]
        return self.original_module

    def forward(self, *args, **kwargs):
        if self.row_adapters is None or self.disabled:
            return self.current()(*args, **kwargs)
        # per-row adapters: every row goes through its adapter's copy (or the original); args[0] is batch-first
        names, ids = self.row_adapters
        x, rest = args[0], args[1:]
        out = self.original_module(x, *rest, **kwargs).clone()
        for k, n in enumerate(names):
            rows = (ids == k).nonzero(as_tuple=True)[0]
            if rows.numel() and n in self.modules_to_save:
                out[rows] = self.modules_to_save[n](x[rows], *rest, **kwargs)
        return out

    def unwrap(self) -> nn.Module:
        return self.current()
