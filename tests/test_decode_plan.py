"""decode_plan: a fused inference plan for one generate call. The reference is independent of it: a plain copy of the
base whose adapted weights are W + (α/r)·B·A computed here from the adapter's parameters."""

import copy
import weakref

import pytest
import torch

from lorakit import LoraConfig, disabled, inject, per_row_adapters
from lorakit.decode_plan import PlanEntry, decode_plan
from lorakit.layers import LoraLinear
from tests.conftest import make_tiny, randomize_adapters, tiny_inputs

IDS = torch.tensor([[5, 17, 42, 8, 9, 33], [3, 3, 71, 20, 1, 64]])


def _adapted(kind: str, targets, r: int = 4, alpha: float = 8.0):
    """(model with adapter "a", random nonzero factors; a dense copy of its base with W + (α/r)·B·A folded in)."""
    model = make_tiny(kind)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # nonzero biases (transformers starts them at 0), so the plan's handling of them is seen
        for p_name, p in model.named_parameters():
            if p_name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    dense = copy.deepcopy(model)
    inject(model, LoraConfig(r=r, alpha=alpha, targets=targets), "a")
    randomize_adapters(model, "a", std=0.2, seed=3)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLinear):
                A, B = m.A("a"), m.B("a")
                w = dense.get_submodule(name).weight
                w += (alpha / r) * (B @ A).to(w.dtype) if not m.fan_in_fan_out else (alpha / r) * (B @ A).t()
    return model, dense


def _no_fallback(monkeypatch):
    """Inside a plan every covered call must take it: the layers' own inference paths raise if reached."""
    def refuse(*_):
        raise AssertionError("a LoRA layer fell back to its own path inside the plan")
    monkeypatch.setattr(LoraLinear, "_infer_one", refuse)
    monkeypatch.setattr(LoraLinear, "_use_base_only", refuse)


@pytest.mark.parametrize("kind,targets,covered", [("llama", "all-linear", 14), ("llama", ["q_proj", "v_proj"], 4),
                                                  ("gpt2", "all-linear", 8)])
def test_plan_equals_the_dense_reference_and_covers_every_adapted_layer(kind, targets, covered, monkeypatch):
    model, dense = _adapted(kind, targets)
    # 2 x 7 rows take the few-rows path (D in buffers), 4 x 9 the many-rows one (h shared, hᵢ·sᵢBᵢᵀ added per layer)
    shapes = [(2, 7), (4, 9)]
    with torch.no_grad():
        want = [dense(**tiny_inputs(kind, *shape)).logits for shape in shapes]
        _no_fallback(monkeypatch)
        with decode_plan(model) as n:
            got = [model(**tiny_inputs(kind, *shape)).logits for shape in shapes]
    assert n == covered  # Llama: 7 linear layers a block, 2 blocks; GPT-2 (Conv1D with biases): 4 a block
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_greedy_tokens_with_the_kv_cache_equal_the_dense_models():
    model, dense = _adapted("llama", "all-linear")
    options = {"max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        want = dense.generate(IDS, **options)
        with decode_plan(model):
            got = model.generate(IDS, **options)
    with torch.inference_mode(), decode_plan(model):  # inference tensors keep no version counter
        in_inference_mode = model.generate(IDS, **options)
    assert torch.equal(got, want) and torch.equal(in_inference_mode, want)


def test_a_group_member_called_with_another_input_runs_its_own_path():
    model, dense = _adapted("llama", "all-linear")
    attn = model.model.layers[0].self_attn
    x, other = torch.randn(2, 3, 32), torch.randn(2, 3, 32)
    ref = dense.model.layers[0].self_attn
    with torch.no_grad(), decode_plan(model):
        attn.q_proj(x)  # the group's first layer stores x's D ...
        torch.testing.assert_close(attn.k_proj(other), ref.k_proj(other), rtol=1e-5, atol=1e-5)  # ... not other's
        x.add_(1.0)  # same tensor, changed in place: its version differs, so v must not reuse D
        torch.testing.assert_close(attn.v_proj(x), ref.v_proj(x), rtol=1e-5, atol=1e-5)


def test_later_members_follow_their_first_layer_when_it_declines_the_plan():
    model, _ = _adapted("llama", "all-linear")
    base = make_tiny("llama")  # the same seed: the bare base's weights
    attn, bare = model.model.layers[0].self_attn, base.model.layers[0].self_attn
    x = torch.randn(1, 1, 32)
    with torch.no_grad(), decode_plan(model):
        attn.q_proj(x)  # D planned for x ...
        with per_row_adapters(model, [None]):  # ... then the row asks for the base: q declines the plan, so k and v
            attn.q_proj(x)  # (which check only that x is the tensor q saw) must not reuse the D planned before
            torch.testing.assert_close(attn.k_proj(x), bare.k_proj(x))
            torch.testing.assert_close(attn.v_proj(x), bare.v_proj(x))


def test_gradients_and_per_row_contexts_inside_a_plan_take_the_layers_own_paths():
    model, dense = _adapted("llama", ["q_proj", "v_proj"])
    ids = IDS[:1]
    with decode_plan(model):
        loss = model(input_ids=ids).logits.square().mean()
        loss.backward()
        with torch.no_grad(), per_row_adapters(model, [None]):
            base_rows = model(input_ids=ids).logits
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(g.abs().sum() > 0 for g in grads.values())
    model.zero_grad()
    model(input_ids=ids).logits.square().mean().backward()  # outside the plan: the same gradients
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-7)
    with torch.no_grad(), disabled(model):
        torch.testing.assert_close(base_rows, model(input_ids=ids).logits)  # the row asked for the base


