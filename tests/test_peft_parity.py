"""HF PEFT is the reference: same A, B in both -> same outputs (≤1e-5); same trainable-parameter counts."""

import copy

import pytest
import torch
from peft import LoraConfig as PeftConfig
from peft import get_peft_model

from lorakit import LoraConfig, count_parameters, inject
from tests.conftest import make_minilm, make_tiny, randomize_adapters, tiny_inputs


def _copy_into_peft(ours, peft_model, name="default"):
    """Copy our adapter tensors into PEFT's model under PEFT's own parameter names."""
    theirs = dict(peft_model.named_parameters())
    copied = 0
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if not key.endswith(f".{name}") and f".modules_to_save.{name}." not in key:
                continue
            path = "base_model.model." + key
            if ".lora_A." in key or ".lora_B." in key:
                path += ".weight"
            theirs[path].copy_(p)
            copied += 1
    return copied


def _compare(base, our_cfg, peft_cfg, inputs, logits=lambda o: o.logits, std=0.2):
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    inject(ours, our_cfg)
    randomize_adapters(ours, std=std)
    with torch.no_grad():  # heads too, so modules_to_save differ from the base
        for n, p in ours.named_parameters():
            if ".modules_to_save." in n:
                p.add_(0.1)
    peft_model = get_peft_model(ref, peft_cfg).eval()
    assert _copy_into_peft(ours, peft_model) > 0
    with torch.no_grad():
        a, b = logits(ours(**inputs)), logits(peft_model(**inputs))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(a, logits(base(**inputs)), atol=1e-4)  # the adapter really acts
    assert count_parameters(ours)["trainable"] == sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return ours, peft_model


MINILM_CASES = [
    (LoraConfig(r=8, alpha=16, modules_to_save=["classifier"]),
     PeftConfig(r=8, lora_alpha=16, target_modules=["query", "value"], modules_to_save=["classifier"])),
    (LoraConfig(r=4, alpha=8, targets="all-linear", bias="all", modules_to_save=["classifier"]),
     PeftConfig(r=4, lora_alpha=8, target_modules="all-linear", bias="all", task_type="SEQ_CLS")),
    (LoraConfig(r=16, alpha=4, use_rslora=True, bias="lora_only", targets=["key", "dense"]),
     PeftConfig(r=16, lora_alpha=4, use_rslora=True, bias="lora_only", target_modules=["key", "dense"])),
    (LoraConfig(r=8, alpha=8, targets=["query", "value"], rank_pattern={"value": 2}, alpha_pattern={"query": 3}),
     PeftConfig(r=8, lora_alpha=8, target_modules=["query", "value"], rank_pattern={"value": 2},
                alpha_pattern={"query": 3})),
    (LoraConfig(r=4, alpha=8, targets=["word_embeddings", "query"]),
     PeftConfig(r=4, lora_alpha=8, target_modules=["word_embeddings", "query"])),
]


@pytest.mark.parametrize("ours, theirs", MINILM_CASES)
def test_minilm_matches_peft(ours, theirs, minilm_tokenizer):
    base = make_minilm()
    inputs = dict(minilm_tokenizer(["a gripping, funny film", "dull and far too long"], padding=True,
                                   return_tensors="pt"))
    _compare(base, ours, theirs, inputs)


@pytest.mark.parametrize("kind, ours, theirs", [
    ("gpt2", LoraConfig(r=4, alpha=8, targets=["c_attn", "c_proj"], modules_to_save=["lm_head"]),
     PeftConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True,
                modules_to_save=["lm_head"])),
    ("gpt2", LoraConfig(r=2, alpha=3, targets="all-linear"),
     PeftConfig(r=2, lora_alpha=3, target_modules="all-linear", fan_in_fan_out=True)),
    ("llama", LoraConfig(r=4, alpha=16), PeftConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"])),
    ("llama", LoraConfig(r=2, alpha=5, targets="all-linear", use_rslora=True),
     PeftConfig(r=2, lora_alpha=5, target_modules="all-linear", use_rslora=True)),
    ("t5", LoraConfig(r=4, alpha=16), PeftConfig(r=4, lora_alpha=16, target_modules=["q", "v"])),
])
def test_tiny_models_match_peft(kind, ours, theirs):
    _compare(make_tiny(kind), ours, theirs, tiny_inputs(kind))


def test_gradients_match_peft_on_minilm(minilm_tokenizer):
    base = make_minilm()
    inputs = dict(minilm_tokenizer(["a gripping, funny film", "dull"], padding=True, return_tensors="pt"))
    ours, theirs = _compare(base, LoraConfig(r=4, targets="all-linear", modules_to_save=["classifier"]),
                            PeftConfig(r=4, lora_alpha=16, target_modules="all-linear", task_type="SEQ_CLS"),
                            inputs, std=0.05)
    for m in (ours, theirs):  # eval mode (no random dropout), gradients on
        m(**inputs, labels=torch.tensor([1, 0])).loss.backward()
    ref = dict(theirs.named_parameters())
    n = 0
    for key, p in ours.named_parameters():
        if p.requires_grad:
            path = "base_model.model." + key + (".weight" if ".lora_" in key else "")
            torch.testing.assert_close(p.grad, ref[path].grad, rtol=1e-4, atol=1e-6)
            n += 1
    assert n == 37 * 2 + 2
