"""Every LoRA layer against the dense formula W0 + s·B·A with nonzero B, fp32 and bf16; merge round trips."""


import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit import LoraConfig, LoraStateError, inject, merge, set_adapter, unmerge
from lorakit.layers import LoraLinear
from lorakit.sliced import LoraSlicedLinear
from tests.conftest import make_tiny, randomize_adapters


def _random_factors(layer, name="default", seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_params(name):
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.2)


def _linear_layer(fan_in_fan_out=False, slices=None, dtype=torch.float32, out=12):
    torch.manual_seed(0)
    base = Conv1D(out, 8) if fan_in_fan_out else nn.Linear(8, out)
    with torch.no_grad():
        for p in base.parameters():
            p.normal_()
    base = base.to(dtype).requires_grad_(False)
    layer = (LoraLinear(base, fan_in_fan_out=fan_in_fan_out) if slices is None
             else LoraSlicedLinear(base, slices, fan_in_fan_out=fan_in_fan_out))
    layer.add_adapter("default", r=3, alpha=6, dropout=0.0, init="kaiming")
    layer.active = ["default"]
    _random_factors(layer)
    return layer.eval()


def _dense_linear(layer, x):
    W = layer.base_layer.weight.float()
    W = W.t() if layer.fan_in_fan_out else W  # (out, in)
    A, B = layer.A("default").float(), layer.B("default").float()
    if getattr(layer, "slices", None) is not None:  # build ΔW slice by slice, as loralib's MergedLinear defines it
        r, size = layer.r["default"], layer.out_features // len(layer.slices)
        delta = torch.zeros_like(W)
        enabled = [j for j, on in enumerate(layer.slices) if on]
        for i, j in enumerate(enabled):
            delta[j * size:(j + 1) * size] = B[i * size:(i + 1) * size] @ A[i * r:(i + 1) * r]
    else:
        delta = B @ A
    return F.linear(x.float(), W + layer.scale["default"] * delta, layer.base_layer.bias.float())


CASES = [dict(), dict(fan_in_fan_out=True), dict(slices=[True, False, True]),
         dict(fan_in_fan_out=True, slices=[True, False, True]), dict(slices=[False, True, False, True])]


