"""PreLayer (prefix) and PreEmbed (prompt): outputs equal PEFT's prefix/prompt tuning given the same tensors, on
BERT (sequence and token classification), Llama (grouped-query attention) and GPT-2 causal LMs; the closed-form
parameter counts; gradients only on the prefix/prompt and the head; a real training run that rebuilds for eval."""

import copy

import pytest
import torch
import transformers as tf
from peft import PrefixTuningConfig, PromptTuningConfig, get_peft_model

from lorakit.errors import LoraConfigError
from lorakit.injection import count_parameters
from lorakit.train.config import TrainConfig
from lorakit.train.inference import evaluate_adapter
from lorakit.train.loop import train
from lorakit.train.methods import prepare
from lorakit.train.prefix import add_prefix, add_prompt, attention_geometry
from lorakit.train.report import read_metrics
from tests.conftest import make_tiny

P = 3
BERT_KW = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=3)
FAMILIES = {"bert-seq": (lambda: tf.BertForSequenceClassification(tf.BertConfig(**BERT_KW)), "SEQ_CLS"),
            "bert-token": (lambda: tf.BertForTokenClassification(tf.BertConfig(**BERT_KW)), "TOKEN_CLS"),
            "llama": (lambda: make_tiny("llama"), "CAUSAL_LM"),
            "gpt2": (lambda: make_tiny("gpt2"), "CAUSAL_LM")}


def _pair(family):
    make, task = FAMILIES[family]
    torch.manual_seed(0)
    model = make().eval()
    return model, copy.deepcopy(model), task


def _inputs():
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 5:] = 0  # padding must stay masked
    return {"input_ids": ids, "attention_mask": mask}


def _peft_prefix_weight(prefix):
    """PEFT's (p, layers·2·kv_heads·head_dim) embedding: per virtual token, layer by layer, key then value."""
    layers, heads, p, hd = prefix.key.shape
    kv = torch.stack([prefix.key, prefix.value], 1).reshape(layers * 2, heads, p, hd)
    return kv.permute(2, 0, 1, 3).reshape(p, -1)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prefix_equals_peft_prefix_tuning(family):
    model, ref, task = _pair(family)
    base = ref(**_inputs()).logits
    torch.manual_seed(1)
    prefix = add_prefix(model, P)
    got = model(**_inputs()).logits
    peft = get_peft_model(ref, PrefixTuningConfig(task_type=task, num_virtual_tokens=P))
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(_peft_prefix_weight(prefix))
    torch.testing.assert_close(got, peft(**_inputs()).logits, rtol=1e-5, atol=1e-5)
    assert (got - base).abs().max() > 1e-3  # the prefix changes the outputs


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_prompt_equals_peft_prompt_tuning(family):
    model, ref, task = _pair(family)
    torch.manual_seed(1)
    prompt = add_prompt(model, P)
    got = model(**_inputs()).logits
    peft = get_peft_model(ref, PromptTuningConfig(task_type=task, num_virtual_tokens=P))
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(prompt.weight)
    want = peft(**_inputs()).logits
    if want.dim() == 3:  # PEFT returns the virtual tokens' logits too; lorakit keeps the real tokens' only
        want = want[:, P:]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prompt_starts_from_real_token_embeddings_and_prefix_from_their_activations():
    model = make_tiny("llama")
    table = model.get_input_embeddings().weight
    prompt = add_prompt(model, P)
    assert all(any(torch.equal(row, t) for t in table) for row in prompt.weight)
    model = make_tiny("llama")
    torch.manual_seed(5)
    prefix = add_prefix(model, P)
    torch.manual_seed(5)
    ids = torch.randint(0, 100, (1, P))
    keys = model.model(input_ids=ids, use_cache=True).past_key_values.layers[1].keys[0]
    torch.testing.assert_close(prefix.key[1], keys)


