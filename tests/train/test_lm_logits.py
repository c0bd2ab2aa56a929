"""The causal-LM loss on labelled positions only (lm_logits.py) against the dense reference: a plain forward
with full (B, T, V) logits and F.cross_entropy over logits[:, :-1] vs labels[:, 1:]. Loss and every trainable
gradient, for GPT-2 and Llama with tied and untied heads, every training method, activation checkpointing
and bf16 autocast, all-labelled, partly labelled and unlabelled batches, through the fused output layer
(several chunks) where it is exact; models that change the head's output (Gemma 2's soft-capping, Cohere's
logit scale, a wrapper) or whose head is LoRA-wrapped take the gathered logits and still match; a model
without an output layer falls back to the full logits. No (N, V) tensor is made on the fused path."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from lorakit.train import linear_ce
from lorakit.train.config import TrainConfig
from lorakit.train.lm_logits import LabelledLoss, labelled_logits, labelled_loss
from lorakit.train.loop import _enable_checkpointing
from lorakit.train.methods import prepare
from tests.conftest import randomize_adapters

VOCAB = 100
CHUNK = 5  # rows per chunk of the fused loss: the "some" batch has 22 targets, "all" 34


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


def _batch(labelled: str = "some") -> tuple[dict, torch.Tensor]:
    """Right-padded rows of 12, 9, 5 and 12 tokens. labelled "some": prompts of 4, 9 (no label at all), 2 and 0
    tokens masked; "all": every real token labelled; "none": no label anywhere."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (4, 12), generator=g)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, (length, prompt) in enumerate([(12, 4), (9, 9), (5, 2), (12, 0)]):
        mask[row, :length] = 1
        start = {"some": prompt, "all": 0, "none": length}[labelled]
        labels[row, start:length] = ids[row, start:length]
    return {"input_ids": ids, "attention_mask": mask}, labels


def _dense_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    logits = model(**inputs).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


def _labelled_loss(model: nn.Module, inputs: dict, labels: torch.Tensor) -> torch.Tensor:
    return LabelledLoss(model, chunk=CHUNK)(labels=labels, **inputs)  # as the training loop calls it


def _loss_and_grads(model: nn.Module, loss_fn, bf16: bool = False, labelled: str = "some") -> tuple[torch.Tensor, dict]:
    model.zero_grad(set_to_none=True)
    inputs, labels = _batch(labelled)
    with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
        loss = loss_fn(model, inputs, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None for g in grads.values())
    return loss.detach(), grads


def _assert_same(model: nn.Module, rtol: float = 1e-5, atol: float = 1e-6, bf16: bool = False,
                 labelled: str = "some") -> None:
    ref_loss, ref_grads = _loss_and_grads(model, _dense_loss, bf16, labelled)
    loss, grads = _loss_and_grads(model, _labelled_loss, bf16, labelled)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=atol)
    assert grads.keys() == ref_grads.keys() and ref_grads
    assert max(float(g.abs().max()) for g in ref_grads.values()) > 1e-3  # the comparison means something
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=atol, msg=name)


def _head_inputs(model: nn.Module) -> list[tuple]:
    """The shapes the output layer's forward will be called on, recorded (what shows fused vs gathered logits);
    by wrapping its forward, since a forward hook on it would rule the fused path out."""
    head, seen = model.get_output_embeddings(), []
    forward = head.forward

    def recording(x, *args, **kwargs):
        seen.append(tuple(x.shape))
        return forward(x, *args, **kwargs)

    head.forward = recording
    return seen