@pytest.mark.parametrize("kw", CASES)
def test_linear_like_layers_equal_dense_formula_fp32(kw):
    layer = _linear_layer(**kw)
    x = torch.randn(4, 5, 8)
    torch.testing.assert_close(layer(x), _dense_linear(layer, x), rtol=1e-5, atol=1e-5)
    layer.train()
    xg = x.clone().requires_grad_(True)
    layer(xg).pow(2).sum().backward()
    grads = [xg.grad] + [p.grad for p in layer.adapter_params("default")]
    # gradients against autograd through the dense formula
    xr = x.clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in layer.adapter_params("default")]
    _dense_linear_with(layer, xr, params).pow(2).sum().backward()
    for a, b in zip(grads, [xr.grad] + [q.grad for q in params], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert layer.base_layer.weight.grad is None


@pytest.mark.parametrize("kw", CASES[:3])
def test_merged_and_disabled_layers_equal_the_dense_formulas(kw):
    # merged in eval and disabled take the base layer's product alone (a plain nn.Linear as F.linear itself)
    layer = _linear_layer(**kw)
    base = layer.base_layer
    w0 = (base.weight.t() if layer.fan_in_fan_out else base.weight).detach().clone()
    x = torch.randn(4, 5, 8)
    ref = _dense_linear(layer, x)
    layer.merge()
    torch.testing.assert_close(layer(x), ref, rtol=1e-5, atol=1e-5)
    layer.unmerge()
    layer.disabled = True
    torch.testing.assert_close(layer(x), F.linear(x, w0, base.bias), rtol=1e-6, atol=1e-6)


def _dense_linear_with(layer, x, params):
    A, B = params
    W = layer.base_layer.weight.t() if layer.fan_in_fan_out else layer.base_layer.weight
    if getattr(layer, "slices", None) is None:
        delta = B @ A
    else:
        r, size = layer.r["default"], layer.out_features // len(layer.slices)
        rows = []
        enabled = [j for j, on in enumerate(layer.slices) if on]
        for j in range(len(layer.slices)):
            if j in enabled:
                i = enabled.index(j)
                rows.append(B[i * size:(i + 1) * size] @ A[i * r:(i + 1) * r])
            else:
                rows.append(torch.zeros(size, W.shape[1]))
        delta = torch.cat(rows, 0)
    return F.linear(x, W + layer.scale["default"] * delta, layer.base_layer.bias)


@pytest.mark.parametrize("kw", CASES[:3])
def test_linear_layers_bf16_within_stated_tolerance(kw):
    layer = _linear_layer(dtype=torch.bfloat16, **kw)
    x = torch.randn(4, 5, 8)
    ref = _dense_linear(layer, x.bfloat16())
    out = layer(x.bfloat16()).float()
    # bf16 keeps an 8-bit mantissa (relative step 2^-8 = 0.4%): a few roundings stay well under 1% in norm,
    # while a 2% scale error would not.
    assert (out - ref).norm() / ref.norm() < 1e-2


def test_adapters_are_fp32_on_a_bf16_base_so_adamw_updates_are_not_rounded_away():
    torch.manual_seed(0)
    model = torch.nn.Sequential(nn.Linear(64, 64)).to(torch.bfloat16)
    inject(model, LoraConfig(r=4, targets=["0"]))
    layer = model[0]
    assert layer.A("default").dtype == layer.B("default").dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.bfloat16
    _random_factors(layer)
    x = torch.randn(16, 64, dtype=torch.bfloat16)
    ref = _dense_linear(layer, x)
    out = layer(x)
    assert out.dtype == torch.bfloat16 and ((out.float() - ref).norm() / ref.norm()) < 1e-2
    A0 = layer.A("default").detach().clone()
    opt = torch.optim.AdamW(layer.adapter_params("default"), lr=1e-5, weight_decay=0.0)
    layer(x).float().pow(2).sum().backward()
    opt.step()
    step = (layer.A("default").detach() - A0).abs()
    # Adam's first step moves every entry with a gradient by lr; in bf16 (ulp 2^-8·|A| ≈ 1e-3) it would vanish
    moved = layer.A("default").grad != 0
    assert moved.float().mean() > 0.9
    torch.testing.assert_close(step[moved], torch.full_like(step[moved], 1e-5), rtol=1e-2, atol=0)
    bf16 = layer.A("default").detach().bfloat16() - A0.bfloat16()
    assert (bf16 != 0).float().mean() < 0.05  # what a bf16 A would have kept of the update


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5),
       # bf16 keeps an 8-bit mantissa: allow 2% relative, 0.1 absolute on O(1) values
       torch.bfloat16: dict(rtol=2e-2, atol=1e-1)}


def test_init_gives_base_output_exactly():
    torch.manual_seed(0)
    base = nn.Linear(8, 12)
    layer = LoraLinear(base)
    for init in ("kaiming", "gaussian"):
        layer.add_adapter(init, r=4, alpha=8, dropout=0.1, init=init)
        assert torch.all(layer.B(init) == 0) and layer.A(init).abs().sum() > 0
    layer.active = ["kaiming", "gaussian"]
    x = torch.randn(3, 8)
    assert torch.equal(layer(x), base(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_thousand_merge_unmerge_cycles_are_bit_identical(dtype):
    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(64, 64).to(dtype).requires_grad_(False)).eval()
    layer.add_adapter("default", r=4, alpha=8, dropout=0.0, init="kaiming")
    layer.active = ["default"]
    _random_factors(layer)
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(3, 64, dtype=dtype)
    merged_once = None
    for _ in range(1000):
        layer.merge()
        merged_once = layer.base_layer.weight.detach().clone() if merged_once is None else merged_once
        layer.unmerge()
    assert torch.equal(layer.base_layer.weight, original)
    layer.merge()
    assert torch.equal(layer.base_layer.weight, merged_once)  # merging is deterministic, too
    # merged W = W0 + s·B·A rounded once to the weight dtype
    expect = (original.float() + layer.delta_weight("default").float()).to(dtype)
    assert torch.equal(layer.base_layer.weight, expect) and layer(x).dtype == dtype


def test_merge_equals_unmerged_and_training_merged_raises():
    layer = _linear_layer(slices=[True, False, True])
    x = torch.randn(4, 8)
    before = layer(x)
    layer.merge()
    layer.merge()  # idempotent
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)
    layer.train()
    with pytest.raises(LoraStateError, match="unmerge"):
        layer(x)
    layer.unmerge()
    torch.testing.assert_close(layer(x), before, rtol=1e-5, atol=1e-5)


