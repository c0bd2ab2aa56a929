"""Weight-only int8 and int4 (lorakit.quant): the closed-form error of the weights, a quantized layer against the
dense fp32 layer within a bound derived from it, LoRA on a quantized base, and what is refused."""

import pytest
import torch

from lorakit import LoraConfig, LoraStateError, adapter_rows, inject, load_adapter, merge, save_adapter
from lorakit.errors import AdapterFileError, LoraConfigError
from lorakit.quant import (
    GROUP,
    Int4Linear,
    Int8Linear,
    int4_weight,
    int8_weight,
    quantize,
    quantize_int4,
    quantize_int8,
)
from tests.conftest import make_tiny, randomize_adapters

U = 2.0 ** -8  # bf16's unit roundoff: the int8 layer rounds its input and its output to bf16


def _weights():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.logspace(-4, 1, 48).unsqueeze(1)  # rows of very different size
    w[3] = 0.0  # an all-zero row
    w[5, 7] = 50.0  # an outlier: its row's step gets coarse, the others' do not
    return w


def test_int8_weights_are_within_half_a_step_of_each_row():
    w = _weights()
    q, s = int8_weight(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.shape == w.shape and s.shape == (48,)
    assert int(q.abs().max()) <= 127
    assert torch.all((w - q.float() * s[:, None]).abs() <= s[:, None] / 2 * (1 + 1e-6))  # |w - q·s| ≤ s/2
    nonzero = w.abs().amax(1) > 0
    assert torch.all(q.abs().amax(1)[nonzero] == 127)  # each row uses the full range
    assert torch.all(q[3] == 0) and s[3] > 0


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 200])
@pytest.mark.parametrize("in_features", [64, 40])  # 64: the int8 kernel; 40 (not a multiple of 16): dequantized bf16
def test_int8_layer_output_is_within_its_error_bound_of_the_dense_fp32_layer(rows, in_features):
    w = _weights()[:, :in_features]
    dense = torch.nn.Linear(in_features, 48)
    with torch.no_grad():
        dense.weight.copy_(w)
    layer = Int8Linear.from_linear(dense)
    x = torch.randn(rows, 3, in_features, generator=torch.Generator().manual_seed(rows))
    y, want = layer(x), dense(x)
    assert y.dtype == torch.float32 and y.shape == want.shape
    # |y - x·Wᵀ - b| ≤ Σ|x|·s/2 (weights) + u·Σ|x|·|q·s| (x rounded to bf16) + u·|y| (output in bf16) + fp32 sums
    s, wq = layer.scale, layer.dequantize()
    ax = x.abs()
    bound = ax @ (s[:, None] / 2).expand_as(wq).T + U * (ax @ wq.abs().T) + U * (y - dense.bias).abs()
    assert torch.all((y - want).abs() <= bound * 1.01 + 1e-6)
    rel = ((y - want).norm() / want.norm()).item()
    assert rel < 0.02  # what this bound means here: ~1% of the output's size


def test_quantize_swaps_every_linear_but_classification_heads_and_refuses_a_merged_model():
    model = make_tiny("llama")
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    assert quantize_int8(model) == n_linear
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear)
    from transformers import BertConfig, BertForSequenceClassification

    bert = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                    intermediate_size=64, vocab_size=50))
    ids = torch.randint(0, 50, (2, 5))
    with torch.no_grad():
        dense_probs = bert.eval()(input_ids=ids).logits.softmax(-1)
        quantize_int8(bert)
        assert type(bert.classifier) is torch.nn.Linear and isinstance(bert.bert.pooler.dense, Int8Linear)
        torch.testing.assert_close(bert(input_ids=ids).logits.softmax(-1), dense_probs, rtol=0, atol=0.02)
    merged = make_tiny("llama")
    inject(merged, LoraConfig(r=2, targets=["q_proj"]))
    merge(merged)
    before = {k: v.clone() for k, v in merged.state_dict().items()}
    with pytest.raises(LoraStateError, match="unmerge"):
        quantize_int8(merged)
    assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())


