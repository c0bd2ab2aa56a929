"""Causal-LM loss on the labelled positions only, and where exact without ever forming their (N, V) logits.

A causal LM's output layer maps every position's final hidden state h_t (d) to V logits, and the loss takes a
log-softmax over V at every position; but only positions whose NEXT token carries a label (prompt, padding
and template tokens are -100) enter the loss:

    L = Σ_{(b, t): y[b, t+1] ≠ -100} CE(W_out · h[b, t], y[b, t+1])

So the rows h[b, t] of those positions are gathered first, (N, d) with N the number of targets, and only they
reach the output layer: the same loss and gradients as the full (B, T, V) logits, at N / (B·T) of the output
layer's and the softmax's cost and memory (SmolLM2: V = 49,152, d = 576).

How: for the one call, a forward pre-hook on the model's output layer (`get_output_embeddings()`) replaces its
(B, T', d) input. The model's own forward runs as usual, so whatever it does before the head stays (final
norm, prefix/prompt hooks: prompt tuning's p virtual tokens come first, so the tokens are the last T of the
T' = p + T positions). Two ways on from there:

- `labelled_loss` (what training and evaluation use), fused: the hook keeps the gathered rows, graph and all,
  and hands the layer a zero-row input, so the model's logits come back empty; the loss is
  `linear_cross_entropy` of the kept rows with the layer's weight and bias (linear_ce.py), a chunk of rows at
  a time, its gradients computed in the same pass. No (N, V) tensor exists: with every token labelled
  (N = 2,048, SmolLM2) that spares the 400 MB fp32 logits, their saved log-softmax and their gradient.
  This is exact only if the model applies nothing after the layer, so it runs only when (before) the layer
  is a plain nn.Linear (not LoRA-wrapped, not quantized; a modules_to_save copy counts by its current
  module) without forward hooks, and the config sets none of the known after-the-head transforms (Gemma 2's
  final_logit_softcapping, Cohere's logit_scale, Granite's logits_scaling, Falcon-H1's lm_head_multiplier,
  ...; Llama and GPT-2 have none), and when (after) the model returned the very tensor the layer produced,
  unmodified (same object, same version counter). If that after-check fails, the loss is computed again
  the gathered-logits way: a second forward, correct and slower.
- `labelled_logits`, the fallback: the layer turns the gathered rows into logits (N, V), and the loss is
  their cross-entropy; any logit scaling or soft-capping the model applies then applies to them too.

`LabelledLoss` puts `labelled_loss` behind a module's forward, so DistributedDataParallel can wrap it (calling
a wrapped model's submodules would bypass DDP's gradient synchronisation). A model without an output layer,
or whose forward does not call it on (B, T', d) hidden states, gets its full logits and the same positions
taken from them: same result, full cost.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lorakit.rows import current_rows
from lorakit.saved import SavedModule
from lorakit.train.data import IGNORE_INDEX
from lorakit.train.linear_ce import linear_cross_entropy, summed_cross_entropy

# Config attributes through which transformers models change the logits after the output layer (any value
# but None: not fused). Gemma 2/3, Cohere, Granite, Falcon-H1, Gemma 3n/4-style soft caps, muP-style scales.
_AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "lm_head_multiplier",
               "output_logit_soft_cap", "logits_soft_cap", "output_multiplier")


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, targets) of the positions t whose next token t+1 is labelled; each (N,), row-major order."""
    following = labels[:, 1:]  # position t predicts token t + 1
    rows, cols = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, following[rows, cols]


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    return layer if isinstance(layer, nn.Module) else None


def _fusable_linear(model: nn.Module, head: nn.Module | None) -> nn.Linear | None:
    """The plain nn.Linear that computes `head`'s output, if nothing the model is known to do after it (see the
    module docstring); None: use the gathered logits."""
    if head is None or head._forward_hooks:
        return None
    if isinstance(head, SavedModule) and current_rows() is None:  # then its forward is current()(x)
        head = head.current()
        if head._forward_pre_hooks or head._forward_hooks:
            return None
    config = getattr(model, "config", None)
    configs = (config, getattr(config, "text_config", None))
    if type(head) is not nn.Linear or any(getattr(c, a, None) is not None for c in configs for a in _AFTER_HEAD):
        return None
    return head