def test_several_active_adapters_sum_and_merge_their_sum():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).eval()
    inject(model, LoraConfig(r=2, targets=["0", "2"]), "a")
    inject(model, LoraConfig(r=3, alpha=3, targets=["0"]), "b")
    randomize_adapters(model, "a", seed=1)
    randomize_adapters(model, "b", seed=2)
    set_adapter(model, ["a", "b"])
    l0, l2 = model[0], model[2]
    W0 = l0.base_layer.weight + l0.delta_weight("a") + l0.delta_weight("b")
    x = torch.randn(5, 8)
    ref = F.linear(torch.relu(F.linear(x, W0, l0.base_layer.bias)),
                   l2.base_layer.weight + l2.delta_weight("a"), l2.base_layer.bias)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    merge(model)
    torch.testing.assert_close(l0.base_layer.weight, W0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    unmerge(model)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inference_reads_the_current_b_after_every_kind_of_change(dtype):
    # The no-grad path keeps Bᵀ contiguous (in the base's dtype) between calls; every change of B must show in the
    # next output, checked against the dense formula x·(W + s·B·A)ᵀ + b in fp32: in-place edits (an optimizer step),
    # a new Parameter under the same name (a reload), delete + add again, a deep copy, and pickling the module. The
    # bf16 base keeps fp32 adapters (a stale Bᵀ is off by O(1), far beyond bf16's rounding).
    import copy
    import io

    torch.manual_seed(0)
    layer = LoraLinear(nn.Linear(16, 24).to(dtype))
    layer.add_adapter("a", 4, 8.0, 0.0, "kaiming", dtype=torch.float32)
    layer.active = ["a"]
    x = torch.randn(3, 16).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2

    def check(m):
        A, B, base = m.A("a"), m.B("a"), m.base_layer
        with torch.no_grad():
            want = F.linear(x.float(), base.weight.float() + 2.0 * B @ A, base.bias.float())
            torch.testing.assert_close(m(x).float(), want, rtol=tol, atol=tol)

    with torch.no_grad():
        layer.B("a").normal_()
    check(layer)
    with torch.no_grad():
        layer.B("a").mul_(3.0)  # in place, same tensor
    check(layer)
    layer.lora_B["a"] = nn.Parameter(torch.randn(24, 4))  # a new tensor under the same name
    check(layer)
    layer.delete_adapter("a")
    layer.add_adapter("a", 4, 8.0, 0.0, "kaiming")
    layer.active = ["a"]
    with torch.no_grad():
        layer.B("a").normal_()
    check(layer)
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        twin.B("a").normal_()
    check(twin)
    check(layer)
    buf = io.BytesIO()
    torch.save(layer, buf)
    buf.seek(0)
    check(torch.load(buf, weights_only=False))


def test_a_compiled_forward_after_an_eager_one_traces_the_lora_layers_whole():
    # The inference path caches Bᵀ keyed on B's data pointer; a traced graph cannot guard on that and broke at every
    # adapted layer once an eager call had filled the cache (every recompile of a decode step did).
    model = make_tiny("llama")
    inject(model, LoraConfig(r=4, targets="all-linear"), "a")
    randomize_adapters(model, "a")
    ids = torch.tensor([[1, 2, 3]])
    torch._dynamo.reset()
    with torch.no_grad():
        eager = model(input_ids=ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")(input_ids=ids).logits  # raises on a break
    torch.testing.assert_close(compiled, eager)
