"""A decode plan: an unmerged adapter's LoRA terms, fused across the adapted layers that read the same input.

At batch 1 an unmerged adapter costs the number of steps in each adapted layer, not its FLOPs (benchmarks/RESULTS.md,
session 9): on SmolLM2 all-linear, two small GEMMs and ~15 state checks in each of 210 layers a token made decoding
1.19x the base. Inside `decode_plan(model)` (lorakit.generate enters it around transformers' generate), the adapted
layers of one block that read the same input (q/k/v, gate/up: the groups vLLM and llama.cpp pack) form a group:

    D  = (x·[A₁; …; Aₖ]ᵀ)·blockdiag(s₁B₁ᵀ, …, sₖBₖᵀ) + [b₁ … bₖ]    two small GEMMs per group, in its first layer
    yᵢ = x·Wᵢᵀ + D[:, columns of layer i]                            one addmm per layer, in place of the base's mm

With more rows (a prefill) the group shares only h = x·[A₁; …; Aₖ]ᵀ and each layer adds its own hᵢ·sᵢBᵢᵀ to x·Wᵢᵀ in
place: a group-wide D, fresh at every call, is as large as the layers' outputs and made a prefill fault pages.
In a decode step (up to FEW_ROWS rows) D is written into per-thread buffers whose column views, shaped as x, each
layer reads as the bias of one product: no reshape, slice or view per call (1.13-1.15x -> 1.10-1.12x a step at
batch 1, session 12; batch 8 since session 16); at one row that product is a baddbmm, which ran ~2% faster than
F.linear here. Each layer's entry is set as its `forward` for the plan's duration, so a call runs the entry instead
of LoraLinear.forward and then the entry (-0.8% of a step; benchmarks/RESULTS.md, session 16). Every state check
(active adapter, dropout, dtypes) is done once, on entry, where the factors are copied; a call checks only what can
differ between forwards: grad mode, the layer's disabled and merged flags and torch.compile tracing in every layer;
x's dtype, a per-row adapter context and autocast in a group's first layer, whose later layers check only that x is
the very tensor (and, outside inference_mode, the same version) it planned for. Anything else runs LoraLinear.forward,
the layer's own path. The model must not change inside the plan (lorakit's rule for a served model); on exit every
layer is as it was, and nothing refers to the plan's tensors.

`decode_plan(model, adapter)` plans a named adapter instead of the active one, for forwards inside a per-row context
where every row uses it; the server keeps such entries per adapter load version and sets them around each decode
step under one adapter (`installed`, lorakit/serve/step_plans.py).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .functional import spans
from .layers import LoraLinear
from .rows import current_rows
from .shared_input import input_groups, set_on_layers, version


class _Group:
    """The stacked factors of layers that read one input; `last` = (x, x's version, h (more rows) or D's column views
    for each member (few rows)) of the latest first call, until the group's last layer has read it."""

    __slots__ = ("a_t", "b", "bias", "cols", "last", "local", "ranks", "shared")

    def __init__(self, members: list[LoraLinear], name: str) -> None:
        w = members[0].weight_out_in()
        a, b = [], []
        for m in members:
            A, B = m.dense_factors(name)
            a.append(A.detach().to(w.dtype))
            b.append((B.detach() * m.scale[name]).to(w.dtype).t())
        self.a_t = torch.cat(a).t()  # (in, Σr): a view of the contiguous (Σr, in), as F.linear reads a weight
        self.b = torch.block_diag(*b).contiguous()  # (Σr, Σout) contiguous: addmm reads a transposed B ~2x slower
        self.bias = None  # [b₁ … bₖ], zeros for a member without a bias, where any member has one
        if any(m.base_layer.bias is not None for m in members):
            self.bias = torch.cat([m.base_layer.bias.detach() if m.base_layer.bias is not None
                                   else torch.zeros(m.out_features, dtype=w.dtype, device=w.device) for m in members])
        self.cols = spans([m.out_features for m in members])  # each member's columns of D
        self.ranks = spans([A.shape[0] for A in a])  # each member's columns of h = x·[A₁; …; Aₖ]ᵀ
        self.shared = len(members) > 1
        self.last: tuple[Tensor, int, object] | None = None
        self.local = threading.local()  # per thread: `bufs` for calls with few rows (see `new_buffers`)

    def new_buffers(self, shape: torch.Size) -> tuple:
        """This thread's new (shape, h, D, each member's columns of D viewed in x's shape) for calls with x of `shape`.

        A decode step is one row a sequence: there, slicing D and reshaping x and y per layer cost as much as the LoRA
        arithmetic (benchmarks/RESULTS.md, sessions 12 and 16). Written in place by the first layer and read as each
        layer's bias before the thread's next call, so the views are built once per shape; per thread, because a
        concurrent forward on another thread would overwrite D between a first layer and its followers. One shape is
        kept (decode steps repeat theirs); at most FEW_ROWS rows, so a long prefill never leaves its D behind."""
        rows = shape.numel() // shape[-1]
        with torch.inference_mode(False):  # writable inside and outside inference_mode alike
            h = self.a_t.new_empty(rows, self.a_t.shape[1])
            d = self.b.new_empty(rows, self.b.shape[1])
        nd = d.view(*shape[:-1], d.shape[1])
        self.local.bufs = (shape, h, d, tuple(nd[..., lo:hi] for lo, hi in self.cols))
        return self.local.bufs