def _forward_gathered(model: nn.Module, head: nn.Module | None, inputs: dict[str, Tensor], labels: Tensor,
                      rows: Tensor, cols: Tensor, empty: bool) -> tuple[Tensor, list, list]:
    """(logits, taken, outputs) of the model's forward in which the head's first call on (B, T', d) hidden states
    gets the gathered rows (N, d) instead, or with `empty` a zero-row input. taken: those rows, once (graph
    kept); outputs: (output, version counter) of every head call."""
    batch, seq = labels.shape
    taken, outputs = [], []

    def gather(module: nn.Module, args: tuple):
        hidden = args[0] if args else None
        if taken or not (isinstance(hidden, Tensor) and hidden.dim() == 3 and hidden.shape[0] == batch
                         and hidden.shape[1] >= seq):
            return None
        taken.append(hidden[:, hidden.shape[1] - seq:][rows, cols])  # (N, d): virtual prompt tokens come first
        return (taken[0].detach()[:0] if empty else taken[0], *args[1:])

    def record(module: nn.Module, args: tuple, out) -> None:
        outputs.append((out, out._version if isinstance(out, Tensor) and not out.is_inference() else None))

    handles = [head.register_forward_pre_hook(gather), head.register_forward_hook(record)] if head is not None else []
    try:
        logits = model(**inputs).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, taken, outputs


def labelled_logits(model: nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """(logits (N, V), targets (N,)) at the N positions whose next token is labelled (see the module docstring).

    `model` is a transformers causal LM, `inputs` its keyword inputs (input_ids, attention_mask), `labels`
    (B, T) with -100 where no loss is taken. Σ cross-entropy(logits, targets) equals the full computation's
    cross-entropy over logits[:, :-1] against labels[:, 1:] (ignore_index -100), values and gradients.
    """
    rows, cols, targets = labelled_positions(labels)
    logits, taken, _ = _forward_gathered(model, _output_layer(model), inputs, labels, rows, cols, empty=False)
    if taken and logits.dim() == 2 and logits.shape[0] == rows.numel():
        return logits, targets
    if taken:  # the head saw the gathered rows but the model reshaped its output: redo it the plain way
        logits = model(**inputs).logits
    return logits[:, logits.shape[1] - labels.shape[1]:][rows, cols], targets


def labelled_loss(model: nn.Module, inputs: dict[str, Tensor], labels: Tensor, chunk: int | None = None) -> Tensor:
    """Σ cross-entropy (fp32) over the N positions whose next token is labelled, fused with the output layer
    where that is exact, else from `labelled_logits` (see the module docstring). `chunk`: rows per chunk of
    `linear_cross_entropy` (None: its default, from V).

    Equals F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100, reduction="sum") of the full
    logits, values and gradients; without grad mode only the loss is computed.
    """
    head = _output_layer(model)
    # inference_mode tensors have no version counter, so the check below could not run: take the plain path
    linear = None if torch.is_inference_mode_enabled() else _fusable_linear(model, head)
    if linear is not None:
        rows, cols, targets = labelled_positions(labels)
        logits, taken, outputs = _forward_gathered(model, head, inputs, labels, rows, cols, empty=True)
        if len(taken) == len(outputs) == 1 and logits is outputs[0][0] and logits._version == outputs[0][1]:
            return linear_cross_entropy(taken[0], linear.weight, linear.bias, targets, chunk)
        # the model changed or replaced the head's output: this forward was not exact, redo it
    return summed_cross_entropy(*labelled_logits(model, inputs, labels))


class LabelledLoss(nn.Module):
    """A causal LM whose forward(labels=..., **inputs) returns `labelled_loss` (a scalar): the module the training
    loop runs and DDP wraps, so the whole loss is computed inside DDP's forward and the gradients of every
    trainable parameter, the output layer's included, reach DDP's hooks. Parameters are the model's own."""

    def __init__(self, model: nn.Module, chunk: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunk = chunk

    def forward(self, labels: Tensor, **inputs: Tensor) -> Tensor:
        return labelled_loss(self.model, inputs, labels, self.chunk)


__all__ = ["LabelledLoss", "labelled_logits", "labelled_loss", "labelled_positions"]