def test_merged_disabled_or_several_active_layers_are_left_out_and_keep_their_results():
    model, dense = _adapted("llama", ["q_proj", "v_proj"])
    inject(model, LoraConfig(r=2, targets=["v_proj"]), "b")  # v_proj now holds two adapters
    from lorakit import merge, set_adapter, unmerge

    set_adapter(model, ["a", "b"])
    with decode_plan(model) as n:
        assert n == 2  # q_proj only: v_proj has two active adapters
    set_adapter(model, "a")
    merge(model)
    with torch.no_grad(), decode_plan(model) as n:
        assert n == 0
        torch.testing.assert_close(model(input_ids=IDS).logits, dense(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
    unmerge(model)
    with torch.no_grad(), disabled(model), decode_plan(model) as n:
        assert n == 0


def test_bf16_base_with_fp32_adapters_stays_within_bf16_rounding():
    model, dense = _adapted("llama", "all-linear")
    model.to(torch.bfloat16)
    for m in model.modules():
        if isinstance(m, LoraLinear):
            for p in m.adapter_params("a"):
                p.data = p.data.float()  # lorakit keeps adapters in fp32 on a 16-bit base
    with torch.no_grad():
        want = dense(input_ids=IDS).logits
        with decode_plan(model) as n:
            got = model(input_ids=IDS).logits.float()
    assert n == 14
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


def test_the_plan_leaves_nothing_behind_and_copies_taken_inside_carry_no_entry():
    model, _ = _adapted("llama", "all-linear")
    before = {n: set(vars(m)) for n, m in model.named_modules()}
    with torch.no_grad(), decode_plan(model):
        model(input_ids=IDS)
        clone = copy.deepcopy(model)
        assert isinstance(vars(model.model.layers[0].self_attn.q_proj).get("forward"), PlanEntry)
    assert {n: set(vars(m)) for n, m in model.named_modules()} == before
    assert not any("forward" in vars(m) for m in clone.modules())


@pytest.mark.parametrize("shape", [(2, 7), (4, 9)])  # the few-rows (buffers) and the many-rows paths
def test_a_forward_leaves_no_group_holding_its_input(shape):
    # A group's first layer keeps (x, ...) for the later ones; kept past the group, 60 prefill inputs of SmolLM2 stayed
    # alive until the next forward and fragmented the heap (~20k page faults a prefill; RESULTS.md, session 17).
    model, _ = _adapted("llama", "all-linear")
    seen = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    with torch.no_grad(), decode_plan(model):
        model(**tiny_inputs("llama", *shape))
        x = weakref.ref(seen.pop())
        hook.remove()
        assert x() is None  # the normed hidden states q, k and v read are gone once the forward returns


def test_a_nested_plan_covers_the_layers_again_and_equals_the_dense_model():
    model, dense = _adapted("llama", "all-linear")
    with torch.no_grad(), decode_plan(model) as outer, decode_plan(model) as inner:
        got = model(input_ids=IDS).logits
        assert inner == outer == 14
        torch.testing.assert_close(got, dense(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_a_plan_for_a_named_adapter_serves_rows_that_all_use_it_and_only_those(monkeypatch):
    model, dense = _adapted("llama", "all-linear")
    inject(model, LoraConfig(r=2, targets=["q_proj", "v_proj"]), "b")  # now active: b; the plan is for "a"
    randomize_adapters(model, "b", std=0.2, seed=4)
    with torch.no_grad():
        want_a = dense(input_ids=IDS).logits
        with decode_plan(model, "a") as n:
            assert n == 14
            with per_row_adapters(model, ["b", "a"]):  # mixed rows: each layer's own per-row path
                mixed = model(input_ids=IDS).logits
            _no_fallback(monkeypatch)
            monkeypatch.setattr(LoraLinear, "_forward_rows", lambda *_: (_ for _ in ()).throw(AssertionError()))
            with per_row_adapters(model, ["a", "a"]):  # every row uses "a": the plan
                got = model(input_ids=IDS).logits
    torch.testing.assert_close(got, want_a, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1:], want_a[1:], rtol=1e-5, atol=1e-5)


def test_disabling_or_merging_inside_a_plan_is_not_overridden_by_it():
    model, dense = _adapted("llama", "all-linear")
    from lorakit import merge, unmerge

    base = make_tiny("llama")  # the same seed: the bare base's weights
    with torch.no_grad(), decode_plan(model):
        with disabled(model):
            torch.testing.assert_close(model(input_ids=IDS).logits, base(input_ids=IDS).logits)
        merge(model)
        torch.testing.assert_close(model(input_ids=IDS).logits, dense(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
        unmerge(model)


def _decode_logits(model, ids: torch.Tensor, steps: int) -> list[torch.Tensor]:
    """Greedy decoding one row at a time with the KV cache: the logits of every step (prefill first)."""
    out = model(input_ids=ids, use_cache=True)
    logits, cache = [out.logits[:, -1]], out.past_key_values
    for _ in range(steps):
        nxt = logits[-1].argmax(-1, keepdim=True)
        out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
        logits.append(out.logits[:, -1])
        cache = out.past_key_values
    return logits


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batch_one_decode_steps_take_the_one_row_path_and_equal_the_dense_model(kind, monkeypatch):
    model, dense = _adapted(kind, "all-linear")  # GPT-2: Conv1D with biases, fused into the one-row D
    calls = []  # the one-row path's product (torch.baddbmm, which neither model calls itself), counted
    baddbmm = torch.baddbmm
    monkeypatch.setattr(torch, "baddbmm", lambda *a: calls.append(1) or baddbmm(*a))
    with torch.no_grad():
        want = _decode_logits(dense, IDS[:1], 8)
    _no_fallback(monkeypatch)
    with decode_plan(model):
        with torch.inference_mode():  # the buffers made here are written under no_grad next, and the other way round
            got_inference = _decode_logits(model, IDS[:1], 8)
        with torch.no_grad():
            got = _decode_logits(model, IDS[:1], 8)
        with torch.inference_mode():
            got_inference += _decode_logits(model, IDS[:1], 8)
    # every adapted layer (Llama: 7 a block; GPT-2: c_attn, c_proj, c_fc, c_proj) of both blocks, at every decode step
    # of the 3 runs; the prefills (6 rows) take F.linear
    assert len(calls) == 3 * 8 * 2 * (7 if kind == "llama" else 4)
    for g, w in zip(got + got_inference, want * 3, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decode_steps_of_a_few_sequences_use_the_buffers_and_equal_the_dense_model(kind, monkeypatch):
    import importlib
    import types

    plan_module = importlib.import_module("lorakit.decode_plan")  # the module (lorakit.decode_plan is the function)
    model, dense = _adapted(kind, "all-linear")
    calls = []  # the buffered path's F.linear, counted (only decode_plan's reference to F is replaced)
    monkeypatch.setattr(plan_module, "F", types.SimpleNamespace(
        linear=lambda *a: calls.append(a[2].shape) or torch.nn.functional.linear(*a)))
    with torch.no_grad():
        want = _decode_logits(dense, IDS, 8) + _decode_logits(dense, IDS[:, :3], 8)
    _no_fallback(monkeypatch)
    with torch.no_grad(), decode_plan(model):
        got = _decode_logits(model, IDS, 8) + _decode_logits(model, IDS[:, :3], 8)  # the buffers follow the shape
    # the two prefills (2 x 6 and 2 x 3 rows: at most FEW_ROWS) and 2 x 8 decode steps of 2 rows, every adapted layer;
    # each layer's bias is its columns of D viewed in x's shape
    layers = 2 * (7 if kind == "llama" else 4)
    assert len(calls) == 2 * 9 * layers and {shape[:-1] for shape in calls} == {(2, 6), (2, 3), (2, 1)}
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_one_row_followers_check_the_input_and_threads_keep_their_own_buffers():
    model, dense = _adapted("llama", "all-linear")
    attn, ref = model.model.layers[0].self_attn, dense.model.layers[0].self_attn
    x, other = torch.randn(1, 1, 32), torch.randn(1, 1, 32)
    with torch.no_grad(), decode_plan(model):
        attn.q_proj(x)
        torch.testing.assert_close(attn.k_proj(other), ref.k_proj(other), rtol=1e-5, atol=1e-5)
        x.add_(1.0)  # changed in place after the first layer wrote D: v must compute its own
        torch.testing.assert_close(attn.v_proj(x), ref.v_proj(x), rtol=1e-5, atol=1e-5)

    # Two threads decode different prompts through one plan at once: each step of each equals the dense model's.
    import threading

    prompts = [IDS[:1], IDS[1:]]
    with torch.no_grad():
        wants = [_decode_logits(dense, p, 12) for p in prompts]
    results, errors = {}, []

    def decode(i: int) -> None:
        try:
            with torch.no_grad():
                for _ in range(5):
                    results[i] = _decode_logits(model, prompts[i], 12)
                    for g, w in zip(results[i], wants[i], strict=True):
                        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        except Exception as e:  # noqa: BLE001 - a thread's failure of any kind is reported by the main thread
            errors.append(e)

    with decode_plan(model):
        threads = [threading.Thread(target=decode, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors and len(results) == 2
