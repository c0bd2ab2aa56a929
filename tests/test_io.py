"""Adapter files against HF PEFT both ways (same outputs ≤1e-5), several adapters, atomic writes, names."""

import copy
import json
import os

import pytest
import safetensors.torch
import torch
from peft import LoraConfig as PeftConfig
from peft import PeftModel, get_peft_model
from torch import nn

from lorakit import (
    AdapterFileError,
    AdapterNotFound,
    LoraConfig,
    LoraConfigError,
    active_adapters,
    combine,
    delete_adapter,
    inject,
    load_adapter,
    merge,
    save_adapter,
)
from lorakit.adapters import set_adapter
from lorakit.injection import lora_configs
from lorakit.io import adapter_dir, check_adapter_name
from tests.conftest import assert_unchanged, make_minilm, make_tiny, model_state, randomize_adapters, tiny_inputs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:peft.*", "ignore::FutureWarning")


class Toy(nn.Module):
    """Embedding -> Conv1d -> Linear -> head: every LoRA layer type in a model that builds in microseconds."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(20, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.lin = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, ids):
        h = self.conv(self.emb(ids).transpose(1, 2)).transpose(1, 2)  # (b, s, 8)
        return self.head(torch.tanh(self.lin(h)))


TOY_IDS = torch.tensor([[1, 5, 7, 19], [0, 2, 3, 4]])
TOY_CONFIG = LoraConfig(r=2, alpha=3, targets=["emb", "conv", "lin"], modules_to_save=["head"],
                        rank_pattern={"lin": 4})


def toy_with_adapter(config=TOY_CONFIG, name="default", seed=0):
    model = Toy().eval()
    inject(model, config, name)
    randomize_adapters(model, name, std=0.3, seed=seed)
    with torch.no_grad():
        for p in model.head.copy(name).parameters():
            p.add_(0.1 * (seed + 1))
    return model


def _out(model, inputs):
    with torch.no_grad():
        out = model(**inputs) if isinstance(inputs, dict) else model(inputs)
    return out if isinstance(out, torch.Tensor) else out.logits


# -- lorakit -> PEFT ------------------------------------------------------------------------------------------
def _to_peft(make, ours, path, inputs, name="default"):
    """Save ours; PEFT loads it into a fresh base (`make()`, seeded) with equal outputs, and so does lorakit."""
    save_adapter(ours, path, name)
    theirs = PeftModel.from_pretrained(make(), str(path)).eval()
    expected = _out(ours, inputs)
    torch.testing.assert_close(_out(theirs, inputs), expected, rtol=1e-5, atol=1e-5)
    with theirs.disable_adapter():
        assert not torch.allclose(expected, _out(theirs, inputs), atol=1e-4)  # the adapter really acts
    back = make()
    assert load_adapter(back, path) == "default"
    torch.testing.assert_close(_out(back, inputs), expected, rtol=1e-6, atol=1e-6)
    return json.loads((path / "adapter_config.json").read_text())


def test_lorakit_minilm_loads_in_peft(tmp_path, minilm_tokenizer):
    ours = make_minilm()
    inject(ours, LoraConfig(r=4, alpha=8, targets=["query", "value", "word_embeddings"], use_rslora=True,
                            modules_to_save=["classifier"], rank_pattern={"value": 2}, alpha_pattern={"query": 5},
                            task_type="SEQ_CLS"))
    randomize_adapters(ours, std=0.05)
    with torch.no_grad():
        ours.classifier.copy("default").weight.add_(0.1)
    inputs = dict(minilm_tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt"))
    cfg = _to_peft(make_minilm, ours, tmp_path / "a", inputs)
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["use_rslora"] is True
    assert cfg["rank_pattern"] == {"value": 2} and cfg["alpha_pattern"] == {"query": 5}
    assert cfg["target_modules"] == ["query", "value", "word_embeddings"] and cfg["modules_to_save"] == ["classifier"]
    keys = safetensors.torch.load_file(tmp_path / "a" / "adapter_model.safetensors").keys()
    assert "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight" in keys
    assert "base_model.model.bert.embeddings.word_embeddings.lora_embedding_B" in keys
    assert "base_model.model.classifier.weight" in keys and not any("default" in k for k in keys)


@pytest.mark.parametrize("kind, config", [
    ("gpt2", LoraConfig(r=4, alpha=8)),  # the per-slice fused c_attn (q, v of qkv) becomes a dense rank-8 adapter
    ("gpt2", LoraConfig(r=2, alpha=4, targets=["c_attn", "c_fc"], bias="lora_only", use_rslora=True,
                        slices={"c_attn": [True, True, False]})),
    ("llama", LoraConfig(r=2, alpha=5, targets="all-linear", use_rslora=True, bias="all")),
])
def test_lorakit_tiny_models_load_in_peft(tmp_path, kind, config):
    ours = make_tiny(kind)
    inject(ours, config)
    randomize_adapters(ours)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if p.requires_grad and n.endswith("bias"):
                p.add_(0.05)
    cfg = _to_peft(lambda: make_tiny(kind), ours, tmp_path / "a", tiny_inputs(kind))
    if kind == "gpt2":
        k = sum(config.slices.get("c_attn", [True, False, True]))
        assert cfg["fan_in_fan_out"] is True and cfg["rank_pattern"]["transformer.h.0.attn.c_attn"] == config.r * k


def test_fused_slices_fold_back_into_a_sliced_layer(tmp_path):
    base = make_tiny("gpt2")
    ours = copy.deepcopy(base)
    inject(ours, LoraConfig(r=4, alpha=8))
    randomize_adapters(ours)
    save_adapter(ours, tmp_path / "a")
    other = copy.deepcopy(base)
    inject(other, LoraConfig(r=2, alpha=3), "first")  # a sliced c_attn is already there
    assert load_adapter(other, tmp_path / "a") == "default"
    set_adapter(other, "default")
    assert other.transformer.h[0].attn.c_attn.A("default").shape == (8, 32)  # r·k rows, as the saved layer
    assert other.transformer.h[0].attn.c_attn.B("default").shape == (64, 4)  # two 32-row slices at rank 4
    torch.testing.assert_close(_out(other, tiny_inputs("gpt2")), _out(ours, tiny_inputs("gpt2")))


def test_save_dtype_and_bad_dtype(tmp_path):
    ours = toy_with_adapter()
    save_adapter(ours, tmp_path / "bf16", dtype="bf16")
    tensors = safetensors.torch.load_file(tmp_path / "bf16" / "adapter_model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    back = Toy().eval()
    load_adapter(back, tmp_path / "bf16")
    torch.testing.assert_close(_out(back, TOY_IDS), _out(ours, TOY_IDS), rtol=2e-2, atol=2e-2)
    with pytest.raises(LoraConfigError, match="dtype='int8'"):
        save_adapter(ours, tmp_path / "x", dtype="int8")


# -- PEFT -> lorakit ------------------------------------------------------------------------------------------
def _peft_saved(make, config, path, **save_kwargs):
    theirs = get_peft_model(make(), config)
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if ".modules_to_save." in n or (p.requires_grad and n.endswith("bias")):
                p.add_(0.05)
    theirs.save_pretrained(str(path), **save_kwargs)
    return theirs.eval()


def _from_peft(make, config, path, inputs, **save_kwargs):
    """PEFT saves an adapter made on `make()`; lorakit loads it into a fresh `make()` with equal outputs."""
    theirs = _peft_saved(make, config, path, **save_kwargs)
    ours = make()
    base = _out(ours, inputs)
    load_adapter(ours, path)
    expected = _out(theirs, inputs)
    torch.testing.assert_close(_out(ours, inputs), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, base, atol=1e-4)
    return ours


def test_peft_minilm_loads_in_lorakit(tmp_path, minilm_tokenizer):
    inputs = dict(minilm_tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt"))
    config = PeftConfig(r=4, lora_alpha=8, target_modules=["query", "value", "word_embeddings"], use_rslora=True,
                        rank_pattern={"value": 2}, alpha_pattern={"query": 3}, task_type="SEQ_CLS",
                        init_lora_weights=False)
    ours = _from_peft(make_minilm, config, tmp_path / "a", inputs)
    assert lora_configs(ours)["default"].modules_to_save == ["classifier"]  # PEFT also lists "score"
    config = PeftConfig(r=2, target_modules=["dense"], modules_to_save=["pooler", "classifier"],
                        init_lora_weights=False)  # PEFT leaves pooler.dense, inside a saved module, alone
    ours = _from_peft(make_minilm, config, tmp_path / "inside", inputs)
    assert not hasattr(ours.bert.pooler.copy("default").dense, "lora_A")
    for bias in ("all", "lora_only"):
        config = PeftConfig(r=2, lora_alpha=4, target_modules=["key", "dense"], bias=bias, task_type="SEQ_CLS",
                            init_lora_weights="gaussian")
        _from_peft(make_minilm, config, tmp_path / bias, inputs)


@pytest.mark.parametrize("kind, config", [
    ("gpt2", PeftConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                        rank_pattern={"c_proj": 2}, modules_to_save=["lm_head"], init_lora_weights=False)),
    ("llama", PeftConfig(r=2, lora_alpha=5, target_modules="all-linear", use_rslora=True, init_lora_weights=False,
                         alpha_pattern={"q_proj": 7})),
    ("llama", PeftConfig(r=2, lora_alpha=4, target_modules=r".*\.(q_proj|v_proj)", init_lora_weights=False,
                         exclude_modules=["layers.0.self_attn.q_proj"])),
])
def test_peft_tiny_models_load_in_lorakit(tmp_path, kind, config):
    _from_peft(lambda: make_tiny(kind), config, tmp_path / "a", tiny_inputs(kind))


def test_peft_toy_with_conv_and_embedding_loads(tmp_path):
    config = PeftConfig(r=2, lora_alpha=3, target_modules=["emb", "conv", "lin"], modules_to_save=["head"],
                        init_lora_weights=False)
    _from_peft(lambda: Toy().eval(), config, tmp_path / "a", TOY_IDS)
    _to_peft(lambda: Toy().eval(), toy_with_adapter(), tmp_path / "b", TOY_IDS)


def test_combined_adapter_round_trips_through_peft(tmp_path):
    ours = toy_with_adapter(seed=1)
    inject(ours, LoraConfig(r=3, alpha=7, targets=["conv", "lin"], use_rslora=True), "second")
    randomize_adapters(ours, "second", std=0.3, seed=2)
    combine(ours, ["default", "second"], [0.7, -0.4], "both", method="cat")  # per-module ranks, scale 1
    set_adapter(ours, "both")
    cfg = _to_peft(lambda: Toy().eval(), ours, tmp_path / "a", TOY_IDS, name="both")
    assert cfg["r"] == 7 and cfg["rank_pattern"] == {"emb": 2, "conv": 5}  # conv: 2 + 3, lin: 4 + 3
    with pytest.raises(AdapterNotFound, match="'nope' is not on this model"):
        save_adapter(ours, tmp_path / "b", "nope")


def test_combined_per_slice_gpt2_adapter_loads_in_peft(tmp_path):
    def two():
        model = make_tiny("gpt2")
        for name, r, seed in (("a", 4, 1), ("b", 2, 2)):
            inject(model, LoraConfig(r=r, alpha=2 * r), name)
            randomize_adapters(model, name, seed=seed)
        return model

    ours = two()
    combine(ours, ["a", "b"], [0.6, 0.9], "ab", method="cat")
    set_adapter(ours, "ab")
    expected = _out(ours, tiny_inputs("gpt2"))
    set_adapter(ours, ["a", "b"])  # weights 1, 1 differ from 0.6, 0.9: the combination is not the plain sum
    assert not torch.allclose(_out(ours, tiny_inputs("gpt2")), expected, atol=1e-4)
    set_adapter(ours, "ab")
    _to_peft(lambda: make_tiny("gpt2"), ours, tmp_path / "ab", tiny_inputs("gpt2"), name="ab")


def test_peft_embedding_base_weights_are_refused_unless_left_out(tmp_path):
    config = PeftConfig(r=2, target_modules=["embed_tokens", "q_proj"], init_lora_weights=False)
    _peft_saved(lambda: make_tiny("llama"), config, tmp_path / "a")  # PEFT adds the full embedding matrices here
    base = make_tiny("llama")
    snap = model_state(base)
    with pytest.raises(AdapterFileError, match="embed_tokens.base_layer.weight"):
        load_adapter(base, tmp_path / "a")
    assert_unchanged(snap, base)
    _from_peft(lambda: make_tiny("llama"), config, tmp_path / "b", tiny_inputs("llama"), save_embedding_layers=False)


# -- several adapters, names, atomic writes ----------------------------------------------------------------------
def test_load_beside_existing_keeps_active_and_merged_state(tmp_path):
    saved = toy_with_adapter(seed=1)
    save_adapter(saved, tmp_path / "other")
    model = toy_with_adapter(name="mine", seed=2)
    before = _out(model, TOY_IDS)
    merge(model)
    assert load_adapter(model, tmp_path / "other") == "default"
    assert active_adapters(model) == ["mine"] and model.lin.merged == ["mine"]
    torch.testing.assert_close(_out(model, TOY_IDS), before)
    set_adapter(model, "default")
    torch.testing.assert_close(_out(model, TOY_IDS), _out(saved, TOY_IDS))
    with pytest.raises(AdapterFileError, match="already on the model"):
        load_adapter(model, tmp_path / "other", "mine")


@pytest.mark.parametrize("name", ["", ".", "..", "../up", "a/b", "a b", "x..y", "é", "a\\b", "n" * 129])
def test_bad_adapter_names(tmp_path, name):
    with pytest.raises(AdapterFileError, match="A-Za-z0-9"):
        check_adapter_name(name)
    with pytest.raises(AdapterFileError):
        adapter_dir(tmp_path, name)


def test_good_adapter_names(tmp_path):
    assert adapter_dir(tmp_path, "sst2-r8.v1_x") == tmp_path / "sst2-r8.v1_x"


def test_names_with_dots_work_everywhere(tmp_path):
    # '.' is refused by torch in parameter names; the layers key it as "%2E" and files never carry the name.
    saved = toy_with_adapter(name="sst2-r8.v1", seed=3)
    assert "sst2-r8.v1: r=4, scale=0.75" in repr(saved.lin)  # rank_pattern gives lin r=4
    save_adapter(saved, tmp_path / "sst2-r8.v1", "sst2-r8.v1")
    keys = safetensors.torch.load_file(tmp_path / "sst2-r8.v1" / "adapter_model.safetensors").keys()
    assert "base_model.model.lin.lora_A.weight" in keys and not any("v1" in k or "%2E" in k for k in keys)
    model = toy_with_adapter(seed=1)  # "default" is taken, so the directory's name is used
    assert load_adapter(model, tmp_path / "sst2-r8.v1") == "sst2-r8.v1"
    assert "sst2-r8.v1" in repr(model) and lora_configs(model).keys() == {"default", "sst2-r8.v1"}
    set_adapter(model, "sst2-r8.v1")
    torch.testing.assert_close(_out(model, TOY_IDS), _out(saved, TOY_IDS))
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n in dict(model.named_parameters()) if "sst2-r8%2Ev1" in n}
    combine(model, ["default", "sst2-r8.v1"], [1.0, 1.0], "sum.1", method="cat")
    delete_adapter(model, "sst2-r8.v1")
    assert not any("%2E" in n and "v1" in n for n, _ in model.named_parameters())
    assert model.lin.adapter_names == ["default", "sum.1"] and model.head.adapter_names == ["default", "sum.1"]


def test_save_is_atomic(tmp_path, monkeypatch):
    target = tmp_path / "a"
    first, second = toy_with_adapter(seed=1), toy_with_adapter(seed=2)
    save_adapter(first, target)
    (target / "README.md").write_text("model card")
    save_adapter(second, target)  # replacing a previous adapter is fine; its model card stays
    assert (target / "README.md").read_text() == "model card"
    real_fsync = os.fsync
    calls = []

    def crash_on_second_file(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", crash_on_second_file)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(first, target)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no temporary leftovers
    back = Toy().eval()
    load_adapter(back, target)
    torch.testing.assert_close(_out(back, TOY_IDS), _out(second, TOY_IDS))  # the previous adapter, whole
    (target / "notes.txt").write_text("mine")
    with pytest.raises(AdapterFileError, match="holds other files"):
        save_adapter(first, target)
