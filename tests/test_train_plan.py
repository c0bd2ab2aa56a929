"""train_plan: layers that read one input trained as one autograd function. The reference is independent of it: the
same model with every LoRA layer computing F.linear(x, W + (α/r)·B·A, b) through plain autograd, so the factors' and
the input's gradients come from torch's own derivatives of the dense formula."""

import pytest
import torch
import torch.nn.functional as F

from lorakit import LoraConfig, inject, set_adapter, train_plan
from lorakit.layers import LoraLinear
from tests.conftest import make_minilm, make_tiny, randomize_adapters, tiny_inputs

FUSED = "_SharedInputLoraBackward"


def _dense_forward(self, x):
    (name,) = self.active
    return F.linear(x, self.weight_out_in() + self.scale[name] * self.B(name) @ self.A(name), self.base_layer.bias)


def _adapted(kind: str, targets="all-linear", dropout: float = 0.0):
    model = (make_minilm() if kind == "minilm" else make_tiny(kind)).train()
    inject(model, LoraConfig(r=4, alpha=8, targets=targets, dropout=dropout))
    randomize_adapters(model, std=0.02 if kind == "minilm" else 0.2, seed=3)  # 384 wide: 0.2 saturates softmax
    if kind == "minilm":  # BERT's q/k/v have biases: train them too (as BitFit would), so their gradients count
        for m in model.modules():
            if isinstance(m, LoraLinear):
                m.base_layer.bias.requires_grad_(True)
    return model


