"""The LoRA math as functions: the delta, a memory-lean autograd for Linear, and mixed-adapter batches.

Shapes: x (..., in), W (out, in), A (r, in), B (out, r); y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor


def delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """ΔW = s·B·A, shape (out, in)."""
    return (B @ A) * scale


def fold_pays(rows: int, out_features: int, in_features: int) -> bool:
    """Is multiplying by the folded W + s·B·A cheaper than x·Wᵀ + s·(x·Aᵀ)·Bᵀ for `rows` input rows?

    Folding costs an out×in matmul-add per call (independent of the rows) and saves the rank-r products
    for each row, so it pays once rows > out·in/(out+in) (288 for 576×576, 419 for 576→1536). Measured on
    this CPU, one thread, r=8, µs per call (fold / unfused / the bare x·Wᵀ):
        576×576   N=1: 128 / 38 / 29    N=8: 186 / 102 / 92    N=64: 541 / 477 / 443
                  N=256: 1747 / 1762 / 1641                     N=1024: 6873 / 7146 / 6710
        576→1536  N=1: 332 / 83 / 73    N=8: 494 / 255 / 242   N=64: 1446 / 1260 / 1224
                  N=256: 4904 / 5168 / 4908                     N=1024: 19109 / 24628 / 18244
    so decoding (a few rows) runs unfused at ~1.1-1.3x the bare layer instead of 3-4.5x, and training
    batches (thousands of rows) keep the single big matmul.
    """
    return rows * (out_features + in_features) > out_features * in_features


def spans(sizes: list[int]) -> list[tuple[int, int]]:
    """[(start, end)] of consecutive blocks of these sizes: each member's rows or columns in stacked factors."""
    ends = [0]
    for n in sizes:
        ends.append(ends[-1] + n)
    return list(zip(ends[:-1], ends[1:], strict=True))


def add_low_rank_(out: Tensor, h: Tensor, B: Tensor, scale: float = 1.0) -> Tensor:
    """out += s·h·Bᵀ in place, as one addmm over the rows (h: (..., r), B: (out, r)); returns `out` (contiguous)."""
    out.view(-1, out.shape[-1]).addmm_(h.view(-1, h.shape[-1]), B.t(), alpha=scale)
    return out


