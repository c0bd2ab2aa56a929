"""Many adapters on one model: switching, disabling, deleting, merging, unloading, combining."""

import pytest
import torch

from lorakit import (
    AdapterNotFound,
    LoraConfig,
    LoraConfigError,
    LoraStateError,
    active_adapters,
    combine,
    delete_adapter,
    disabled,
    inject,
    merge,
    merge_and_unload,
    save_adapter,
    set_adapter,
    unmerge,
)
from lorakit.layers import LoraModule
from lorakit.saved import SavedModule
from tests.conftest import make_minilm, make_tiny, randomize_adapters

IDS = torch.tensor([[101, 2023, 3185, 2003, 2307, 999, 102]])


def _logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _two_adapter_minilm():
    model = make_minilm()
    base = _logits(model)
    inject(model, LoraConfig(r=4, modules_to_save=["classifier"]), "a")
    inject(model, LoraConfig(r=2, targets=["query", "key"]), "b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    return model, base


def test_set_active_disable_delete():
    model, base = _two_adapter_minilm()
    assert active_adapters(model) == ["b"]  # inject activates the newest
    set_adapter(model, "a")
    out_a = _logits(model)
    set_adapter(model, "b")
    out_b = _logits(model)
    assert not torch.allclose(out_a, out_b)
    with disabled(model):
        torch.testing.assert_close(_logits(model), base, rtol=0, atol=0)
    set_adapter(model, ["a", "b"])
    assert active_adapters(model) == ["a", "b"]
    with pytest.raises(AdapterNotFound, match="'c'.*a.*b"):
        set_adapter(model, "c")
    delete_adapter(model, "b")
    assert active_adapters(model) == ["a"]
    torch.testing.assert_close(_logits(model), out_a)
    assert not any("lora_A.b" in n for n, _ in model.named_parameters())


def test_only_active_adapter_trains():
    model, _ = _two_adapter_minilm()
    set_adapter(model, "a")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".a") or ".modules_to_save.a." in n for n in trainable)


def test_merge_unmerge_and_disabled_while_merged():
    model, base = _two_adapter_minilm()
    set_adapter(model, ["a", "b"])
    both = _logits(model)
    merge(model)
    torch.testing.assert_close(_logits(model), both, rtol=1e-5, atol=1e-5)
    with disabled(model):
        torch.testing.assert_close(_logits(model), base, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_logits(model), both, rtol=1e-5, atol=1e-5)
    unmerge(model)
    torch.testing.assert_close(_logits(model), both, rtol=1e-5, atol=1e-5)