@pytest.mark.parametrize("family,d_kv", [("bert-seq", 32), ("llama", 16)])  # tiny Llama: 2 of 4 heads for k, v
def test_trainable_counts_are_the_closed_forms(tmp_path, family, d_kv):
    for method, want in (("prefix", 2 * 2 * P * d_kv), ("prompt", P * 32)):  # L · 2 · p · d_kv;  p · d
        model, _, _ = _pair(family)
        total = count_parameters(model)["total"]
        kind = "classification" if family == "bert-seq" else "causal_lm"
        head = 32 * 3 + 3 if kind == "classification" else 100 * 32  # untied lm_head: the head
        prepare(model, TrainConfig(method=method, prefix_length=P, out=str(tmp_path)), kind)
        assert count_parameters(model)["trainable"] == want + head
        assert count_parameters(model)["total"] == total + want
    assert attention_geometry(make_tiny("llama")) == (2, 2, 8)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_gradients_reach_only_the_prefix_and_the_head(tmp_path, method):
    model, _, _ = _pair("bert-seq")
    prepare(model.train(), TrainConfig(method=method, prefix_length=P, out=str(tmp_path)), "classification")
    model(**_inputs()).logits.logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    want = ({"lorakit_prefix.key", "lorakit_prefix.value"} if method == "prefix" else {"lorakit_prompt.weight"})
    assert with_grad == {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == want | {"classifier.weight", "classifier.bias"}


def test_installing_twice_is_refused():
    model = make_tiny("llama")
    add_prefix(model, P)
    with pytest.raises(LoraConfigError, match="already has a prefix"):
        add_prompt(model, P)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_training_lowers_the_loss_and_eval_rebuilds(tiny_bert_dir, tmp_path, method):
    config = TrainConfig(model=tiny_bert_dir, task="sst2", out=str(tmp_path / method), method=method, prefix_length=4,
                         train_limit=16, dev_limit=16, batch_size=16, max_steps=12, lr=2e-2, warmup_ratio=0.0,
                         threads=1, progress=False)
    result = train(config)
    rows = [r for r in read_metrics(tmp_path / method / "metrics.jsonl") if r["split"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    again = evaluate_adapter(result.adapter_dir, dev_limit=16)
    assert again["accuracy"] == pytest.approx(result.dev["accuracy"])
    assert again["loss"] == pytest.approx(result.dev["loss"], rel=1e-5)


def test_prefix_trains_a_causal_lm(tiny_gpt2_dir, tmp_path):
    config = TrainConfig(model=tiny_gpt2_dir, task="e2e", out=str(tmp_path / "e2e"), method="prefix", prefix_length=4,
                         train_limit=8, dev_limit=8, batch_size=8, max_steps=6, lr=5e-2, warmup_ratio=0.0,
                         max_length=64, threads=1, progress=False)
    train(config)
    rows = [r for r in read_metrics(tmp_path / "e2e" / "metrics.jsonl") if r["split"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"]


def _install(model, method):
    torch.manual_seed(1)
    return add_prefix(model, P) if method == "prefix" else add_prompt(model, P)


def _generate(model, ids, mask):
    model.generation_config.pad_token_id = 0
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_generate_equals_peft_and_a_left_padded_row_generates_as_alone(method, family):
    model, ref, task = _pair(family)
    added = _install(model, method)
    ids = torch.randint(1, 100, (2, 6), generator=torch.Generator().manual_seed(2))
    got = _generate(model, ids, torch.ones_like(ids))
    peft_config = (PrefixTuningConfig if method == "prefix" else PromptTuningConfig)(task_type=task,
                                                                                     num_virtual_tokens=P)
    peft = get_peft_model(ref, peft_config)
    with torch.no_grad():
        peft.prompt_encoder["default"].embedding.weight.copy_(
            _peft_prefix_weight(added) if method == "prefix" else added.weight)
    assert torch.equal(got, _generate(peft, ids, torch.ones_like(ids)))
    padded, mask = ids.clone(), torch.ones_like(ids)
    padded[0, :2], mask[0, :2] = 0, 0  # row 0: 4 real tokens after 2 left pads
    alone = _generate(model, ids[:1, 2:], torch.ones(1, 4, dtype=torch.long))
    assert torch.equal(_generate(model, padded, mask)[0, 6:], alone[0, 4:])


def test_prefix_with_gradient_checkpointing_is_refused_before_training(tiny_bert_dir, tmp_path):
    config = TrainConfig(model=tiny_bert_dir, task="sst2", out=str(tmp_path / "gc"), method="prefix", train_limit=8,
                         dev_limit=8, max_steps=1, gradient_checkpointing=True, threads=1, progress=False)
    with pytest.raises(LoraConfigError, match="set gradient_checkpointing to False"):
        train(config)
    assert not (tmp_path / "gc" / "metrics.jsonl").exists()
