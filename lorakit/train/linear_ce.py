"""Σ cross-entropy of a linear layer's logits, a chunk of rows at a time: no (N, V) tensor ever exists.

    L = Σ_{i: y_i ≠ -100} logsumexp(z_i) − z_i[y_i]        z_i = W h_i + b    h: (N, d), W: (V, d), b: (V,)
    ∂L/∂z_i = softmax(z_i) − onehot(y_i)                   (0 where y_i = -100)
    ∂L/∂h = (∂L/∂z) W      ∂L/∂W = (∂L/∂z)ᵀ h      ∂L/∂b = Σ_i ∂L/∂z_i

The plain path, `F.cross_entropy(F.linear(h, W, b).float(), y, reduction="sum")`, holds three (N, V) fp32
tensors at its peak: the logits, the log-softmax saved for backward and the logits' gradient (SmolLM2, V =
49,152, 2,048 labelled positions: 400 MB each). Here the forward takes `chunk` rows at a time: their logits
(chunk, V), their loss terms in fp32 and, in the same pass, their gradient ∂L/∂z, multiplied at once into
∂L/∂h (N, d) and, only when W and b train, summed into ∂L/∂W (V, d) and ∂L/∂b (V,). Only those gradients are
kept; backward scales them by the incoming (scalar) gradient. Same flops as the plain path (one product for
the logits, one per gradient; nothing recomputed), memory of one chunk's logits instead of N rows'. This is
the approach of Liger-Kernel's FusedLinearCrossEntropy and torchtune's chunked cross-entropy.

Precision is the plain path's under the caller's autocast: the products run in the autocast dtype (bf16)
when it is on, else in W's dtype; the softmax in fp32; the logits' gradient enters the products in the
logits' dtype. Two differences, both within bf16 rounding: the gradient is rounded before the backward
scale (plain: after), and ∂L/∂W is summed over chunks in fp32. Without grad mode (or when nothing requires
grad) only the loss is computed, chunk by chunk.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.train.data import IGNORE_INDEX

CHUNK_VALUES = 2**23  # logits per chunk: 32 MB in fp32 (170 rows at SmolLM2's V = 49,152)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk for a vocabulary of `vocab`: CHUNK_VALUES logits, at least one row."""
    return max(1, CHUNK_VALUES // max(vocab, 1))


def summed_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Σ cross-entropy of logits (N, C) against targets (N,), skipping -100, in fp32 (the plain path)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype F.linear(hidden, weight) would compute in: autocast's when it is on, else the weight's."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype


def _loss_and_logit_grad(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """(Σ loss in fp32, ∂loss/∂logits (n, V) in the logits' dtype) of one chunk; ignored rows: 0."""
    logp = logits.float().log_softmax(-1)  # (n, V) fp32
    loss = F.nll_loss(logp, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    grad = logp.exp_()  # softmax, in place of the log-softmax
    keep = targets != IGNORE_INDEX
    picked = keep.nonzero().squeeze(1)
    grad[picked, targets[picked]] -= 1.0
    if not bool(keep.all()):
        grad.mul_(keep.unsqueeze(1))
    return loss, grad.to(logits.dtype)


def _chunked(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int,
             needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """(Σ loss, ∂L/∂h, ∂L/∂W, ∂L/∂b), each gradient only where `needs` says, computed `chunk` rows at a time."""
    dtype = _compute_dtype(hidden, weight)
    w = weight.to(dtype)  # cast once (autocast would cast it per chunk); (V, d)
    b = bias.to(dtype) if bias is not None else None
    need_h, need_w, need_b = needs
    grad_h = torch.empty_like(hidden) if need_h else None  # (N, d)
    grad_w = torch.zeros_like(weight, dtype=torch.float32) if need_w else None  # (V, d), summed over chunks
    grad_b = torch.zeros_like(bias, dtype=torch.float32) if need_b else None  # (V,)
    loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):  # the dtypes are chosen above
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start:start + chunk].to(dtype), targets[start:start + chunk]  # (n, d), (n,)
            logits = F.linear(h, w, b)  # (n, V)
            if not any(needs):
                loss += summed_cross_entropy(logits, y)
                continue
            part, g = _loss_and_logit_grad(logits, y)  # g: (n, V)
            loss += part
            if need_h:
                grad_h[start:start + chunk] = g @ w  # (n, d)
            if need_w and g.dtype == grad_w.dtype:
                grad_w.addmm_(g.t(), h)  # (V, d), in place
            elif need_w:
                grad_w += g.t() @ h  # a bf16 product, summed in fp32
            if need_b:
                grad_b += g.float().sum(0)
    return loss, grad_h, grad_w, grad_b


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward: Σ loss, with the gradients computed and kept (`_chunked`); backward: those, scaled."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        loss, *grads = _chunked(hidden, weight, bias, targets, chunk, tuple(ctx.needs_input_grad[:3]))
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        grads = [g * grad_loss if g is not None else None for g in ctx.saved_tensors]
        return *grads, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         chunk: int | None = None) -> Tensor:
    """Σ cross-entropy of F.linear(hidden, weight, bias) (N, V) against targets (N,), skipping -100, in fp32;
    `chunk` rows at a time (default `chunk_rows(V)`), gradients computed in the forward (module docstring).

    Equals `summed_cross_entropy(F.linear(hidden, weight, bias), targets)`, values and gradients w.r.t.
    hidden, weight and bias, without holding the (N, V) logits, their log-softmax or their gradient.
    """
    chunk = chunk or chunk_rows(weight.shape[0])
    inputs = (hidden, weight, bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk)
    return _chunked(hidden, weight, bias, targets, chunk, (False, False, False))[0]


__all__ = ["CHUNK_VALUES", "chunk_rows", "linear_cross_entropy", "summed_cross_entropy"]