def _step(model, inputs: dict) -> tuple[torch.Tensor, dict, int]:
    """(loss, every gradient (LoRA factors and the input embeddings), fused group functions in the graph)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # T5's own dropout draws the same masks in every run
    emb = model.get_input_embeddings()(inputs["input_ids"]).detach().requires_grad_()
    args = {k: v for k, v in inputs.items() if k != "input_ids"}
    out = model(inputs_embeds=emb, **args)
    loss = (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().mean()
    fused = _count(loss.grad_fn, FUSED)
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), {**grads, "inputs_embeds": emb.grad}, fused


def _count(fn, name: str) -> int:
    seen, stack, n = set(), [fn], 0
    while stack:
        f = stack.pop()
        if f is None or f in seen:
            continue
        seen.add(f)
        n += type(f).__name__ == name
        stack.extend(g for g, _ in f.next_functions)
    return n


def _reference(model, inputs: dict, monkeypatch) -> tuple[torch.Tensor, dict]:
    with monkeypatch.context() as m:
        m.setattr(LoraLinear, "forward", _dense_forward)
        loss, grads, _ = _step(model, inputs)
    return loss, grads


def _assert_equal(got: tuple, want: tuple) -> None:
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-6)
    assert got[1].keys() == want[1].keys()
    for name in want[1]:
        torch.testing.assert_close(got[1][name], want[1][name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind,targets,seq,groups", [
    ("llama", "all-linear", 12, 4),  # q/k/v and gate/up of 2 blocks (24 rows: folding B·A pays at 32→64)
    ("llama", ["q_proj", "v_proj"], 12, 2),  # q and v: a group of two with k not adapted
    ("t5", "all-linear", 12, 4),  # encoder and decoder self-attention; cross-attention (q ≠ k, v's input) is not
    ("minilm", "all-linear", 100, 6),  # the real MiniLM: query/key/value with biases, 6 blocks (200 rows > 192)
])
def test_the_first_step_watches_later_steps_fuse_and_all_equal_the_dense_formulas(kind, targets, seq, groups,
                                                                                   monkeypatch):
    model = _adapted(kind, targets)
    inputs = tiny_inputs(kind if kind != "minilm" else "llama", batch=2, seq=seq)
    if kind == "t5":  # the decoder's 24 rows too, so its groups fold (and so would cross-attention's, if it fused)
        inputs["decoder_input_ids"] = inputs["input_ids"]
    if kind == "minilm":  # its encoder's states: a 2-logit head of random weights sums too few values to compare
        model = model.base_model
    want = _reference(model, inputs, monkeypatch)
    with train_plan(model):
        *first, fused_first = _step(model, inputs)
        *second, fused_second = _step(model, inputs)
        *third, fused_third = _step(model, inputs)
    assert (fused_first, fused_second, fused_third) == (0, groups, groups)
    for got in (first, second, third):
        _assert_equal(got, want)


def test_few_rows_and_what_the_plan_was_not_built_for_take_the_layers_own_path(monkeypatch):
    model = _adapted("llama")
    few = tiny_inputs("llama", batch=1, seq=8)  # 8 rows: two rank-r products beat folding B·A into W
    want = _reference(model, few, monkeypatch)
    with train_plan(model) as covered:
        _step(model, tiny_inputs("llama", batch=2, seq=12))  # confirms the groups
        *got, fused = _step(model, few)
    assert covered == 10 and fused == 0  # 5 grouped layers a block
    _assert_equal(got, want)


@pytest.mark.parametrize("case", ["dropout", "autocast", "two active adapters", "no gradient"])
def test_cases_the_plan_does_not_cover(case):
    model = _adapted("llama", dropout=0.1 if case == "dropout" else 0.0)
    if case == "two active adapters":
        inject(model, LoraConfig(r=2, alpha=2, targets="all-linear"), "second")
        set_adapter(model, ["default", "second"])
    emb = torch.randn(2, 12, 32, requires_grad=True)
    with train_plan(model) as covered:
        for _ in range(2):
            with torch.autocast("cpu", torch.bfloat16, enabled=case == "autocast"), \
                    torch.set_grad_enabled(case != "no gradient"):
                out = model(inputs_embeds=emb).logits
    assert covered == (0 if case in ("dropout", "two active adapters") else 10)
    assert out.grad_fn is None or _count(out.grad_fn, FUSED) == 0


def test_a_member_called_with_another_or_a_changed_input_computes_its_own():
    model = _adapted("llama")
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(2, 12, 32), torch.randn(2, 12, 32)
    with train_plan(model):
        for m in (attn.q_proj, attn.k_proj, attn.v_proj):  # seen with one input: confirmed
            m(x)
        q = attn.q_proj(x)  # computes q, k and v for x in one function ...
        k = attn.k_proj(other)  # ... so k must compute its own for another tensor,
        v = attn.v_proj(x)  # and v too: the group went back to watching
        assert type(q.grad_fn).__name__ == FUSED and type(k.grad_fn).__name__ != FUSED != type(v.grad_fn).__name__
        q = attn.q_proj(x)  # watching again (q computes alone): q, k, v seen with x ...
        assert type(q.grad_fn).__name__ != FUSED
        attn.k_proj(x)
        attn.v_proj(x)
        attn.q_proj(x)  # ... and confirmed, so q computes for all; x changed in place before k reads it
        x.add_(1.0)
        k2 = attn.k_proj(x)
        assert type(k2.grad_fn).__name__ != FUSED
    with torch.no_grad():
        for layer, inp, out in ((attn.k_proj, other, k), (attn.v_proj, x - 1.0, v), (attn.k_proj, x, k2)):
            torch.testing.assert_close(out, _dense_forward(layer, inp), rtol=1e-5, atol=1e-6)


def test_on_exit_no_layer_keeps_the_plan_or_its_tensors():
    model = _adapted("llama")
    inputs = tiny_inputs("llama", seq=12)
    with train_plan(model):
        for _ in range(2):
            model(**inputs).logits.sum().backward()
        attn = model.model.layers[0].self_attn
        attn.q_proj(torch.randn(2, 12, 32))  # a confirmed group's first layer whose followers never come
        group = attn.q_proj.__dict__["_train_plan"].group
        assert group.outs is not None
    assert group.outs is None and group.probe is None
    assert not any("_train_plan" in m.__dict__ for m in model.modules())
    out = model(**inputs).logits
    assert _count(out.grad_fn, FUSED) == 0


def test_a_model_with_activation_checkpointing_is_not_covered_and_trains_as_the_dense_formulas(monkeypatch):
    # A group confirmed between a block's forward and its recomputation would save other tensors, which
    # torch.utils.checkpoint refuses: the plan must cover nothing there.
    model = _adapted("llama")
    model.activation_checkpointing_enable()
    inputs = tiny_inputs("llama", seq=12)
    want = _reference(model, inputs, monkeypatch)
    with train_plan(model) as covered:
        steps = [_step(model, inputs) for _ in range(3)]
    assert covered == 0
    for *got, fused in steps:
        assert fused == 0
        _assert_equal(got, want)