@pytest.mark.parametrize("weights,kind", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_lora_on_a_quantized_base_adds_its_fp32_delta_unmerged_also_per_row(weights, kind):
    model = make_tiny("llama")
    quantize(model, weights)
    inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), "a")  # wraps the quantized layers
    randomize_adapters(model, "a", std=0.3)
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    assert isinstance(layer.base_layer, kind) and layer.A("a").dtype == torch.float32
    assert (layer.out_features, layer.in_features) == (layer.base_layer.out_features, layer.base_layer.in_features)
    x = torch.randn(3, 2, 32)
    want = layer.base_layer(x) + 2.0 * (x @ layer.A("a").T) @ layer.B("a").T  # y = int8 base + s·B·A·x, s = 8/4
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)  # with a gradient: the delta added out of place
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)  # without: added in place
        with adapter_rows(["a"], [0, -1, 0]):
            rows = layer(x)
    torch.testing.assert_close(rows[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[1], layer.base_layer(x[1]), rtol=0, atol=0)
    with pytest.raises(LoraStateError, match="quantized"):
        merge(model)


def test_an_adapter_with_nan_is_refused_on_an_int8_base(tmp_path):
    src = make_tiny("llama")
    inject(src, LoraConfig(r=2, targets=["q_proj"]))
    randomize_adapters(src)
    with torch.no_grad():
        src.get_submodule("model.layers.0.self_attn.q_proj").B("default")[0, 0] = float("nan")
    save_adapter(src, tmp_path / "bad")
    model = make_tiny("llama")
    quantize_int8(model)
    with pytest.raises(AdapterFileError, match="Inf|NaN|finite|overflow"):
        load_adapter(model, tmp_path / "bad")


# -- int4 ------------------------------------------------------------------------------------------------------
def _grid_weights(out_f=24, in_f=96, center=0.2):
    """Weights already on a Q4_1 grid (as SmolLM2's GGUF stores its Linear layers): per group of 32, w = d·q + m with
    fp16 d and m, q ∈ [0, 15] using both ends. Returns (w, q, d)."""
    g = torch.Generator().manual_seed(1)
    groups = in_f // GROUP
    d = (torch.rand(out_f, groups, generator=g) * 0.02 + 0.002).half().float()
    m = (-7.5 * d + center * d * torch.randn(out_f, groups, generator=g)).half().float()  # centred groups
    q = torch.randint(0, 16, (out_f, groups, GROUP), generator=g)
    q[..., 0], q[..., 1] = 0, 15
    return (d[..., None] * q + m[..., None]).view(out_f, in_f), q, d


def _dequant(q, dz):
    out_f, in_f = q.shape
    d, z = (dz[..., i].float().T[..., None] for i in (0, 1))
    return ((q.view(out_f, in_f // GROUP, GROUP).float() - 8) * d + z).view(out_f, in_f)


def test_int4_weights_are_within_the_closed_form_bound_and_refind_a_q4_1_grid():
    w = _weights()[:, :64] + 0.3 * torch.randn(48, 64, generator=torch.Generator().manual_seed(2))  # off-centre groups
    q, dz = int4_weight(w)
    assert q.dtype == torch.int32 and q.shape == w.shape and dz.shape == (2, 48, 2) and dz.dtype == torch.bfloat16
    assert int(q.min()) >= 0 and int(q.max()) <= 15
    g = w.view(48, 2, GROUP)
    d = (g.amax(-1) - g.amin(-1)) / 15  # fp32, before rounding
    z = g.amin(-1) + 8 * dz[..., 0].float().T
    dd, dzz = (dz[..., 0].float().T - d).abs(), (dz[..., 1].float().T - z).abs()
    bound = d / 2 + dzz + 15 * dd  # |w - (q - 8)·d - z| ≤ d/2 + |Δz| + 15·|Δd| (lorakit.quant.int4_weight)
    err = (w - _dequant(q, dz)).view(48, 2, GROUP).abs()
    assert torch.all(err <= bound[..., None] * (1 + 1e-5) + 1e-7)
    # On weights already on a 4-bit grid of 32 (Q4_1), the same 4-bit values come back and only the bf16 rounding of
    # d and z remains: |error| ≤ 15·|Δd| + |Δz|, far below a step.
    w, q0, d = _grid_weights()
    q, dz = int4_weight(w)
    assert torch.equal(q.view_as(q0), q0.to(torch.int32))
    dd = (dz[..., 0].float().T - d).abs()
    dzz = (dz[..., 1].float().T - (w.view_as(q0).amin(-1) + 8 * dz[..., 0].float().T)).abs()
    err = (w - _dequant(q, dz)).view_as(q0).abs()
    assert torch.all(err <= (15 * dd + dzz)[..., None] * (1 + 1e-5) + 1e-8)
    assert float((err / d[..., None]).max()) <= 15 * U + 1e-3  # d rounds by ≤ u relative; z is tiny here


@pytest.mark.parametrize("rows", [1, 7, 200])
def test_int4_layer_output_is_within_bf16_rounding_of_its_dequantized_weights(rows):
    w, _, _ = _grid_weights(out_f=32, in_f=96)
    dense = torch.nn.Linear(96, 32)
    with torch.no_grad():
        dense.weight.copy_(w)
    layer = Int4Linear.from_linear(dense)
    assert layer.weight.dtype == torch.uint8 and (layer.out_features, layer.in_features) == (32, 96)
    x = torch.randn(rows, 2, 96, generator=torch.Generator().manual_seed(rows))
    y = layer(x)
    assert y.dtype == torch.float32 and y.shape == (rows, 2, 32)
    wq = _dequant(*int4_weight(w))
    want = x.double() @ wq.double().T + dense.bias.double()
    # x rounded to bf16, the dequantized weight rounded to bf16 in the kernel, the output rounded to bf16:
    bound = 2 * U * (x.abs().double() @ wq.abs().double().T) + U * (y - dense.bias).abs().double()
    assert torch.all((y.double() - want).abs() <= bound * 1.01 + 1e-6)


def test_quantize_int4_keeps_the_lm_head_and_ungrouped_layers_int8():
    model = make_tiny("llama")
    n_linear = sum(type(m) is torch.nn.Linear for m in model.modules())
    x = torch.randint(0, 100, (2, 6))
    with torch.no_grad():
        want = model(input_ids=x).logits
    assert quantize_int4(model) == n_linear - 1  # every block Linear (in_features 32 or 64); not the LM head
    assert isinstance(model.lm_head, Int8Linear) and isinstance(model.model.embed_tokens, torch.nn.Embedding)
    assert not any(type(m) is torch.nn.Linear for m in model.modules())
    with torch.no_grad():
        got = model(input_ids=x).logits
    # Random Gaussian weights are the worst case for 4 bits (a step is ~1/3 of their std): the logits still follow.
    assert torch.corrcoef(torch.stack([got.flatten(), want.flatten()]))[0, 1] > 0.95
    odd = torch.nn.ModuleList([torch.nn.Linear(40, 64), torch.nn.Linear(64, 8), torch.nn.Linear(64, 16)])
    assert quantize_int4(odd) == 1  # in_features 40 and out_features 8 do not fit the int4 kernel
    assert [type(m) for m in odd] == [Int8Linear, Int8Linear, Int4Linear]
    with pytest.raises(LoraConfigError, match="int2"):
        quantize(odd, "int2")
    meta = torch.nn.Linear(64, 16, device="meta")  # any non-CPU device: refused before anything changes
    holder = torch.nn.ModuleList([meta])
    with pytest.raises(LoraConfigError, match="CPU"):
        quantize_int4(holder)
    assert holder[0] is meta


def test_int4_refinds_smollm2s_own_4_bit_weights_and_the_quantized_model_still_answers(smollm2):
    """SmolLM2's GGUF stores every block Linear as Q4_1 (groups of 32 inputs, w = d·q + m): int4 must give those
    weights back up to the bf16 rounding of d and z, so `--weights int4` runs the file's own numbers."""
    import copy

    from lorakit.generate import generate

    model, tokenizer = smollm2
    for name, layer in model.named_modules():
        if type(layer) is torch.nn.Linear and name != "lm_head":
            w = layer.weight.detach()
            q, dz = int4_weight(w)
            g = w.view(w.shape[0], -1, GROUP)
            d = (g.amax(-1) - g.amin(-1)) / 15
            dd = (dz[..., 0].float().T - d).abs()
            dzz = (dz[..., 1].float().T - (g.amin(-1) + 8 * dz[..., 0].float().T)).abs()
            err = (w - _dequant(q, dz)).view_as(g).abs()
            assert torch.all(err <= (15 * dd + dzz)[..., None] * (1 + 1e-4) + 1e-7), name  # no 4-bit rounding left
    small = copy.deepcopy(model)
    quantize_int4(small)
    # Teacher-forced on a chat prompt and fp32's own answer: measured max |Δlogit| / max |logit| 0.043 and the top
    # token equal at 37 of 37 positions (int8 per channel: 0.065, 36 of 37); the bounds leave ~2x.
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        ids = model.generate(ids, max_new_tokens=12, do_sample=False)
        want, got = model(ids).logits[0], small(ids).logits[0]
    assert float((got - want).abs().max() / want.abs().max()) < 0.09
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) >= 0.95
    # One prompt at a time: left-padded in a batch, fp32 itself nearly ties 'The' (25.33) and 'L' (25.24) here.
    out = [generate(small, tokenizer, [p], max_new_tokens=8)[0]
           for p in ("What is the capital of France?", "What is 2 + 2? Answer with a number.")]
    assert "Paris" in out[0] and "4" in out[1]