def lora_linear(x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float,
                dropout: float = 0.0, training: bool = False) -> Tensor:
    """y = x·Wᵀ + b + s·(drop(x)·Aᵀ)·Bᵀ with W frozen.

    When a gradient is needed and W is frozen (the LoRA case) this runs a custom autograd function that
    keeps only x (which the caller's graph usually holds anyway) and the r-wide x·Aᵀ, never a dropped copy
    of x: the dropout mask is regenerated from a saved seed in backward (see `dropout_keep_mask`). Without
    a gradient (no_grad, inference_mode, or nothing requiring one) no autograd function is entered.
    Either way, without dropout it multiplies by the folded W + s·B·A only when there are enough rows for
    that to pay (`fold_pays`). A and B are cast to the compute dtype (W's, or autocast's), so fp32 adapters
    work on a bf16/fp16 base; their gradients come back in their own dtype.
    """
    p = dropout if training else 0.0
    device_type = x.device.type
    autocast = torch.is_autocast_enabled(device_type)
    needs_grad = torch.is_grad_enabled() and (A.requires_grad or B.requires_grad or x.requires_grad
                                              or weight.requires_grad or (bias is not None and bias.requires_grad))
    if needs_grad and not weight.requires_grad:
        if not autocast:
            return _LeanLoraLinear.apply(x, weight, bias, A.to(weight.dtype), B.to(weight.dtype), scale, p)
        # Mixed precision: cast as autocast would cast a linear, then run the function with autocast
        # off so backward sees one dtype; the casts are recorded, so A and B get gradients in their own dtype.
        # W goes in uncast: the function casts it itself, so backward keeps W, not a 16-bit copy of it.
        dt = torch.get_autocast_dtype(device_type)
        with torch.autocast(device_type, enabled=False):
            return _LeanLoraLinear.apply(x.to(dt), weight, None if bias is None else bias.to(dt),
                                         A.to(dt), B.to(dt), scale, p)
    dt = torch.get_autocast_dtype(device_type) if autocast else weight.dtype
    if A.dtype != dt or B.dtype != dt:  # a no-op .to still costs a dispatch (~1 µs) per call
        A, B = A.to(dt), B.to(dt)
    if p == 0 and not needs_grad and fold_pays(x.numel() // max(x.shape[-1], 1), *weight.shape):
        return F.linear(x, torch.addmm(weight.to(dt), B, A, alpha=scale), bias)
    if not needs_grad:
        # Few rows at inference (decoding): 3 ops instead of 5, the delta added in place as (x·Aᵀ)·(s·B)ᵀ
        # by one addmm. At batch-1 decoding the LoRA term is op-count bound, not FLOP bound: a 1×576
        # rank-8 product is ~1 µs of arithmetic and ~5 µs of dispatch (see `fold_pays` and
        # benchmarks/generate_speed.py).
        xd = F.dropout(x, p, training=True) if p > 0 else x
        y = F.linear(x, weight, bias)
        xa = F.linear(xd, A)
        return add_low_rank_(y, xa, B, scale) if y.is_contiguous() else y + F.linear(xa, B) * scale
    # Unfused with a gradient through W (full fine-tuning of an adapted layer).
    xd = F.dropout(x, p, training=True) if p > 0 else x
    return F.linear(x, weight, bias) + F.linear(F.linear(xd, A), B) * scale


def dropout_keep_mask(seed: int, shape: torch.Size, p: float, device: torch.device,
                      dtype: torch.dtype = torch.bool) -> tuple[Tensor, float]:
    """A reproducible keep-mask for dropout (1 = keep, 0 = drop), and the keep probability it realises.

    Uses 16 random bits per element (64-bit words viewed as four int16), so keep probability is (1 - p)
    rounded to 1/65536; callers rescale by it. On CPU the words come from numpy's SFC64 generator, 4-6x
    faster than `bernoulli_` (4096×384 fp32, one thread: 3.5 ms vs 14-18 ms on the shared dev CPU);
    elsewhere from torch's generator.
    Pass the data's `dtype` to get the mask in it directly: multiplying by a bool mask converts it first.
    The lean LoRA path regenerates the mask from `seed` in backward rather than storing it.
    """
    n = math.prod(shape)
    n_words = (n + 3) // 4
    if device.type == "cpu":
        words = torch.from_numpy(np.random.SFC64(seed).random_raw(n_words).view(np.int64))
    else:
        gen = torch.Generator(device=device).manual_seed(seed)
        words = torch.randint(-(2**63), 2**63 - 1, (n_words,), dtype=torch.int64, generator=gen, device=device)
    threshold = round((1.0 - p) * 65536) - 32768  # int16 values are uniform on [-32768, 32767]
    keep = torch.lt(words.view(torch.int16)[:n].view(shape), threshold,
                    out=torch.empty(shape, dtype=dtype, device=device))
    return keep, (threshold + 32768) / 65536


def _rank_product(M: Tensor, x: Tensor) -> Tensor:
    """x·Mᵀ for a rank-r M (r, k) and many rows x (N, k): computed as (M·xᵀ)ᵀ, an (N, r) view of an (r, N) tensor.

    Same values, other memory order: BLAS runs the wide (r, N) output faster than the 8-column (N, r) one
    (one thread, CPU ms, N = 2048, r = 8: x·Aᵀ 0.55 -> 0.38 at k = 576 and 2.0 -> 1.0 at k = 1536; g·B 1.4 -> 0.36
    at k = 576 and 3.8 -> 1.3 at k = 1536), and the r-wide factor gradients then read a contiguous (r, N) operand.
    Measured on the lean function (forward + backward over the bare linear's, SmolLM2's shapes, fold path): the
    LoRA overhead fell 28-56% (576→1536: 4.2 -> 1.9 ms of ~80).
    """
    return (M @ x.t()).t()


def _folded(w: Tensor, weight: Tensor, B: Tensor, A: Tensor, scale: float) -> Tensor:
    """W + s·B·A in w's dtype: into w itself when it is a fresh cast of `weight` (autocast), so that copy
    is the only out×in pass; otherwise into a new tensor (w is then `weight`, which must stay as it is)."""
    return w.addmm_(B, A, alpha=scale) if w is not weight else torch.addmm(w, B, A, alpha=scale)


class _LeanLoraLinear(torch.autograd.Function):
    """x (N.., in) in the compute dtype, W frozen in any dtype (cast here, to x's), A, B and bias in x's dtype."""

    @staticmethod
    def forward(ctx, x, weight, bias, A, B, scale, p):
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        w = weight.to(x2.dtype)  # autocast: a 16-bit copy, used here and dropped (backward casts again)
        seed, keep_p = None, 1.0
        if p > 0:
            seed = int(torch.randint(0, 2**62, (1,)).item())  # drawn from the global RNG: reproducible
            keep, keep_p = dropout_keep_mask(seed, x2.shape, p, x2.device, x2.dtype)
            xa = _rank_product(A, x2 * keep).mul_(1.0 / keep_p)  # (N, r); a same-dtype mask multiplies fastest
            out = F.linear(x2, w, bias)
            out.addmm_(xa, B.t(), alpha=scale)
        else:
            xa = _rank_product(A, x2)  # (N, r), kept for B's gradient
            if fold_pays(x2.shape[0], *weight.shape):  # training batches: one big matmul
                out = F.linear(x2, _folded(w, weight, B, A, scale), bias)
            else:  # few rows: two rank-r products beat building the out×in W + s·B·A
                out = F.linear(x2, w, bias).addmm_(xa, B.t(), alpha=scale)
        ctx.save_for_backward(x, weight, A, B, xa)
        ctx.scale, ctx.p, ctx.keep_p, ctx.seed, ctx.has_bias = scale, p, keep_p, seed, bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, A, B, xa = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        g = grad_out.reshape(-1, grad_out.shape[-1])  # (N, out)
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        w = weight.to(g.dtype)
        need_x, _, need_b, need_A, need_B = ctx.needs_input_grad[:5]
        keep = dropout_keep_mask(ctx.seed, x2.shape, p, x2.device, x2.dtype)[0] if p > 0 else None
        gB = _rank_product(B.t(), g).mul_(s / ctx.keep_p)  # (N, r) = g·B, carries s and the dropout rescale
        grad_x = grad_A = grad_B = grad_b = None
        if need_A:
            grad_A = gB.t() @ (x2 * keep if keep is not None else x2)  # (r, in)
        if need_B:
            grad_B = (xa.t() @ g).mul_(s).t()  # (out, r); this operand order is ~4x faster than gᵀ·xa on CPU
        if need_b and ctx.has_bias:
            grad_b = g.sum(0)
        if need_x:
            # Written into a tensor of x's own shape, not returned as a view: autograd sums the gradients of an
            # input read by several layers (q/k/v, gate/up) in place only into a non-view (else one more N×in add).
            grad_x = torch.empty(x.shape, dtype=g.dtype, device=g.device)
            gx = grad_x.view(-1, x.shape[-1])  # (N, in)
            if keep is None and fold_pays(g.shape[0], *weight.shape):
                torch.mm(g, _folded(w, weight, B, A, s), out=gx)
            else:
                torch.mm(gB, A, out=gx)  # in place below: no copy of the N×in term
                if keep is not None:
                    gx.mul_(keep)
                gx.addmm_(g, w)
        return grad_x, None, grad_b, grad_A, grad_B, None, None


class _SharedInputLora(torch.autograd.Function):
    """k LoRA layers that read one x (q/k/v, gate/up; lorakit.train_plan) as one autograd function, training
    batches only (every member's fold pays): yᵢ = x·(Wᵢ + sᵢ·Bᵢ·Aᵢ)ᵀ + bᵢ, W frozen, all in x's dtype.

    Same arithmetic as k `_LeanLoraLinear` calls on the fold path, with x·[A₁; …; Aₖ]ᵀ and the A's gradient one
    product each and x's gradient summed in one buffer by addmm_. What it saves is mostly per call, in a real step:
    the k functions' frames and autograd nodes (SmolLM2 all-linear, batch 8 × 256: ~2% of the layers' forward and
    backward; the same shared products with one function per layer saved nothing measurable; benchmarks/RESULTS.md,
    session 14).
    Inputs: x, the scales (a tuple), then W₁…Wₖ, b₁…bₖ (None allowed), A₁…Aₖ, B₁…Bₖ. Outputs: y₁…yₖ.
    """

    @staticmethod
    def forward(ctx, x, scales, *params):
        k = len(scales)
        Ws, bs, As, Bs = (params[j * k:(j + 1) * k] for j in range(4))
        x2 = x.reshape(-1, x.shape[-1])  # (N, in)
        xa = torch.cat(As) @ x2.t()  # (Σr, N): one pass over x; BLAS's fast order (see _rank_product)
        outs = tuple(F.linear(x2, torch.addmm(W, B, A, alpha=s), b).view(*x.shape[:-1], W.shape[0])
                     for W, b, A, B, s in zip(Ws, bs, As, Bs, scales, strict=True))
        ctx.save_for_backward(x, xa, *Ws, *As, *Bs)
        ctx.scales = scales
        ctx.set_materialize_grads(False)  # an output nobody used gets None here, not an N×out tensor of zeros
        return outs

    @staticmethod
    def backward(ctx, *gs):
        x, xa, *rest = ctx.saved_tensors
        scales, need = ctx.scales, ctx.needs_input_grad
        k = len(scales)
        Ws, As, Bs = rest[:k], rest[k:2 * k], rest[2 * k:]
        x2 = x.reshape(-1, x.shape[-1])
        gB = xa.new_zeros(xa.shape) if any(g is None for g in gs) else torch.empty_like(xa)  # (Σr, N) = (g·B)ᵀ
        grad_x = gx = None
        grad_bs, grad_Bs = [None] * k, [None] * k
        bounds = spans([A.shape[0] for A in As])  # each member's rows of xa and gB
        for i, (W, A, B, s, g) in enumerate(zip(Ws, As, Bs, scales, gs, strict=True)):
            lo, hi = bounds[i]
            if g is None:
                continue
            g2 = g.reshape(-1, g.shape[-1])  # (N, out)
            torch.mm(B.t(), g2.t(), out=gB[lo:hi]).mul_(s)
            if need[2 + 3 * k + i]:
                grad_Bs[i] = (xa[lo:hi] @ g2).mul_(s).t()  # (out, r)
            if need[2 + k + i]:
                grad_bs[i] = g2.sum(0)
            if need[0]:
                folded = torch.addmm(W, B, A, alpha=s)
                if gx is None:
                    grad_x = torch.empty(x.shape, dtype=g2.dtype, device=g2.device)
                    gx = grad_x.view(-1, x.shape[-1])
                    torch.mm(g2, folded, out=gx)
                else:
                    gx.addmm_(g2, folded)  # summed in place: no N×in add per member
        grad_As = (gB @ x2).split([A.shape[0] for A in As]) if any(need[2 + 2 * k:2 + 3 * k]) else [None] * k
        return (grad_x, None, *[None] * k, *grad_bs, *grad_As, *grad_Bs)


def mixed_lora_delta(x: Tensor, groups: list[tuple[Tensor, Tensor, Tensor, float]],
                     out: Tensor | None = None) -> Tensor:
    """The LoRA delta for a batch whose rows use different adapters, in one call.

    Semantics (reference):
        out[rows] = s * x[rows] @ A.T @ B.T   for each (rows, A, B, s) in groups; other rows get 0
    x: (batch, ..., in); rows: (n,) long row indices, disjoint across groups; returns (batch, ..., out).
    With `out` (the base layer's output, in x's dtype) the delta is added into it in place and `out` returned:
    no zero-filled (batch, ..., out) buffer and no extra add (MiniLM classify, 64 rows × 64 tokens, 64
    adapters: the zero fill and the add were ~6% of the forward, profiled).

    Kernel, chosen by measurement (the first benchmarks/mixed_delta_kernels.py: SmolLM2 q_proj at decode, in = out
    = 576, r = 8, one layer's adapters reused, so cache-resident; one thread, median µs of 7×200 calls on the
    shared 2-core machine, two runs taken at load ~7):
        rows distinct | base x·Wᵀ | loop over groups | gather + bmm | concatenated ranks, masked
         8     1      |  234      |   96             |  383         |  154
         8     8      |  233      |  398             |  398         |  411
        32     1      |  595      |  133             | 1371         |  200
        32     8      |  622      |  426             | 1231         |  332
        32    32      |  591      | 1635             | 1267         | 1236
    Gathering per-row A/B (bmm) never wins; looping over the groups wins up to a few of them (~50 µs of
    overhead per group), and one matmul through all groups' ranks stacked (Σr columns, each row keeping only
    its own block) wins when many distinct adapters share a batch of few tokens (decoding). The stacked matmul
    costs every token Σr columns instead of its own r, so with many tokens per row (prefill, classify) the
    loop wins again: MiniLM classify, 64 adapters × 64 rows × 64 tokens, measured 1.42× the base stacked and
    1.20× looped. So: stack when > 8 groups and its extra work, tokens·Σr·(in+out) at ~1e11 flop/s, stays
    under the loop's per-group overhead; else loop.
    Re-measured with adapters out of cache, as in a real step (the script now), the stack lost to the loop at 32
    rows × 32 adapters (3.97-4.57x vs 3.05-3.45x the bare layers' time); the server's decode steps read slot
    tables instead (`table_lora_delta`), so this choice now matters for prompts and `per_row_adapters` only.
    With several tokens per row and > 8 adapters of one rank the gathered bmm (`_gathered_delta`) replaces the loop:
    its cost is per row, not per adapter (MiniLM classify, 64 × 64 tokens, 64 adapters: 1.09× the base-only
    forward against the loop's 1.11×, Intel VM, session 8).
    """
    A0, B0 = groups[0][1], groups[0][2]
    if len(groups) == 1 and groups[0][0].numel() == x.shape[0]:  # every row, one adapter (a single stream)
        if out is None:
            return F.linear(F.linear(x, A0), B0) * groups[0][3]
        return add_low_rank_(out, F.linear(x, A0), B0, groups[0][3])
    tokens, ranks = x.numel() // x.shape[-1], sum(A.shape[0] for _, A, _, _ in groups)
    if len(groups) > 8 and tokens > x.shape[0] and all(A.shape[0] == A0.shape[0] for _, A, _, _ in groups):
        return _gathered_delta(x, groups, out)
    if len(groups) <= 8 or tokens * ranks * (A0.shape[1] + B0.shape[0]) >= 2.5e6 * len(groups):
        if out is None:
            out = x.new_zeros(*x.shape[:-1], B0.shape[0])
        for rows, A, B, s in groups:
            out.index_add_(0, rows, F.linear(F.linear(x.index_select(0, rows), A), B), alpha=s)
        return out
    ids = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    for k, (rows, _, _, _) in enumerate(groups):
        ids[rows] = k
    A = torch.cat([A for _, A, _, _ in groups], 0)  # (Σr, in)
    B = torch.cat([B * s for _, _, B, s in groups], 1)  # (out, Σr), scales folded in
    owner = torch.cat([torch.full((g[1].shape[0],), k, dtype=torch.long, device=x.device)
                       for k, g in enumerate(groups)])
    keep = (ids.unsqueeze(1) == owner.unsqueeze(0)).to(x.dtype)  # (batch, Σr): a row's own block only
    h = F.linear(x, A)  # (batch, ..., Σr)
    h = h * keep.view(keep.shape[0], *([1] * (x.dim() - 2)), keep.shape[1])
    if out is None:
        return F.linear(h, B)
    return add_low_rank_(out, h, B)


def _gathered_delta(x: Tensor, groups: list[tuple[Tensor, Tensor, Tensor, float]], out: Tensor | None) -> Tensor:
    """`mixed_lora_delta` for many adapters of one rank and several tokens per row (prompts, classify): each
    row's A and B stacked once, two batched matmuls, one index_add — ~10 ops a layer instead of the loop's 4 per
    adapter (MiniLM classify, 64 rows × 64 tokens × 64 adapters: the loop's 3,000 small ops were most of its
    overhead over the base; the numbers are in benchmarks/RESULTS.md, session 8)."""
    rows = torch.cat([g[0] for g in groups])
    A = torch.stack([g[1] for g in groups for _ in range(g[0].numel())])  # (n, r, in): row j's adapter's A
    B = torch.stack([g[2] for g in groups for _ in range(g[0].numel())])  # (n, out, r)
    scale = torch.tensor([g[3] for g in groups for _ in range(g[0].numel())], dtype=x.dtype, device=x.device)
    xs = x.index_select(0, rows).reshape(rows.numel(), -1, x.shape[-1])  # (n, tokens per row, in)
    h = torch.bmm(xs, A.transpose(1, 2)) * scale.view(-1, 1, 1)  # (n, t, r), the scale on the r-wide product
    d = torch.bmm(h, B.transpose(1, 2)).view(rows.numel(), *x.shape[1:-1], B.shape[1])
    if out is None:
        out = x.new_zeros(*x.shape[:-1], B.shape[1])
    return out.index_add_(0, rows, d)


def bag_indices(slots: Tensor, in_features: int, rank: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`embedding_bag` indices and offsets for `table_lora_delta`, rows with these slots: (idx_T, off_T, idx_U,
    off_U), one bag of rows slot·in … slot·in + in-1 of T per row, then one of rows slot·R … slot·R + R-1 of U."""
    idx_t = (slots[:, None] * in_features + torch.arange(in_features, device=slots.device)).reshape(-1)
    idx_u = (slots[:, None] * rank + torch.arange(rank, device=slots.device)).reshape(-1)
    n = torch.arange(slots.shape[0], device=slots.device)
    return idx_t, n * in_features, idx_u, n * rank


def table_lora_delta(x: Tensor, T: Tensor, U: Tensor, rows: Tensor | None, idx_t: Tensor, off_t: Tensor,
                     idx_u: Tensor, off_u: Tensor) -> Tensor:
    """The per-row LoRA delta at decode (one token per row), each row's factors read in place from slot tables
    (lorakit/row_tables.py: T (slots·in, R) holds each slot's Aᵀ, U (slots·R, out) its s·Bᵀ).

    Semantics (reference), rows i with a slot (`rows`, None = all; the bags from `bag_indices` of their slots):
        out[i] = U[slot_i·R:(slot_i+1)·R]ᵀ · (T[slot_i·in:(slot_i+1)·in]ᵀ · x[i])  = s·B·A·x[i]; other rows 0
    x: (batch, [1,] in) -> (batch, [1,] out), in T's dtype (fp32).

    Kernel, chosen by measurement (benchmarks/mixed_delta_kernels.py: SmolLM2's q_proj and v_proj alternating over
    60 layers, 64 adapters r=8 each, so adapters come from memory as in a real step; one thread on the shared,
    busy 2-core machine; time of a pass of base x·Wᵀ + delta relative to x·Wᵀ alone, range of three runs):
        rows distinct | mixed_lora_delta | loop      | gather + bmm | these tables
         8     1      | 1.17-1.40        | 1.13-1.38 | 1.20-1.42    | 1.14-1.30
         8     8      | 2.09-2.16        | 1.94-2.06 | 1.47-1.50    | 1.47-1.50
        32     1      | 1.17-1.34        | 1.18-1.36 | 1.45-1.59    | 1.31-1.33
        32     8      | 1.60-1.73        | 1.59-1.71 | 1.54-1.74    | 1.36-1.42
        32    32      | 3.97-4.57        | 3.05-3.45 | 1.59-1.88    | 1.45-1.71
    The tables win or tie except for one adapter on every row, where two plain matmuls read A and B once
    (`mixed_lora_delta` takes that case: 8.6 vs 14.9 µs at 1 row, 22.8 vs 40.1 µs at 32, cache-resident); the
    gathers of the bmm path copy every row's factors in every layer. On whole SmolLM2 decode steps (32 rows under
    32 distinct adapters vs the same rows on the bare base, alternating in one process) the mixed steps took 1.36x
    the base's with mixed_lora_delta and 1.05x with the tables.
    """
    x2 = x.reshape(x.shape[0], -1).to(T.dtype)  # (batch, in)
    xs = x2 if rows is None else x2.index_select(0, rows)
    h = F.embedding_bag(idx_t, T, off_t, mode="sum", per_sample_weights=xs.reshape(-1))  # (n, R)
    d = F.embedding_bag(idx_u, U, off_u, mode="sum", per_sample_weights=h.reshape(-1))  # (n, out)
    if rows is not None:
        d = d.new_zeros(x2.shape[0], U.shape[1]).index_copy_(0, rows, d)
    return d.view(*x.shape[:-1], U.shape[1])
