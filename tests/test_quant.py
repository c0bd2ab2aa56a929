"""Weight-only int8 (lorakit.quant): the closed-form error of the weights, a quantized layer against the dense
fp32 layer within a bound derived from it, LoRA on an int8 base, and what is refused."""

import pytest
import torch

from lorakit import LoraConfig, LoraStateError, adapter_rows, inject, load_adapter, merge, save_adapter
from lorakit.errors import AdapterFileError
from lorakit.quant import GEMV_ROWS, Int8Linear, int8_weight, quantize_int8
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


@pytest.mark.parametrize("rows", [1, 5, GEMV_ROWS, GEMV_ROWS + 1, 200])  # the int8 kernel, and dequantized bf16
@pytest.mark.parametrize("in_features", [64, 40])  # 40: not a multiple of 16, the dequantized path throughout
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


def test_lora_on_an_int8_base_adds_its_fp32_delta_unmerged_also_per_row():
    model = make_tiny("llama")
    quantize_int8(model)
    inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]), "a")  # wraps the Int8Linear layers
    randomize_adapters(model, "a", std=0.3)
    layer = model.get_submodule("model.layers.1.self_attn.v_proj")
    assert isinstance(layer.base_layer, Int8Linear) and layer.A("a").dtype == torch.float32
    x = torch.randn(3, 2, 32)
    want = layer.base_layer(x) + 2.0 * (x @ layer.A("a").T) @ layer.B("a").T  # y = int8 base + s·B·A·x, s = 8/4
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)  # with a gradient: the delta added out of place
    with torch.no_grad():
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-6)  # without: added in place
        with adapter_rows(["a"], [0, -1, 0]):
            rows = layer(x)
    torch.testing.assert_close(rows[[0, 2]], want[[0, 2]], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows[1], layer.base_layer(x[1]), rtol=0, atol=0)
    with pytest.raises(LoraStateError, match="int8"):
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
