"""The causal-LM loss on labelled positions only (lm_logits.py) against the dense reference: a plain forward
with full (B, T, V) logits and F.cross_entropy over logits[:, :-1] vs labels[:, 1:]. Loss and every trainable
gradient, for GPT-2 and Llama with tied and untied heads, every training method, activation checkpointing
and bf16 autocast; a model without an output layer falls back to the full logits."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lorakit.train.config import TrainConfig
from lorakit.train.lm_logits import LabelledLogits, labelled_logits
from lorakit.train.loop import _enable_checkpointing
from lorakit.train.methods import prepare
from tests.conftest import randomize_adapters

VOCAB = 100


def _tiny(family: str, tied: bool, biases: bool = False) -> nn.Module:
    """A tiny random causal LM without dropout (so train mode is deterministic and checkpointing engages);
    `biases` gives Llama's projections biases (GPT-2 has them anyway)."""
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                tie_word_embeddings=tied)).train()
    return tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB,
                                              tie_word_embeddings=tied, attention_bias=biases,
                                              mlp_bias=biases)).train()


def _batch() -> tuple[dict, torch.Tensor]:
    """Right-padded rows of 12, 9, 5 and 12 tokens; prompts of 4, 9 (no label at all), 2 and 0 tokens masked."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 12), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (length, prompt) in enumerate([(12, 4), (9, 9), (5, 2), (12, 0)]):
        mask[row, :length] = 1
        labels[row, prompt:length] = ids[row, prompt:length]
    return {"input_ids": ids, "attention_mask": mask}, labels


def _dense_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def _labelled_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits, targets = LabelledLogits(model)(labels=labels, **inputs)  # as the training loop calls it
    assert logits.dim() == 2 and targets.shape == (int((labels[:, 1:] != -100).sum()),)
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def _loss_and_grads(model: nn.Module, loss_fn, bf16: bool = False) -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    inputs, labels = _batch()
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = loss_fn(model, inputs, labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_same(model: nn.Module, rtol: float = 1e-5, atol: float = 1e-6, bf16: bool = False) -> None:
    ref_loss, ref_grads = _loss_and_grads(model, _dense_loss, bf16)
    loss, grads = _loss_and_grads(model, _labelled_loss, bf16)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and ref_grads
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3  # the comparison means something
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=atol, msg=name)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_loss_and_all_gradients_equal_the_full_logits(family, tied):
    model = _tiny(family, tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    _assert_same(model)  # every parameter trains: the head's (tied: the embedding's) gradient included


@pytest.mark.parametrize("method", ["lora", "top-k", "bitfit", "head", "adapter", "adapter-l", "prefix", "prompt"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_method_gets_the_full_logits_gradients(family, method):
    model = _tiny(family, tied=method != "head", biases=method == "bitfit")  # a tied head is no separate head
    prepare(model, TrainConfig(method=method, targets="all-linear", top_k=1, prefix_length=3), "causal_lm")
    randomize_adapters(model)  # LoRA's B = 0 would leave A without a gradient
    _assert_same(model)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_and_bf16_autocast(family):
    model = _tiny(family, tied=True)
    prepare(model, TrainConfig(method="lora", targets="all-linear"), "causal_lm")
    randomize_adapters(model)
    _enable_checkpointing(model)
    _assert_same(model)
    _assert_same(model, rtol=1e-3, atol=1e-5, bf16=True)  # the same bf16 products (measured equal); room for blocking


def test_the_output_layer_sees_only_the_labelled_rows_and_the_hook_is_removed():
    model = _tiny("llama", tied=True)
    head, seen = model.get_output_embeddings(), []
    head.register_forward_hook(lambda m, args, out: seen.append(tuple(args[0].shape)))
    inputs, labels = _batch()
    logits, _ = labelled_logits(model, inputs, labels)
    assert seen == [(int((labels[:, 1:] != -100).sum()), 32)] and logits.shape == (seen[0][0], VOCAB)
    assert not head._forward_pre_hooks
    with pytest.raises(IndexError):  # a failing forward leaves no hook behind either
        labelled_logits(model, {"input_ids": inputs["input_ids"] + 1000}, labels)
    assert not head._forward_pre_hooks


class _NoHead(nn.Module):
    """A causal LM that does not expose its output layer."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, **inputs):
        return self.lm(**inputs)


class _Reshaping(_NoHead):
    """Exposes its output layer, but its forward reshapes whatever the layer returns (2-D -> 3-D)."""

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, **inputs):
        out = self.lm(**inputs)
        if out.logits.dim() == 2:
            out.logits = out.logits.unsqueeze(0)
        return out


@pytest.mark.parametrize("wrapper", [_NoHead, _Reshaping])
def test_a_model_that_cannot_gather_falls_back_to_the_full_logits(wrapper):
    _assert_same(wrapper(_tiny("gpt2", tied=True)))
