"""LoRA layers: wrap a frozen base layer and hold named adapters {A, B, scale}; forward, merge, unmerge.

Every layer follows one small protocol, so nothing outside needs to know layer types:
  new_factors / install   build an adapter's (A, B), then put it in (two steps: check, build, swap in)
  delta_weight(name)      ΔW in the base weight's own layout
  factor_shapes(r)        (A, B) shapes in the file's (dense) layout at rank r; `file_keys` their key suffixes
  dense_factors(name)     (A, B) in that layout; `from_dense(A, B)` folds them back into the layer's form
  combine_blocks          the independent low-rank (A, B) blocks `combine` works on; `from_blocks` inverts it
  merge / unmerge         exact: the original weight is kept while merged and put back bit for bit
The math lives in functional.py. Adapter names may hold '.', which torch refuses in parameter names:
inside the layers the key is the name with '.' written as "%2E" (`param_key`); files never carry names.
"""

from __future__ import annotations

import math
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .errors import LoraStateError
from .functional import add_low_rank_, fold_pays, lora_linear, mixed_lora_delta, table_lora_delta
from .rows import RowAdapters, current_rows

_DOT = "%2E"  # not in [A-Za-z0-9._-], so the mapping is one to one


def param_key(name: str) -> str:
    """The ParameterDict / ModuleDict key of adapter `name` ('.' is not allowed in torch's names)."""
    return name.replace(".", _DOT)


def adapter_name(key: str) -> str:
    """Inverse of `param_key`."""
    return key.replace(_DOT, ".")


def _call_base(base: nn.Module, x: Tensor) -> Tensor:
    """base(x); a plain nn.Linear as F.linear on its parameters, as the LoRA paths read them: nn.Module's call and
    attribute lookups were 2.5% of a merged SmolLM2 decode step (210 calls a token; RESULTS.md, session 15)."""
    if type(base) is nn.Linear:
        p = base._parameters
        return F.linear(x, p["weight"], p["bias"])
    return base(x)


