"""Merged export loads with plain transformers and equals base + adapter; inspect summarises and validates."""

import copy
import json

import pytest
import torch
import transformers as tf

from lorakit import AdapterFileError, LoraConfig, inject, save_adapter
from lorakit.export import delta_norm, export_merged, inspect_adapter
from lorakit.layers import LoraModule
from tests.conftest import make_minilm, make_tiny, minilm_path, randomize_adapters, tiny_inputs
from tests.test_io import toy_with_adapter


def _adapted(base, config, std=0.1):
    ours = copy.deepcopy(base)
    inject(ours, config)
    randomize_adapters(ours, std=std)
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.1)
    return ours


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


def test_merged_minilm_classifier_loads_without_lorakit(tmp_path, minilm_tokenizer):
    base = make_minilm()
    ours = _adapted(base, LoraConfig(r=4, alpha=8, modules_to_save=["classifier"], task_type="SEQ_CLS"), std=0.05)
    save_adapter(ours, tmp_path / "adapter")
    out = export_merged(minilm_path(), tmp_path / "adapter", tmp_path / "merged")
    merged = tf.AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any(isinstance(m, LoraModule) for m in merged.modules())
    inputs = dict(minilm_tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt"))
    expected = _logits(ours, inputs)
    torch.testing.assert_close(_logits(merged, inputs), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _logits(base, inputs), atol=1e-3)
    assert (out / "model.safetensors").is_file() and (out / "vocab.txt").is_file()
    assert tf.AutoTokenizer.from_pretrained(out)("hello")["input_ids"] == minilm_tokenizer("hello")["input_ids"]


@pytest.mark.parametrize("kind, config, task", [
    ("gpt2", LoraConfig(r=4, alpha=8, targets=["c_attn", "wte"]), None),  # wte is tied to lm_head
    ("gpt2", LoraConfig(r=2, alpha=4, modules_to_save=["lm_head"]), None),  # sliced c_attn, a trained lm_head copy
    ("llama", LoraConfig(r=2, alpha=4, targets="all-linear", use_rslora=True), "causal-lm"),
])
def test_merged_tiny_models_load_without_lorakit(tmp_path, kind, config, task):
    base = make_tiny(kind)
    base.save_pretrained(tmp_path / "base")
    ours = _adapted(base, config)
    save_adapter(ours, tmp_path / "adapter")
    out = export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged", task=task)
    merged = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    expected = _logits(ours, tiny_inputs(kind))
    torch.testing.assert_close(_logits(merged, tiny_inputs(kind)), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, _logits(base, tiny_inputs(kind)), atol=1e-3)


def test_export_refuses_bad_input_and_leaves_nothing(tmp_path):
    save_adapter(toy_with_adapter(), tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_model.safetensors").write_bytes(b"\x00" * 7)
    make_tiny("llama").save_pretrained(tmp_path / "base")
    with pytest.raises(AdapterFileError, match="8-byte header"):
        export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    with pytest.raises(AdapterFileError, match="no config.json"):
        export_merged(tmp_path / "adapter", tmp_path / "adapter", tmp_path / "merged")
    (tmp_path / "merged").mkdir()
    (tmp_path / "merged" / "x").write_text("keep")
    with pytest.raises(AdapterFileError, match="not empty"):
        export_merged(tmp_path / "base", tmp_path / "adapter", tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]
    save_adapter(toy_with_adapter(), tmp_path / "toy")
    with pytest.raises(AdapterFileError, match="target_modules"):  # the Toy's adapter does not fit Llama
        export_merged(tmp_path / "base", tmp_path / "toy", tmp_path / "merged2")


def test_delta_norm_equals_the_dense_norm():
    model = toy_with_adapter()
    for m in (model.emb, model.conv, model.lin):
        dense = torch.linalg.vector_norm(m.delta_weight("default").detach().double())
        assert delta_norm(m.A("default"), m.B("default"), m.scale["default"]) == pytest.approx(float(dense), rel=1e-6)


def test_inspect_summarises_and_validates(tmp_path):
    model = toy_with_adapter()
    save_adapter(model, tmp_path / "a")
    text = inspect_adapter(tmp_path / "a")
    size = (tmp_path / "a" / "adapter_model.safetensors").stat().st_size
    assert f"{size:,} bytes" in text and "LORA" in text and "modules_to_save ['head']" in text
    for name, kind, r in (("emb", "embed", 2), ("conv", "conv", 2), ("lin", "linear", 4)):
        m = getattr(model, name)
        norm = float(torch.linalg.vector_norm(m.delta_weight("default").detach()))
        row = next(line for line in text.splitlines() if line.startswith(name + " "))
        assert row.split()[1:3] == [kind, str(r)] and f"{norm:.4g}" in row
    lora = sum(p.numel() for n, p in model.named_parameters() if ".lora_" in n)
    head = sum(p.numel() for p in model.head.copy("default").parameters())
    assert f"trainable values {lora + head:,} (LoRA {lora:,}" in text
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "rank_pattern": {"lin": 3}}))
    with pytest.raises(AdapterFileError, match="lin: rank 4, but the config"):
        inspect_adapter(tmp_path / "a")
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**config, "r": 0}))
    with pytest.raises(AdapterFileError, match="field 'r': 0: expected an integer >= 1"):
        inspect_adapter(tmp_path / "a")
    with pytest.raises(AdapterFileError, match="not a directory"):
        inspect_adapter(tmp_path / "missing")
