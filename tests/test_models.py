"""Bundled models by name: the SmolLM2 GGUF converted once into a plain checkpoint that transformers loads
without gguf, keeps its embeddings tied and its chat template, and still answers like the original."""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from lorakit.errors import LoraConfigError
from lorakit.generate import generate
from lorakit.models import cache_dir, resolve_model
from tests.conftest import minilm_path


def test_converted_smollm2_is_a_plain_tied_checkpoint(smollm2_dir, smollm2):
    config = json.loads((Path(smollm2_dir) / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True
    assert (config["model_type"], config["num_hidden_layers"], config["hidden_size"]) == ("llama", 30, 576)
    model, tokenizer = smollm2
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # 134.5M, the published size
    assert model.dtype == torch.float32 and "<|im_start|>" in tokenizer.chat_template


def test_converted_smollm2_answers_through_its_chat_template(smollm2):
    """Greedy, through lorakit.generate (chat template, a left-padded batch of two)."""
    model, tokenizer = smollm2
    out = generate(model, tokenizer, ["What is the capital of France?", "What is 2 + 2? Answer with a number."],
                   max_new_tokens=8, batch_size=2)
    assert "Paris" in out[0] and "4" in out[1]


def test_second_resolve_reuses_the_conversion(smollm2_dir):
    stamp = os.stat(Path(smollm2_dir) / "model.safetensors").st_mtime_ns
    start = time.perf_counter()
    assert resolve_model("smollm2") == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert os.stat(Path(smollm2_dir) / "model.safetensors").st_mtime_ns == stamp


def test_names_and_paths_resolve(tmp_path, monkeypatch):
    assert resolve_model("minilm") == str(minilm_path())
    assert resolve_model(tmp_path) == str(tmp_path)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    with pytest.raises(LoraConfigError, match=r"'no/such/dir'.*minilm, smollm2"):
        resolve_model("no/such/dir")