FEW_ROWS = 16  # calls with up to this many rows (decode steps of up to 16 sequences) write D into per-thread buffers


class PlanEntry:
    """One layer's part of a plan for adapter `name`, installed as the layer's `forward` while the plan runs: its
    group, its columns of D and of h, its block of the group's B, and views of W: (1, in, out) for baddbmm (one row),
    (out, in) for F.linear (up to FEW_ROWS rows), (in, out) for mm (more). In place of `forward`, not called from it,
    it saves the wrapper's own frame and checks at every call."""

    __slots__ = ("layer", "name", "group", "lead", "i", "lo", "hi", "r0", "r1", "w", "w_t", "w_b", "b", "bias", "dtype",
                 "in_features", "few", "tail")

    def __init__(self, name: str, group: _Group, i: int, layer: LoraLinear) -> None:
        self.layer, self.name, self.group, self.lead, self.i = layer, name, group, i == 0, i
        self.tail = group.shared and i == len(group.cols) - 1
        self.lo, self.hi = group.cols[i]
        self.r0, self.r1 = group.ranks[i]
        self.b = group.b[self.r0:self.r1, self.lo:self.hi]  # sᵢBᵢᵀ, this layer's block of the group's B
        bias = layer.base_layer.bias
        self.bias = None if bias is None else bias.detach()
        self.w = layer.weight_out_in().detach()  # (out, in); views all: the plan copies no base weight
        self.w_t = self.w.t()  # (in, out) for addmm
        self.w_b = self.w_t.unsqueeze(0)  # (1, in, out) for baddbmm
        self.dtype, self.in_features, self.few = self.w.dtype, layer.in_features, FEW_ROWS * layer.in_features

    def __call__(self, x: Tensor) -> Tensor:
        """The layer's output: through the plan, or through the layer's own forward where the plan does not apply."""
        # Runs 210 times a decoded token on SmolLM2 all-linear: each check here is one C call or attribute read.
        # The entry was built for the layer unmerged and enabled, its adapter active: a flag changed since, a
        # gradient or a compiler's trace (which cannot guard on x's identity) mean the layer's own path.
        layer, g = self.layer, self.group
        if torch.is_grad_enabled() or layer.disabled or layer.merged or torch.compiler.is_compiling():
            return LoraLinear.forward(layer, x)
        if self.lead:
            # x's dtype, autocast and a per-row context are checked here for the group: a later member runs the plan
            # only for the very x (same version) this call planned. A per-row context applies only where every row
            # uses this plan's adapter (a server's single stream).
            rows = current_rows()
            if (x.dtype is not self.dtype or (rows is not None and (not rows.uniform or rows.only != self.name))
                    or torch._C._is_any_autocast_enabled()):
                g.last = None
                return LoraLinear.forward(layer, x)
        else:  # what the first layer stored for this very x (shared_input.holds, inlined: 90 calls a token)
            held = g.last
            if held is None or held[0] is not x or held[1] != (-1 if x.is_inference() else x._version):
                return LoraLinear.forward(layer, x)
            if self.tail:  # the group's last layer lets go of x and h/D: kept until the next forward, 60 prefill
                g.last = None  # inputs of SmolLM2 fragmented the heap (~20k page faults; RESULTS.md, session 17)
        n = x.numel()
        if n <= self.few:  # a decode step: D in this thread's buffers, no reshapes
            if self.lead:
                bufs = getattr(g.local, "bufs", None)
                if bufs is None or bufs[0] != x.shape:
                    bufs = g.new_buffers(x.shape)
                _, h, d, cols = bufs
                torch.mm(x.reshape(-1, self.in_features), g.a_t, out=h)
                if g.bias is None:
                    torch.mm(h, g.b, out=d)
                else:
                    torch.addmm(g.bias, h, g.b, out=d)
                if g.shared:
                    g.last = (x, version(x), cols)
            else:
                cols = held[2]
            if n == self.in_features and x.dim() == 3:  # baddbmm: 1-2% of a SmolLM2 step faster than F.linear
                return torch.baddbmm(cols[self.i], x, self.w_b)  # at one row (benchmarks/RESULTS.md, session 16)
            return F.linear(x, self.w, cols[self.i])
        # More rows (a prefill): y = x·Wᵀ (+ b), then + hᵢ·(sᵢBᵢᵀ) in place. Only h = x·[A₁; …; Aₖ]ᵀ is shared: a
        # group-wide D of rows × Σout, fresh each call, made a batch-8 prefill fault ~50k pages (benchmarks/RESULTS.md,
        # session 17); y is the one large tensor, as in the base's own forward.
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        if self.lead:
            h = torch.mm(x2, g.a_t)  # (rows, Σr)
            if g.shared:  # one tuple: another thread's call replaces it whole
                g.last = (x, version(x), h)
        else:
            h = held[2]
        y = torch.mm(x2, self.w_t) if self.bias is None else torch.addmm(self.bias, x2, self.w_t)
        return y.addmm_(h[:, self.r0:self.r1], self.b).view(*shape[:-1], self.hi - self.lo)


