"""Target selection, injection, freezing, bias modes and parameter counts, against closed forms."""

import pytest
import torch
from torch import nn

from lorakit import LoraConfig, LoraConfigError, count_parameters, inject, parameter_table, select
from lorakit.layers import LoraLinear
from lorakit.saved import SavedModule
from tests.conftest import make_minilm, make_tiny


def test_seed_arithmetic_100x100_r5_and_10000x10000_r100():
    small = nn.Sequential(nn.Linear(100, 100, bias=False))
    inject(small, LoraConfig(r=5, targets=["0"]))
    c = count_parameters(small)
    assert c["trainable"] == 1_000 == 2 * 100 * 5
    assert 1 - c["trainable"] / 100**2 == pytest.approx(0.90)
    big = nn.Sequential(nn.Linear(10_000, 10_000, bias=False, device="meta"))
    inject(big, LoraConfig(r=100, targets=["0"]))
    assert count_parameters(big)["trainable"] == 2_000_000 == 10_000**2 // 50


@pytest.mark.parametrize("kind, expected", [
    ("gpt2", ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]),
    ("llama", [f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in "qv"]),
    ("t5", None),
])
def test_architecture_defaults_are_wq_wv(kind, expected):
    model = make_tiny(kind)
    names = select(model, LoraConfig())
    if expected is not None:
        assert names == expected
    else:
        assert names and all(n.endswith((".q", ".v")) for n in names)
        assert len(names) == 2 * (2 + 2 * 2)  # encoder self-attn, decoder self- and cross-attn, 2 layers


def test_gpt2_default_adapts_only_q_and_v_slices():
    model = make_tiny("gpt2")
    inject(model, LoraConfig(r=4))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoraLinear) and layer.slices == [True, False, True] and layer.fan_in_fan_out
    assert layer.A("default").shape == (8, 32) and layer.B("default").shape == (64, 4)
    with torch.no_grad():
        layer.B("default").normal_()
    delta = layer.delta_weight("default").t()  # (out=96, in=32)
    assert torch.all(delta[32:64] == 0) and delta[:32].abs().sum() > 0 and delta[64:].abs().sum() > 0


def test_minilm_targets_suffix_regex_all_linear():
    model = make_minilm()
    qv = select(model, LoraConfig())
    assert len(qv) == 12 and all(n.endswith(("query", "value")) for n in qv)
    rx = select(model, LoraConfig(targets=r".*layer\.[0-2]\.attention\.self\.(query|key)"))
    assert len(rx) == 6
    al = select(model, LoraConfig(targets="all-linear"))
    assert len(al) == 6 * 6 + 1 and "classifier" not in al and "bert.pooler.dense" in al
    ex = select(model, LoraConfig(targets="all-linear", exclude=["pooler.dense", "key"]))
    assert len(ex) == 6 * 5


def test_no_match_lists_candidates():
    with pytest.raises(LoraConfigError) as e:
        select(make_minilm(), LoraConfig(targets=["q_proj"]))
    msg = str(e.value)
    assert "q_proj" in msg and "bert.encoder.layer.0.attention.self.query" in msg and "..." in msg


def test_unknown_architecture_without_targets_explains():
    with pytest.raises(LoraConfigError, match="no default"):
        select(nn.Sequential(nn.Linear(2, 2)), LoraConfig())


def test_inject_freezes_base_and_trains_only_adapter_and_head():
    model = make_minilm()
    inject(model, LoraConfig(r=4, modules_to_save=["classifier"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n or "modules_to_save" in n for n in trainable)
    assert isinstance(model.classifier, SavedModule)
    assert count_parameters(model)["trainable"] == 12 * (4 * 384 + 384 * 4) + 384 * 2 + 2
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    out = model(input_ids=torch.tensor([[101, 2023, 2003, 102]]), labels=torch.tensor([1]))
    out.loss.backward()
    assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
    opt.step()
    for n, p in model.named_parameters():
        if n not in trainable:
            assert torch.equal(p, before[n]), n  # frozen W0 (and the original head) unchanged


def test_parameter_table_numbers():
    bare = make_minilm()
    biases = [p.numel() for n, p in bare.named_parameters() if n.endswith("bias")]
    total = sum(p.numel() for p in bare.parameters())
    model = inject(make_minilm(), LoraConfig(r=4, modules_to_save=["classifier"]))
    rows = {}
    for line in parameter_table(model).splitlines()[1:-1]:
        *kind, tensors, values, trainable = line.split()
        rows[" ".join(kind)] = (int(tensors.replace(",", "")), int(values.replace(",", "")),
                                int(trainable.replace(",", "")))
    lora = 12 * 4 * 384  # 12 query/value layers, A (4, 384) and B (384, 4)
    head = 2 * 384 + 2  # the classifier copy
    assert rows == {
        "LoRA A": (12, lora, lora), "LoRA B": (12, lora, lora), "modules_to_save": (2, head, head),
        "bias": (len(biases), sum(biases), 0), "base weights": (len(list(bare.parameters())) - len(biases),
                                                                total - sum(biases), 0)}
    last = parameter_table(model).splitlines()[-1]
    assert last == (f"LoRA layers: 12; trainable {2 * lora + head:,} of {total + 2 * lora + head:,} "
                    f"({100 * (2 * lora + head) / (total + 2 * lora + head):.4f}%)")


@pytest.mark.parametrize("bias, n_bias", [("none", 0), ("lora_only", 12), ("all", None)])
def test_bias_modes(bias, n_bias):
    model = make_minilm()
    inject(model, LoraConfig(r=2, bias=bias))
    biases = [n for n, p in model.named_parameters() if p.requires_grad and n.endswith("bias")]
    if n_bias is None:
        assert len(biases) == sum(n.endswith("bias") for n, _ in model.named_parameters())
    else:
        assert len(biases) == n_bias
        assert all("base_layer" in n for n in biases)


def test_modules_to_save_that_matches_nothing_raises():
    with pytest.raises(LoraConfigError, match="modules_to_save"):
        inject(make_minilm(), LoraConfig(modules_to_save=["head"]))


def test_duplicate_adapter_name_raises():
    model = make_minilm()
    inject(model, LoraConfig())
    with pytest.raises(LoraConfigError, match="already exists"):
        inject(model, LoraConfig())


def test_targets_inside_modules_to_save_are_skipped_as_in_peft():
    import transformers as tf

    torch.manual_seed(0)
    model = tf.RobertaForSequenceClassification(tf.RobertaConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=100))
    names = select(model, LoraConfig(targets="all-linear", modules_to_save=["classifier"]))
    assert names and not any(n.startswith("classifier") for n in names)
    from peft import LoraConfig as PeftConfig
    from peft import get_peft_model

    peft_model = get_peft_model(model, PeftConfig(target_modules="all-linear", modules_to_save=["classifier"]))
    peft_targets = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert set(names) == peft_targets
