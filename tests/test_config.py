from dataclasses import replace

import pytest
import torch

from lorakit import LoraConfig, LoraConfigError


@pytest.mark.parametrize(
    "kwargs, field, allowed",
    [
        ({"r": 0}, "r=0", ">= 1"),
        ({"r": 2.5}, "r=2.5", ">= 1"),
        ({"alpha": 0}, "alpha=0", "> 0"),
        ({"alpha": -1.0}, "alpha=-1.0", "> 0"),
        ({"dropout": 1.0}, "dropout=1.0", "[0, 1)"),
        ({"dropout": -0.1}, "dropout=-0.1", "[0, 1)"),
        ({"bias": "some"}, "bias='some'", "none, all, lora_only"),
        ({"init": "xavier"}, "init='xavier'", "kaiming, gaussian"),
        ({"targets": "(unclosed"}, "targets='(unclosed'", "regex"),
        ({"rank_pattern": {"query": 0}}, "rank_pattern['query']=0", ">= 1"),
        ({"slices": {"c_attn": [False, False]}}, "slices['c_attn']", "one True"),
    ],
)
def test_invalid_fields_raise_naming_field_and_allowed(kwargs, field, allowed):
    with pytest.raises(LoraConfigError) as e:
        LoraConfig(**kwargs)
    assert field in str(e.value) and allowed in str(e.value)


def test_all_problems_reported_at_once():
    with pytest.raises(LoraConfigError) as e:
        LoraConfig(r=0, alpha=0, bias="x")
    msg = str(e.value)
    assert "r=0" in msg and "alpha=0" in msg and "bias='x'" in msg


def test_scale_rank_and_alpha_patterns():
    c = LoraConfig(r=8, alpha=16, rank_pattern={"value": 4}, alpha_pattern={"layer.0.attention.self.value": 2})
    assert c.scale_for("bert.encoder.layer.1.attention.self.query") == 2.0
    assert c.rank_for("bert.encoder.layer.1.attention.self.value") == 4
    assert c.scale_for("bert.encoder.layer.1.attention.self.value") == 16 / 4
    assert c.scale_for("bert.encoder.layer.0.attention.self.value") == 2 / 4
    assert LoraConfig(r=16, alpha=8, use_rslora=True).scale_for("x") == pytest.approx(8 / 4)


def test_dict_round_trip_and_unknown_field():
    c = LoraConfig(r=4, targets=["q", "v"], modules_to_save=["classifier"], rank_pattern={"q": 2})
    assert LoraConfig.from_dict(c.to_dict()) == c
    with pytest.raises(LoraConfigError, match="lora_rank"):
        LoraConfig.from_dict({"lora_rank": 3})


def _tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32, num_labels=2))


def test_peft_spellings_are_aliases_of_lorakit_fields():
    ours = LoraConfig(r=8, alpha=16, targets=["query", "value"], dropout=0.1, exclude=["layer.0.attention.self.query"],
                      init="gaussian")
    assert LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], lora_dropout=0.1,
                      exclude_modules=["layer.0.attention.self.query"], init_lora_weights="gaussian") == ours
    assert LoraConfig(target_modules={"value", "query"}).targets == ["query", "value"]  # PEFT keeps a set
    assert LoraConfig(alpha=16, lora_alpha=16).alpha == 16  # the same value twice is fine
    assert replace(LoraConfig(lora_alpha=32), r=4) == LoraConfig(r=4, alpha=32)
    with pytest.raises(LoraConfigError) as e:
        LoraConfig(alpha=8, lora_alpha=32, init_lora_weights=False)
    assert "alpha=8 and lora_alpha=32" in str(e.value) and "init_lora_weights=False" in str(e.value)


def test_from_peft_builds_what_peft_builds():
    """A real peft.LoraConfig through from_peft: the same modules adapted with the same rank, scale and dropout,
    the same trainable parameters, as PEFT's own get_peft_model on the same model."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    from lorakit import count_parameters, inject, select
    from lorakit.layers import LoraModule

    pcfg = PeftLoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["query", "value", "dense"],
                          exclude_modules=["layer.1.output.dense"], rank_pattern={"value": 4},
                          alpha_pattern={"layer.0.attention.self.query": 4}, use_rslora=True, bias="lora_only",
                          modules_to_save=["classifier"])
    ours = LoraConfig.from_peft(pcfg)
    assert ours == LoraConfig(r=8, alpha=16, dropout=0.1, targets=["dense", "query", "value"],
                              exclude=["layer.1.output.dense"], rank_pattern={"value": 4},
                              alpha_pattern={"layer.0.attention.self.query": 4}, use_rslora=True, bias="lora_only",
                              modules_to_save=["classifier"])
    peft_model = get_peft_model(_tiny_bert(), pcfg)
    theirs = {n.removeprefix("base_model.model."): (m.r["default"], m.scaling["default"], m.lora_dropout["default"].p)
              for n, m in peft_model.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A}
    model = inject(_tiny_bert(), ours)
    mine = {n: (m.r["default"], m.scale["default"], m.dropout["default"])
            for n, m in model.named_modules() if isinstance(m, LoraModule)}
    assert sorted(select(_tiny_bert(), ours)) == sorted(theirs) == sorted(mine) and len(mine) == 10  # + pooler.dense
    for name, (r, scale, p) in theirs.items():
        assert mine[name][0] == r and mine[name][1:] == pytest.approx((scale, p), rel=1e-12), name
    assert {r for r, _, _ in mine.values()} == {4, 8} and len({s for _, s, _ in mine.values()}) == 3
    assert count_parameters(model)["trainable"] == peft_model.get_nb_trainable_parameters()[0]


def test_from_peft_refuses_what_lorakit_cannot_honour():
    from peft import LoraConfig as PeftLoraConfig

    with pytest.raises(LoraConfigError) as e:
        LoraConfig.from_peft(PeftLoraConfig(use_dora=True, layers_to_transform=[0], target_modules=["query"]))
    assert "use_dora=True" in str(e.value) and "layers_to_transform=[0]" in str(e.value)
    with pytest.raises(LoraConfigError, match="init_lora_weights='pissa'"):
        LoraConfig.from_peft(PeftLoraConfig(init_lora_weights="pissa"))
    assert LoraConfig.from_peft({"r": 4, "lora_alpha": 8, "target_modules": ["q"]}) == LoraConfig(r=4, alpha=8,
                                                                                                  targets=["q"])
    with pytest.raises(LoraConfigError, match="use_dora=True"):
        LoraConfig.from_peft({"r": 4, "use_dora": True})