@pytest.mark.parametrize("labelled", ["some", "all"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("tied", [True, False])
def test_loss_and_all_gradients_equal_the_full_logits(family, tied, labelled):
    model = _tiny(family, tied)
    assert (model.get_output_embeddings().weight is model.get_input_embeddings().weight) == tied
    seen = _head_inputs(model)
    _assert_same(model, labelled=labelled)  # every parameter trains: the head's (tied: the embedding's) included
    assert seen[1] == (0, 32)  # after the dense reference's call: the fused path, the head's own output empty


@pytest.mark.parametrize("method", ["lora", "top-k", "bitfit", "head", "adapter", "adapter-l", "prefix", "prompt"])
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_every_method_gets_the_full_logits_gradients(family, method):
    model = _tiny(family, tied=method != "head", biases=method == "bitfit")  # a tied head is no separate head
    prepare(model, TrainConfig(method=method, targets="all-linear", top_k=1, prefix_length=3), "causal_lm")
    randomize_adapters(model)  # LoRA's B = 0 would leave A without a gradient
    seen = _head_inputs(model)
    _assert_same(model)
    assert seen[1] == (0, 32)  # fused


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_activation_checkpointing_and_bf16_autocast(family):
    model = _tiny(family, tied=True)
    prepare(model, TrainConfig(method="lora", targets="all-linear"), "causal_lm")
    randomize_adapters(model)
    _enable_checkpointing(model)
    seen = _head_inputs(model)
    _assert_same(model)
    assert seen[1] == (0, 32)  # fused
    _assert_same(model, rtol=1e-3, atol=1e-5, bf16=True)  # the same bf16 products (measured equal); room for blocking


def test_lora_with_an_untied_head_trained_in_full_is_fused():
    model = _tiny("llama", tied=False)  # the head is a modules_to_save copy: a SavedModule around an nn.Linear
    prepare(model, TrainConfig(method="lora", targets="all-linear"), "causal_lm")
    randomize_adapters(model)
    seen = _head_inputs(model)
    _assert_same(model, labelled="all")
    assert seen[1] == (0, 32)


def test_no_labels_give_zero_loss_and_zero_gradients():
    model = _tiny("llama", tied=True)
    prepare(model, TrainConfig(method="lora", targets="all-linear"), "causal_lm")
    randomize_adapters(model)
    ref_loss, ref_grads = _loss_and_grads(model, _dense_loss, labelled="none")
    loss, grads = _loss_and_grads(model, _labelled_loss, labelled="none")
    assert float(ref_loss) == float(loss) == 0.0
    assert all(torch.equal(g, torch.zeros_like(g)) for g in [*grads.values(), *ref_grads.values()])


def test_without_grad_only_the_loss_is_computed(monkeypatch):
    model = _tiny("gpt2", tied=True).eval()
    inputs, labels = _batch("all")
    with torch.no_grad():
        ref = _dense_loss(model, inputs, labels)
        monkeypatch.setattr(linear_ce, "_loss_and_logit_grad", None)  # the gradient pass: must not run
        loss = labelled_loss(model, inputs, labels, chunk=CHUNK)
    assert loss.grad_fn is None
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)


def test_the_gathered_logits_path_sees_only_the_labelled_rows_and_the_hooks_are_removed():
    model = _tiny("llama", tied=True)
    head = model.get_output_embeddings()
    seen = _head_inputs(model)
    inputs, labels = _batch()
    logits, _ = labelled_logits(model, inputs, labels)
    assert seen == [(int((labels[:, 1:] != -100).sum()), 32)] and logits.shape == (seen[0][0], VOCAB)
    assert not head._forward_pre_hooks and not head._forward_hooks
    for run in (labelled_logits, labelled_loss):
        with pytest.raises(IndexError):  # a failing forward leaves no hook behind either
            run(model, {"input_ids": inputs["input_ids"] + 1000}, labels)
        assert not head._forward_pre_hooks and not head._forward_hooks


def _after_head(family: str) -> nn.Module:
    """Tiny models whose forward changes the output layer's logits: Gemma 2 soft-caps them (5 here, so it
    matters), Cohere scales them by its config's logit_scale."""
    import transformers as tf

    torch.manual_seed(0)
    sizes = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": VOCAB, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
    if family == "gemma2":
        return tf.Gemma2ForCausalLM(tf.Gemma2Config(head_dim=8, final_logit_softcapping=5.0, **sizes)).train()
    return tf.CohereForCausalLM(tf.CohereConfig(logit_scale=0.5, **sizes)).train()


@pytest.mark.parametrize("family", ["gemma2", "cohere"])
def test_a_model_that_changes_the_logits_after_the_head_takes_the_gathered_logits(family):
    model = _after_head(family)
    seen = _head_inputs(model)
    _assert_same(model, labelled="all")
    assert seen[1] == (int((_batch("all")[1][:, 1:] != -100).sum()), 32)  # (N, d): the gathered logits


def test_lora_on_the_head_takes_the_gathered_logits():
    model = _tiny("gpt2", tied=True)
    prepare(model, TrainConfig(method="lora", targets=["c_attn", "lm_head"]), "causal_lm")
    randomize_adapters(model)
    seen = _head_inputs(model)
    assert type(model.get_output_embeddings()) is not nn.Linear
    _assert_same(model)
    assert seen[1] == (22, 32)


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


class _Scaling(_Reshaping):
    """Exposes a plain nn.Linear output layer and no config, but scales its logits afterwards (a new tensor, or in
    place): only the check after the forward can see it."""

    def __init__(self, lm: nn.Module, in_place: bool) -> None:
        super().__init__(lm)
        self.in_place = in_place

    def forward(self, **inputs):
        out = self.lm(**inputs)
        out.logits = out.logits.mul_(2.0) if self.in_place else out.logits * 2.0
        return out


@pytest.mark.parametrize("in_place", [False, True])
def test_a_change_after_the_head_that_no_config_tells_is_caught_and_redone(in_place):
    model = _Scaling(_tiny("llama", tied=True), in_place)
    seen = _head_inputs(model)
    _assert_same(model)
    assert seen[1:] == [(0, 32), (22, 32)]  # fused first, found changed, then the gathered logits


class _LargestOutput(TorchDispatchMode):
    """Records the element count of the largest tensor any op produces."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        sizes = [t.numel() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        self.largest = max([self.largest, *sizes])
        return out


def test_the_fused_loss_never_makes_a_tensor_of_n_by_v():
    """A large vocabulary (V = 4,096 against d = 32, every token of 4 × 64 labelled: N = 252): every op's
    output in forward and backward stays below N·V / 4 (the chunks are (16, V)); the gathered logits make N·V."""
    import transformers as tf

    torch.manual_seed(0)
    vocab = 4096
    model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab,
                                               tie_word_embeddings=True)).train()
    prepare(model, TrainConfig(method="lora", targets="all-linear"), "causal_lm")
    ids = torch.randint(0, vocab, (4, 64), generator=torch.Generator().manual_seed(0))
    inputs, n = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}, 4 * 63
    largest = {}
    for name, run in [("fused", lambda: labelled_loss(model, inputs, ids, chunk=16)),
                      ("gathered", lambda: linear_ce.summed_cross_entropy(*labelled_logits(model, inputs, ids)))]:
        with _LargestOutput() as mode:
            run().backward()
        largest[name] = mode.largest
    assert largest["gathered"] >= n * vocab
    assert largest["fused"] < n * vocab / 4, largest


def test_under_inference_mode_the_loss_is_the_dense_one():
    # inference_mode tensors have no version counter to check, so the plain gathered path runs
    model = _tiny("llama", tied=True).eval()
    inputs, labels = _batch("some")
    with torch.no_grad():
        ref = _dense_loss(model, inputs, labels)
    with torch.inference_mode():
        loss = labelled_loss(model, inputs, labels, chunk=CHUNK)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