def test_merge_and_unload_is_a_plain_model_that_round_trips(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model, _ = _two_adapter_minilm()
    set_adapter(model, "a")
    expected = _logits(model)
    plain = merge_and_unload(model)
    assert not any(isinstance(m, LoraModule | SavedModule) for m in plain.modules())
    assert not any("lora_" in n or "base_layer" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(_logits(plain), expected, rtol=1e-5, atol=1e-5)
    plain.save_pretrained(tmp_path)
    again = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(again), expected, rtol=1e-5, atol=1e-5)


def test_combine_cat_is_exactly_the_weighted_sum_of_deltas():
    model, _ = _two_adapter_minilm()
    combine(model, ["a", "b"], [0.7, -1.3], "ab", method="cat")
    for m in model.modules():
        if isinstance(m, LoraModule):
            expect = sum(w * m.delta_weight(n) for n, w in (("a", 0.7), ("b", -1.3)) if n in m.adapter_names)
            torch.testing.assert_close(m.delta_weight("ab"), expect, rtol=1e-5, atol=1e-6)
            assert m.r["ab"] == sum(m.r[n] for n in ("a", "b") if n in m.adapter_names)
    set_adapter(model, ["a", "b"])
    # activating both (weights 1, 1) equals a cat combination with weights 1, 1
    combine(model, ["a", "b"], [1.0, 1.0], "sum", method="cat")
    both = _logits(model)
    set_adapter(model, "sum")
    torch.testing.assert_close(_logits(model), both, rtol=1e-5, atol=1e-5)


def test_combine_svd_is_the_best_rank_r_approximation():
    model, _ = _two_adapter_minilm()
    combine(model, ["a", "b"], [1.0, 1.0], "svd2", method="svd", r=2)
    layer = model.bert.encoder.layer[0].attention.self.query  # has both a (r=4) and b (r=2)
    target = layer.delta_weight("a") + layer.delta_weight("b")
    S = torch.linalg.svdvals(target)
    err = torch.linalg.matrix_norm(layer.delta_weight("svd2") - target)
    # Eckart–Young: the Frobenius error of the best rank-2 approximation is √(Σ_{i>2} σᵢ²)
    torch.testing.assert_close(err, S[2:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-5)


def _two_adapter_gpt2():
    """Tiny GPT-2 with its default per-slice c_attn (q and v slices of the fused qkv) under two adapters."""
    model = make_tiny("gpt2")
    inject(model, LoraConfig(r=4, alpha=8), "a")
    inject(model, LoraConfig(r=2, alpha=6), "b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    return model, model.transformer.h[1].attn.c_attn


def _peft_combined(make, ours, names, weights, method, tmp_path):
    """PEFT's own add_weighted_adapter on our adapters (saved, loaded into PEFT): {module: (A, B)} of the result."""
    from peft import PeftModel

    for n in names:
        save_adapter(ours, tmp_path / n, n)
    theirs = PeftModel.from_pretrained(make(), str(tmp_path / names[0]), adapter_name=names[0])
    for n in names[1:]:
        theirs.load_adapter(str(tmp_path / n), adapter_name=n)
    theirs.add_weighted_adapter(names, weights, "comb", combination_type=method)
    return {name.removeprefix("base_model.model."): (m.lora_A["comb"].weight.detach(), m.lora_B["comb"].weight.detach())
            for name, m in theirs.named_modules() if hasattr(m, "lora_A") and "comb" in m.lora_A}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_combine_linear_and_cat_match_peft_add_weighted_adapter(tmp_path):
    model = make_tiny("llama")
    inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), "a")
    inject(model, LoraConfig(r=4, alpha=3, targets=["v_proj", "o_proj"]), "b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    weights = [0.7, -1.3]  # a negative weight: PEFT puts its sign on A
    for method in ("linear", "cat"):
        combine(model, ["a", "b"], weights, method, method=method)
        theirs = _peft_combined(lambda: make_tiny("llama"), model, ["a", "b"], weights, method, tmp_path / method)
        layers = {p: m for p, m in model.named_modules() if isinstance(m, LoraModule) and method in m.adapter_names}
        assert layers.keys() == theirs.keys() and len(layers) == 6
        for p, m in layers.items():
            # PEFT's cat gives every layer the global rank Σr, zero-padding layers that hold fewer adapters
            A, B, r = *theirs[p], m.r[method]
            assert m.scale[method] == 1.0 and not A[r:].any() and not B[:, r:].any()
            torch.testing.assert_close(m.A(method), A[:r], rtol=1e-6, atol=1e-7, msg=p)
            torch.testing.assert_close(m.B(method), B[:, :r], rtol=1e-6, atol=1e-7, msg=p)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_combine_per_slice_layers_match_peft_on_the_dense_form_and_svd_bound(tmp_path):
    # A per-slice layer's file is the dense adapter it equals; PEFT combines those dense factors. linear is
    # linear in (A, B), so PEFT's result must be exactly the dense form of our slice-by-slice result.
    model, layer = _two_adapter_gpt2()
    inject(model, LoraConfig(r=2, alpha=4), "c")
    randomize_adapters(model, "c", seed=3)
    combine(model, ["b", "c"], [0.5, -2.0], "lin", method="linear")
    theirs = _peft_combined(lambda: make_tiny("gpt2"), model, ["b", "c"], [0.5, -2.0], "linear", tmp_path)
    for p, m in model.named_modules():
        if isinstance(m, LoraModule):
            A, B = m.dense_factors("lin")
            torch.testing.assert_close(A, theirs[p][0], rtol=1e-6, atol=1e-7)
            torch.testing.assert_close(B, theirs[p][1], rtol=1e-6, atol=1e-7)
    combine(model, ["a", "b"], [0.7, -1.3], "cat", method="cat")
    target = 0.7 * layer.delta_weight("a") - 1.3 * layer.delta_weight("b")  # Conv1D layout: (in, out)
    torch.testing.assert_close(layer.delta_weight("cat"), target, rtol=1e-5, atol=1e-6)
    assert layer.r["cat"] == 6 and layer.A("cat").shape == (12, 32)  # rank 4 + 2 in each of the 2 slices
    combine(model, ["a", "b"], [0.7, -1.3], "svd", method="svd", r=2)
    size = layer.out_features // 3
    for i in (0, 2):  # q and v: each block is its best rank-2 approximation (Eckart–Young)
        block = target[:, i * size:(i + 1) * size]
        err = torch.linalg.matrix_norm(layer.delta_weight("svd")[:, i * size:(i + 1) * size] - block)
        torch.testing.assert_close(err, torch.linalg.svdvals(block)[2:].pow(2).sum().sqrt(), rtol=1e-4, atol=1e-6)
    assert torch.count_nonzero(layer.delta_weight("svd")[:, size:2 * size]) == 0  # k stays untouched


def test_combine_errors():
    model, _ = _two_adapter_minilm()
    with pytest.raises(LoraConfigError, match=r"method='linear' needs equal ranks, but at bert.encoder.layer.0"):
        combine(model, ["a", "b"], [1, 1], "x", method="linear")
    with pytest.raises(LoraConfigError, match="method='avg'"):
        combine(model, ["a", "b"], [1, 1], "x", method="avg")
    with pytest.raises(LoraConfigError, match=r"2 names but weights \[1\]"):
        combine(model, ["a", "b"], [1], "x", method="cat")


def test_mixed_adapter_batch_equals_each_row_alone(minilm_tokenizer):
    from lorakit import per_row_adapters

    model, base = _two_adapter_minilm()
    batch = minilm_tokenizer(["a gripping, funny film", "dull and far too long", "fine", "not bad at all"],
                             padding=True, return_tensors="pt")
    rows = ["a", "b", None, "a"]
    with torch.no_grad(), per_row_adapters(model, rows):
        mixed = model(**batch).logits
    for i, name in enumerate(rows):
        one = {k: v[i:i + 1] for k, v in batch.items()}
        with torch.no_grad():
            if name is None:
                with disabled(model):
                    alone = model(**one).logits
            else:
                set_adapter(model, name)
                alone = model(**one).logits
        torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5)
    merge(model)
    with pytest.raises(LoraStateError, match="unmerge"), per_row_adapters(model, ["a"]):
        pass


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_implicit_unmerges_restore_weights_bit_for_bit(dtype, tmp_path):
    from lorakit import load_adapter, save_adapter

    model = make_tiny("llama").to(dtype)
    inject(model, LoraConfig(r=4, targets="all-linear"), "a")
    inject(model, LoraConfig(r=2), "b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    save_adapter(model, tmp_path / "b", "b")
    original = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    set_adapter(model, ["a", "b"])
    for _ in range(20):  # merge; then set_adapter, disabled() and load_adapter each unmerge or re-merge
        merge(model)
        with disabled(model):
            pass
        set_adapter(model, "a")
        merge(model)
        set_adapter(model, ["a", "b"])
    merge(model)
    load_adapter(model, tmp_path / "b", "b2")  # added beside a merged pair, the merge stays
    unmerge(model)
    now = model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in original.items())


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tied_embeddings_merge_unmerge_and_unload_keep_outputs(kind, tmp_path):
    import transformers as tf

    from tests.conftest import tiny_inputs

    if kind == "gpt2":
        model, targets = make_tiny("gpt2"), ["c_attn", "wte"]
    else:
        torch.manual_seed(0)
        model = tf.LlamaForCausalLM(tf.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=100,
                                                   tie_word_embeddings=True)).eval()
        targets = ["q_proj", "v_proj", "embed_tokens"]
    head = model.get_output_embeddings()
    assert head.weight is model.get_input_embeddings().weight  # tied
    inject(model, LoraConfig(r=4, targets=targets))
    randomize_adapters(model, std=0.5)
    inputs = tiny_inputs(kind)
    with torch.no_grad():
        expected = model(**inputs).logits
        before = {k: v.clone() for k, v in model.state_dict().items()}
        merge(model)
        torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        unmerge(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        assert head.weight is model.get_input_embeddings().weight  # tied again
        plain = merge_and_unload(model)
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        plain.save_pretrained(tmp_path)
        again = type(plain).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_trained_copy_of_a_tied_head_survives_unload_and_reload(tmp_path):
    from tests.conftest import tiny_inputs

    model = make_tiny("gpt2")  # lm_head is tied to wte
    inject(model, LoraConfig(r=2, modules_to_save=["lm_head"]))
    with torch.no_grad():
        model.lm_head.copy("default").weight.add_(0.5)  # the head copy trains; the embedding must not follow
        expected = model(**tiny_inputs("gpt2")).logits
        plain = merge_and_unload(model)
        assert plain.config.tie_word_embeddings is False
        plain.save_pretrained(tmp_path)
        again = type(plain).from_pretrained(tmp_path).eval()
        torch.testing.assert_close(again(**tiny_inputs("gpt2")).logits, expected, rtol=1e-5, atol=1e-5)