class LoraModule(nn.Module):
    """Shared bookkeeping: the frozen `base_layer`, per-adapter A, B, r, alpha, scale, dropout."""

    a_name, b_name = "lora_A", "lora_B"  # parameter names; equal to PEFT's file keys
    file_keys = (".lora_A.weight", ".lora_B.weight")  # key suffixes in adapter_model.safetensors
    STATE = ("r", "alpha", "scale", "dropout", "active", "merged", "disabled", "_unmerged")  # plain attributes

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.check_base(base_layer)
        self.base_layer = base_layer
        setattr(self, self.a_name, nn.ParameterDict())
        setattr(self, self.b_name, nn.ParameterDict())
        # Per adapter name: r (int), alpha, scale, dropout (float); the active and the merged names, in order.
        self.r, self.alpha, self.scale, self.dropout = {}, {}, {}, {}
        self.active, self.merged = [], []
        self.disabled = False
        self._unmerged: tuple[nn.Parameter, ...] = ()  # while merged: the original weight Parameter

    @classmethod
    def check_base(cls, base_layer: nn.Module) -> None:
        """Raise LoraConfigError if this layer type cannot wrap `base_layer`."""

    def __getattr__(self, name: str):
        # Callers (transformers' weight tying, GPT-2's `nf`) read attributes of the wrapped layer.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)

    # -- adapter bookkeeping -------------------------------------------------------------------
    def A(self, name: str) -> nn.Parameter:
        return getattr(self, self.a_name)[param_key(name)]

    def B(self, name: str) -> nn.Parameter:
        return getattr(self, self.b_name)[param_key(name)]

    @property
    def adapter_names(self) -> list[str]:
        return [adapter_name(k) for k in getattr(self, self.a_name).keys()]

    def adapter_params(self, name: str) -> list[nn.Parameter]:
        """The trainable tensors of one adapter (declared, never found by substring)."""
        return [self.A(name), self.B(name)]

    def adapter_dtype(self, fp32_adapters: bool = True) -> torch.dtype:
        """fp32 when the base is 16-bit and `fp32_adapters` (PEFT's autocast_adapter_dtype), else the base's."""
        w = self.base_weight()
        if not w.dtype.is_floating_point or (fp32_adapters and w.dtype in (torch.float16, torch.bfloat16)):
            return torch.float32
        return w.dtype

    def new_factors(self, r: int, init: str, dtype: torch.dtype | None = None) -> tuple[Tensor, Tensor]:
        """A fresh (A, B) in the layer's form, initialised so the layer's output is unchanged (B·A = 0)."""
        a_shape, b_shape = self.layer_shapes(r)
        w = self.base_weight()
        A, B = (torch.empty(s, dtype=dtype or self.adapter_dtype(), device=w.device) for s in (a_shape, b_shape))
        self._init_factors(A, B, r, init)
        return A, B

    def layer_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(A, B) shapes as the layer holds them (equal to `factor_shapes` except for per-slice layers)."""
        return self.factor_shapes(r)

    def install(self, name: str, A: Tensor, B: Tensor, r: int, alpha: float, dropout: float,
                use_rslora: bool = False, trainable: bool = True) -> None:
        """Put a built adapter in (no checks left to fail but the name's)."""
        key = param_key(name)
        getattr(self, self.a_name)[key] = nn.Parameter(A, requires_grad=trainable)
        getattr(self, self.b_name)[key] = nn.Parameter(B, requires_grad=trainable)
        self.r[name], self.alpha[name], self.dropout[name] = r, alpha, dropout
        self.scale[name] = alpha / math.sqrt(r) if use_rslora else alpha / r

    def add_adapter(self, name: str, r: int, alpha: float, dropout: float, init: str,
                    use_rslora: bool = False, dtype: torch.dtype | None = None) -> None:
        """Create A and B (B·A = 0, so the output is unchanged at init) and install them."""
        self.install(name, *self.new_factors(r, init, dtype), r, alpha, dropout, use_rslora)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise LoraStateError(f"adapter {name!r} is merged into {type(self.base_layer).__name__}; "
                                 "call unmerge(model) before deleting it")
        for d in (getattr(self, self.a_name), getattr(self, self.b_name)):
            del d[param_key(name)]
        for d in (self.r, self.alpha, self.scale, self.dropout, self.__dict__.get("_bt", {})):
            d.pop(name, None)
        self.active = [a for a in self.active if a != name]

    def _init_factors(self, A: Tensor, B: Tensor, r: int, init: str) -> None:
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(A, std=1.0 / r)
            else:  # PEFT's and nn.Linear's default
                nn.init.kaiming_uniform_(A, a=math.sqrt(5))
            nn.init.zeros_(B)

    def base_weight(self) -> Tensor:
        return self.base_layer.weight

    # -- the file's layout and combine's matrix layout -----------------------------------------------
    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        raise NotImplementedError

    def dense_factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(A, B) in the file's layout, with ΔW = scale·B·A."""
        return self.A(name), self.B(name)

    def from_dense(self, A: Tensor, B: Tensor) -> tuple[Tensor, Tensor, int]:
        """File-layout (A, B) -> the layer's form and its rank; LoraConfigError if they do not fit."""
        return A, B, A.shape[0]

    def combine_blocks(self, name: str) -> list[tuple[Tensor, Tensor]]:
        """The independent low-rank blocks `combine` works on: one (A, B) here, one per slice for fused layers."""
        return [(self.A(name), self.B(name))]

    def from_blocks(self, blocks: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, int]:
        """Inverse of `combine_blocks`: the layer's (A, B) and rank."""
        (A, B), = blocks
        return A, B, A.shape[0]

    # -- merge ---------------------------------------------------------------------------------
    def merge(self) -> None:
        """W = W0 + Σ ΔW over the active adapters (idempotent). W0's Parameter is kept, so unmerge is exact
        and a weight tied to another module (an output head) keeps its value there."""
        todo = [n for n in self.active if n not in self.merged]
        if not todo:
            return
        if not self.base_weight().is_floating_point():
            raise LoraStateError("a quantized base layer (int8/int4, lorakit.quant) cannot take a merged "
                                 "adapter; serve it unmerged")
        if not self._unmerged:
            self._unmerged = (self.base_layer.weight,)
        w0 = self._unmerged[0]
        with torch.no_grad():
            total = w0.float()
            for n in self.merged + todo:
                total = total + self.delta_weight(n).float()
            self.base_layer.weight = nn.Parameter(total.to(w0.dtype), requires_grad=False)
        self.merged += todo

    def unmerge(self) -> None:
        """Put the original weight Parameter back, bit for bit (idempotent)."""
        if self._unmerged:
            self.base_layer.weight = self._unmerged[0]
        self._unmerged, self.merged = (), []

    def _apply(self, fn, recurse: bool = True):
        # .to(device / dtype) while merged also moves the kept original weight.
        super()._apply(fn, recurse)
        if self._unmerged:
            with torch.no_grad():
                self._unmerged[0].data = fn(self._unmerged[0].data)
        return self

    def _check_not_training_merged(self) -> None:
        if self.merged and self.training and torch.is_grad_enabled() and any(p.requires_grad for n in self.merged
                                                                              for p in self.adapter_params(n)):
            raise LoraStateError(f"adapters {self.merged} are merged into the base weights, so training them "
                                 "would update nothing; call unmerge(model) before training")

    def _use_base_only(self) -> bool:
        self._check_not_training_merged()
        return self.disabled or not self.active or bool(self.merged)

    def _row_groups(self, rows: RowAdapters, batch: int) -> list[tuple[str, Tensor]]:
        """This layer's (adapter, row indices) for a per-row batch; checks state and shapes."""
        params = self._modules[self.a_name]._parameters  # read once: this runs per layer, per adapter in the batch
        groups = [(n, idx) for n, idx in rows.groups(batch) if param_key(n) in params]
        if groups and self.merged:
            raise LoraStateError(f"per-row adapters on a merged model would count {self.merged} twice; "
                                 "call unmerge(model) first")
        if groups and self.training and any(self.dropout[n] for n, _ in groups):
            raise LoraStateError("per-row adapters run without LoRA dropout; call model.eval() (adapters "
                                 f"{[n for n, _ in groups if self.dropout[n]]} have dropout > 0)")
        return groups

    def _refuse_rows(self) -> bool:
        rows = current_rows()
        if rows is None or self.disabled:
            return False
        if any(param_key(n) in getattr(self, self.a_name) for n in rows.names):
            raise LoraStateError(f"per-row adapters work on Linear layers only, not {type(self.base_layer).__name__}; "
                                 "leave embeddings and convolutions out of the targets to serve mixed batches")
        return True

    def unwrap(self) -> nn.Module:
        """The base layer, with whatever is merged into it."""
        return self.base_layer

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scale={self.scale[n]:g}" for n in self.adapter_names)


class LoraLinear(LoraModule):
    """y = x·W0ᵀ + b + (α/r)·B·A·drop(x); A: (r, in), B: (out, r).

    Also wraps transformers' Conv1D (GPT-2; weight stored (in, out), `fan_in_fan_out=True`).
    """

    def __init__(self, base_layer: nn.Module, fan_in_fan_out: bool = False) -> None:
        super().__init__(base_layer)
        self.fan_in_fan_out = fan_in_fan_out
        self._bt: dict[str, tuple] = {}  # adapter name -> (weakref to B, B's data pointer and version, Bᵀ contiguous)
        if hasattr(base_layer, "in_features"):  # nn.Linear and lorakit.quant's layers (int4 packs two weights a byte)
            self.out_features, self.in_features = base_layer.out_features, base_layer.in_features
        else:  # transformers' Conv1D: weight (in, out)
            shape = base_layer.weight.shape
            self.out_features, self.in_features = (shape[1], shape[0]) if fan_in_fan_out else shape

    def factor_shapes(self, r: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return (r, self.in_features), (self.out_features, r)

    def weight_out_in(self) -> Tensor:
        """W0 as (out, in), a view for Conv1D."""
        w = self.base_layer.weight
        return w.t() if self.fan_in_fan_out else w

    def delta_weight(self, name: str) -> Tensor:
        A, B = self.dense_factors(name)
        delta = (B @ A) * self.scale[name]  # (out, in)
        return delta.t() if self.fan_in_fan_out else delta

    _train_plan = None  # a train_plan's entry for this layer, set in the instance while the plan runs

    def forward(self, x: Tensor) -> Tensor:
        # Runs once per adapted layer per decoded token (210 times a token on SmolLM2 all-linear), so it reads
        # each attribute once: at batch 1 the Python here costs as much as the rank-r arithmetic.
        base = self._modules["base_layer"]
        if self.disabled:
            return _call_base(base, x)
        if self.merged and not self.training and current_rows() is None:  # W0+ΔW merged (in eval, no per-row
            return _call_base(base, x)  # choice): the base layer's product alone; training one is refused below
        if self._train_plan is not None and torch.is_grad_enabled() and (y := self._train_plan(x)) is not None:
            return y  # a train_plan entry checks every member's state itself (disabled, merged, active, dropout)
        rows = current_rows()
        if rows is not None:  # merged too: _row_groups refuses adapters counted twice
            return self._forward_rows(x, rows)
        if len(self.active) == 1 and not self.merged and not torch.is_grad_enabled():
            y = self._infer_one(x, base)
            if y is not None:
                return y
        if self._use_base_only():
            return base(x)
        w = base.weight
        drops = {self.dropout[n] for n in self.active}
        if len(drops) == 1 and w.is_floating_point():  # not on a quantized base (lorakit.quant)
            A, B, s = self._stacked_factors()
            return lora_linear(x, w.t() if self.fan_in_fan_out else w, base.bias, A, B, s, drops.pop(),
                               self.training)
        out = base(x)
        # No gradient (serving an int8 base): add each delta in place with one addmm, as lora_linear's decode path.
        in_place = not torch.is_grad_enabled() and out.dtype == x.dtype and out.is_contiguous()
        for n in self.active:  # adapters with different dropout (or an int8 base): one delta each
            A, B = (t if t.dtype == x.dtype else t.to(x.dtype) for t in self.dense_factors(n))
            h = F.linear(F.dropout(x, self.dropout[n], True) if self.training and self.dropout[n] else x, A)
            if in_place:
                add_low_rank_(out, h, B, self.scale[n])
            else:
                out = out + F.linear(h, B) * self.scale[n]
        return out

    def _infer_one(self, x: Tensor, base: nn.Module) -> Tensor | None:
        """Inference with one adapter (decoding: 210 calls a token on SmolLM2 all-linear): lora_linear's decode path
        with nothing in between — its generic checks and the accessors were ~10 µs a call. None where it does not
        apply (not CPU, autocast, dropout in training mode, or enough rows that lora_linear folds B·A into W)."""
        name = self.active[0]
        if x.device.type != "cpu" or torch.is_autocast_enabled("cpu") or (self.training and self.dropout[name]):
            return None
        w = base.weight
        if w.dtype == x.dtype and not fold_pays(x.numel() // x.shape[-1], self.out_features, self.in_features):
            y = F.linear(x, w.t() if self.fan_in_fan_out else w, base.bias)
        elif not w.is_floating_point():  # a quantized base (lorakit.quant): its own kernel
            y = base(x)
        else:
            return None
        A, B = self._factors_of(name)
        # fp32 adapters on a 16-bit base compute in x's dtype, as lora_linear does (guarded: a no-op .to still
        # costs a dispatch, and this runs 210 times a decoded token)
        if A.dtype != x.dtype:
            A = A.to(x.dtype)
        if y.dtype == x.dtype and y.is_contiguous():
            y.view(-1, y.shape[-1]).addmm_(F.linear(x, A).view(-1, A.shape[0]), self._b_t(name, B, x.dtype),
                                           alpha=self.scale[name])
            return y
        return y + F.linear(F.linear(x, A), B.to(x.dtype)).to(y.dtype) * self.scale[name]

    def _forward_rows(self, x: Tensor, rows: RowAdapters) -> Tensor:
        # One batch, one adapter per row: base for all rows + each adapter's delta on its rows only:
        # out[rows_k] += s_k·x[rows_k]·A_kᵀ·B_kᵀ, per adapter present, computed in fp32 on a 16-bit or int8 base
        # and added in it (as PEFT). At decode with slot tables the factors are read in place (row_tables.py);
        # otherwise functional.mixed_lora_delta chooses its kernel (loop or stacked ranks).
        if rows.uniform and not self.merged and not self.training:  # one choice for every row: no grouping
            out = self._modules["base_layer"](x)
            factors = None if rows.only is None else self._factors_of(rows.only)
            if factors is None:  # the base, or an adapter that skips this layer
                return out
            A, B = factors
            if A.dtype == x.dtype == out.dtype and out.is_contiguous():  # fp32: lora_linear's decode path
                return add_low_rank_(out, F.linear(x, A), B, self.scale[rows.only])
            return (out.float() + F.linear(F.linear(x.float(), A.float()), B.float()) * self.scale[rows.only]
                    ).to(out.dtype)
        groups = self._row_groups(rows, x.shape[0])
        out = self.base_layer(x)
        if not groups:
            return out
        table, dt = rows.table(self, x), torch.promote_types(x.dtype, torch.float32)
        if table is not None:
            delta = table_lora_delta(x, *table)
        else:
            factors = [(idx, *(t if t.dtype == dt else t.to(dt) for t in self._factors_of(n)), self.scale[n])
                       for n, idx in groups]
            if out.dtype == dt and x.dtype == dt and out.is_contiguous():  # fp32: added into the base output in place
                return mixed_lora_delta(x, factors, out)
            delta = mixed_lora_delta(x.to(dt), factors)
        return (out.to(delta.dtype) + delta).to(out.dtype)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_bt"] = {}  # a cache of weak references: rebuilt on use, never pickled
        state.pop("_train_plan", None)  # a running training or decode plan's entry belongs to it, not a copy
        from .decode_plan import PlanEntry  # here: decode_plan imports this module

        if isinstance(state.get("forward"), PlanEntry):
            del state["forward"]
        return state

    def _b_t(self, name: str, B: Tensor, dtype: torch.dtype) -> Tensor:
        """Bᵀ in `dtype` as a contiguous (r, out) tensor, kept while B is the same tensor with the same data (weak
        reference, data pointer, in-place version: any change of B is a miss). addmm_ reads a transposed B ~2× slower
        at decode (one row, 2 threads: 7.3 vs 4.1 µs for 576 outputs, 19.4 vs 7.5 µs for 1536). Inference fast path
        only; a 16-bit base with fp32 adapters keeps it in its dtype rather than casting B on every call."""
        if torch.compiler.is_compiling():  # a traced graph cannot guard on data pointers: it would break at every
            return B.t().to(dtype).contiguous()  # layer once an eager call had filled the cache (tests/test_layers)
        hit, key = self._bt.get(name), (B.data_ptr(), B._version, dtype)
        if hit is not None and hit[0]() is B and hit[1] == key:
            return hit[2]
        bt = B.detach().t().to(dtype).contiguous()
        self._bt[name] = (weakref.ref(B), key, bt)
        return bt

    def _factors_of(self, name: str) -> tuple[Tensor, Tensor] | None:
        """`dense_factors(name)`, or None where adapter `name` skips this layer; read straight from the parameter
        dicts (it runs in every adapted layer of every decode step)."""
        key = param_key(name)
        A = self._modules[self.a_name]._parameters.get(key)
        return None if A is None else (A, self._modules[self.b_name]._parameters[key])

    def _stacked_factors(self) -> tuple[Tensor, Tensor, float]:
        # Several active adapters: Σ sᵢ·Bᵢ·Aᵢ = [s₁B₁ … sₖBₖ]·[A₁; …; Aₖ], one rank-Σr update.
        if len(self.active) == 1:
            A, B = self.dense_factors(self.active[0])
            return A, B, self.scale[self.active[0]]
        pairs = [self.dense_factors(n) for n in self.active]
        A = torch.cat([a for a, _ in pairs], 0)
        B = torch.cat([b * self.scale[n] for (_, b), n in zip(pairs, self.active, strict=True)], 1)
        return A, B, 1.0

