import pytest

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
