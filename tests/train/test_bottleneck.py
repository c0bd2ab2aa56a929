"""AdapterH / AdapterL: identity at init, the paper's parameter counts, placement checked against forward hooks
on an untouched copy, gradients only where they belong, and a real training run that rebuilds for eval."""

import copy

import pytest
import torch

from lorakit.errors import LoraConfigError
from lorakit.injection import count_parameters
from lorakit.train.bottleneck import Adapted, Bottleneck, add_adapters
from lorakit.train.config import TrainConfig
from lorakit.train.inference import evaluate_adapter
from lorakit.train.loop import train
from lorakit.train.methods import prepare, transformer_blocks
from lorakit.train.report import read_metrics
from lorakit.train.tasks import load_model
from tests.conftest import make_tiny
from tests.train.conftest import BERT

STYLES = {"adapter": "houlsby", "adapter-l": "lin"}


def _bert(tiny_bert_dir):
    torch.manual_seed(0)
    return load_model(tiny_bert_dir, "classification", ["0", "1"]).eval()


def _randomize(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, Bottleneck):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def _reference_hooks(model, adapted_model):
    """On an untouched copy: a forward hook per site adding the same adapter, written out densely."""
    for name, m in adapted_model.named_modules():
        if isinstance(m, Adapted):
            a = m.adapter

            def hook(_mod, _inp, y, a=a):
                h = a.norm(y) if isinstance(a.norm, torch.nn.LayerNorm) else y
                return y + torch.relu(h @ a.down.weight.T + a.down.bias) @ a.up.weight.T + a.up.bias

            model.get_submodule(name).register_forward_hook(hook)


@pytest.mark.parametrize("method", sorted(STYLES))
@pytest.mark.parametrize("family", ["bert", "llama"])
def test_identity_at_init_then_equal_to_a_dense_reference(tiny_bert_dir, method, family):
    model = _bert(tiny_bert_dir) if family == "bert" else make_tiny("llama")
    ids = {"input_ids": torch.randint(1, 100, (2, 9), generator=torch.Generator().manual_seed(1))}
    base = copy.deepcopy(model)
    want = base(**ids).logits
    add_adapters(model, transformer_blocks(model), STYLES[method], bottleneck=4)
    torch.testing.assert_close(model(**ids).logits, want, rtol=0, atol=0)  # up = 0: exactly the base
    _randomize(model)
    _reference_hooks(base, model)
    got = model(**ids).logits
    assert (got - want).abs().max() > 1e-3  # the adapters now do something ...
    torch.testing.assert_close(got, base(**ids).logits, rtol=1e-5, atol=1e-5)  # ... and exactly what they should


def test_sites_are_the_attention_and_mlp_outputs(tiny_bert_dir):
    bert = _bert(tiny_bert_dir)
    assert add_adapters(bert, transformer_blocks(bert), "houlsby") == [
        "bert.encoder.layer.0.attention.output.dense", "bert.encoder.layer.0.output.dense",
        "bert.encoder.layer.1.attention.output.dense", "bert.encoder.layer.1.output.dense"]
    llama = make_tiny("llama")
    assert add_adapters(llama, transformer_blocks(llama), "lin") == ["model.layers.0.mlp.down_proj",
                                                                     "model.layers.1.mlp.down_proj"]


@pytest.mark.parametrize("method,bottleneck", [("adapter", 0), ("adapter", 5), ("adapter-l", 0), ("adapter-l", 5)])
def test_trainable_counts_are_the_papers_closed_forms(tiny_bert_dir, tmp_path, method, bottleneck):
    d, n_layers, head = BERT["hidden_size"], BERT["num_hidden_layers"], BERT["hidden_size"] * 2 + 2
    m = bottleneck or d // 32
    per_adapter = 2 * d * m + d + m
    want = n_layers * 2 * per_adapter if method == "adapter" else n_layers * (per_adapter + 2 * d)
    model = _bert(tiny_bert_dir)
    total = count_parameters(model)["total"]
    prepare(model, TrainConfig(method=method, bottleneck=bottleneck, out=str(tmp_path)), "classification")
    counts = count_parameters(model)
    assert counts["trainable"] == want + head
    assert counts["total"] == total + want


@pytest.mark.parametrize("method", sorted(STYLES))
def test_gradients_reach_only_the_adapters_and_the_head(tiny_bert_dir, tmp_path, method):
    model = _bert(tiny_bert_dir).train()
    prepare(model, TrainConfig(method=method, bottleneck=4, out=str(tmp_path)), "classification")
    _randomize(model)  # with up = 0 the down projection gets no gradient at the first step
    ids = torch.randint(1, 100, (4, 9), generator=torch.Generator().manual_seed(1))
    model(input_ids=ids).logits.logsumexp(-1).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert {n.split(".adapter.")[-1] for n in trainable if ".adapter." in n} == (
        {"down.weight", "down.bias", "up.weight", "up.bias"} | ({"norm.weight", "norm.bias"} if method == "adapter-l"
                                                                 else set()))
    assert {n for n in trainable if ".adapter." not in n} == {"classifier.weight", "classifier.bias"}


@pytest.mark.parametrize("method", sorted(STYLES))
def test_training_lowers_the_loss_and_eval_rebuilds_the_adapters(tiny_bert_dir, tmp_path, method):
    config = TrainConfig(model=tiny_bert_dir, task="sst2", out=str(tmp_path / method), method=method, bottleneck=8,
                         train_limit=16, dev_limit=16, batch_size=16, max_steps=12, lr=2e-2, warmup_ratio=0.0,
                         threads=1, progress=False)
    result = train(config)
    rows = [r for r in read_metrics(tmp_path / method / "metrics.jsonl") if r["split"] == "train"]
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.05
    head = result.model.classifier.weight.detach()
    assert not torch.equal(head, _bert(tiny_bert_dir).classifier.weight)  # the head trained too
    again = evaluate_adapter(result.adapter_dir, dev_limit=16)
    assert again["accuracy"] == pytest.approx(result.dev["accuracy"])
    assert again["loss"] == pytest.approx(result.dev["loss"], rel=1e-5)


def test_a_model_without_known_sites_is_refused_unchanged():
    model = make_tiny("t5")
    before = [n for n, _ in model.named_modules()]
    with pytest.raises(LoraConfigError, match="not supported by the adapter methods"):
        add_adapters(model, transformer_blocks(model), "houlsby")
    assert [n for n, _ in model.named_modules()] == before

