"""Causal-LM loss on the labelled positions only: the output layer and the softmax run where a loss term is.

A causal LM's output layer maps every position's final hidden state h_t (d) to V logits, and the loss takes a
log-softmax over V at every position; but only positions whose NEXT token carries a label (prompt, padding
and template tokens are -100) enter the loss:

    L = Σ_{(b, t): y[b, t+1] ≠ -100} CE(W_out · h[b, t], y[b, t+1])

So the rows h[b, t] of those positions are gathered first, (N, d) with N the number of targets, and the
output layer turns only them into logits, (N, V): the same loss and gradients as the full (B, T, V) logits,
at N / (B·T) of the output layer's and the softmax's cost and memory (SmolLM2: V = 49,152, d = 576).

How: for the one call, a forward pre-hook on the model's output layer (`get_output_embeddings()`) replaces its
(B, T', d) input by the gathered rows. The model's own forward runs as usual, so whatever it does around the
head stays (final norm, logit scaling or soft-capping, prefix/prompt hooks: prompt tuning's p virtual tokens
come first, so the tokens are the last T of the T' = p + T positions). `LabelledLogits` puts this behind a
module's forward, so DistributedDataParallel can wrap it (calling a wrapped model's submodules would bypass
DDP's gradient synchronisation). A model without an output layer, or whose forward does not call it on
(B, T', d) hidden states, gets its full logits and the same positions taken from them: same result, full cost.
"""

from __future__ import annotations

from torch import Tensor, nn

from lorakit.train.data import IGNORE_INDEX


def labelled_positions(labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(rows, cols, targets) of the positions t whose next token t+1 is labelled; each (N,), row-major order."""
    following = labels[:, 1:]  # position t predicts token t + 1
    rows, cols = (following != IGNORE_INDEX).nonzero(as_tuple=True)
    return rows, cols, following[rows, cols]


def _output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    layer = get() if callable(get) else None
    return layer if isinstance(layer, nn.Module) else None


def labelled_logits(model: nn.Module, inputs: dict[str, Tensor], labels: Tensor) -> tuple[Tensor, Tensor]:
    """(logits (N, V), targets (N,)) at the N positions whose next token is labelled (see the module docstring).

    `model` is a transformers causal LM, `inputs` its keyword inputs (input_ids, attention_mask), `labels`
    (B, T) with -100 where no loss is taken. Σ cross-entropy(logits, targets) equals the full computation's
    cross-entropy over logits[:, :-1] against labels[:, 1:] (ignore_index -100), values and gradients.
    """
    rows, cols, targets = labelled_positions(labels)
    batch, seq = labels.shape
    head = _output_layer(model)
    calls = []

    def gather(module: nn.Module, args: tuple):
        hidden = args[0] if args else None
        if calls or not (isinstance(hidden, Tensor) and hidden.dim() == 3 and hidden.shape[0] == batch
                         and hidden.shape[1] >= seq):
            return None
        calls.append(hidden.shape)
        tokens = hidden[:, hidden.shape[1] - seq:]  # (B, T, d): virtual prompt tokens, if any, come first
        return (tokens[rows, cols], *args[1:])  # (N, d)

    handle = head.register_forward_pre_hook(gather) if head is not None else None
    try:
        logits = model(**inputs).logits
    finally:
        if handle is not None:
            handle.remove()
    if calls and logits.dim() == 2 and logits.shape[0] == rows.numel():
        return logits, targets
    if calls:  # the head saw the gathered rows but the model reshaped its output: redo it the plain way
        logits = model(**inputs).logits
    return logits[:, logits.shape[1] - seq:][rows, cols], targets


class LabelledLogits(nn.Module):
    """A causal LM whose forward(labels=..., **inputs) returns `labelled_logits`: the module the training loop
    runs and DDP wraps, so the gathered forward goes through DDP's forward. Parameters are the model's own."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, labels: Tensor, **inputs: Tensor) -> tuple[Tensor, Tensor]:
        return labelled_logits(self.model, inputs, labels)


__all__ = ["LabelledLogits", "labelled_logits", "labelled_positions"]