def _eligible(m: nn.Module, adapter: str | None) -> str | None:
    """The adapter a plan computes in layer `m` (`adapter`, or its one active adapter), or None if it cannot."""
    # A forward set on the instance (accelerate's hooks) is left alone; a running plan's entry is replaced for the
    # nested plan's block, as before entries were set as `forward`.
    own = vars(m).get("forward")
    if (type(m) is not LoraLinear or m.disabled or m.merged or (adapter is None and len(m.active) != 1)
            or (own is not None and not isinstance(own, PlanEntry))):
        return None
    name = adapter if adapter is not None else m.active[0]
    if m._factors_of(name) is None or not m.base_layer.weight.is_floating_point() or (m.training and m.dropout[name]):
        return None
    return name


def plan_entries(model: nn.Module, adapter: str | None = None) -> dict[LoraLinear, PlanEntry]:
    """{layer: its plan entry} for every LoraLinear the plan can run: not merged or disabled, a floating-point base,
    no dropout in training mode, and factors of `adapter` (None: of the layer's one active adapter) in it. Built in
    full before anything is set; copies the factors, never a base weight."""
    entries: dict[LoraLinear, PlanEntry] = {}
    for name, members in input_groups(model, lambda m: _eligible(m, adapter)):
        group = _Group(members, name)
        for i, m in enumerate(members):
            entries[m] = PlanEntry(name, group, i, m)
    return entries


@contextmanager
def installed(entries: dict[LoraLinear, PlanEntry]) -> Iterator[int]:
    """Set built plan entries on their layers for the block (yields how many); a server keeps `plan_entries` built
    per adapter version and installs them around each step whose rows all use that adapter."""
    try:
        with set_on_layers(entries, "forward") as n:
            yield n
    finally:
        for entry in entries.values():
            entry.group.last = None


@contextmanager
def decode_plan(model: nn.Module, adapter: str | None = None) -> Iterator[int]:
    """Run `model`'s eligible LoRA layers through a fused plan inside the block (yields how many layers it covers).

    adapter: None = each layer's one active adapter (what `generate` uses); a name = that adapter, for forwards
    inside a per-row context where every row uses it. For inference only: a forward with gradients enabled, or in a
    per-row context that mixes adapters, runs the layers' own path. Do not change the model's adapters inside."""
    with installed(plan_entries(model, adapter)) as n:
        yield n
