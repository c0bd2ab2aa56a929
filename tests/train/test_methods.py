"""Every method trains for real through the one loop; trainable counts match closed forms; frozen tensors
stay bit-identical; optimizer groups (weight decay, LoRA+) are built from the declared parameters."""

import pytest
import torch
from torch import nn

from lorakit.errors import LoraConfigError
from lorakit.injection import count_parameters
from lorakit.layers import LoraModule
from lorakit.train import loop
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from lorakit.train.methods import head_names, param_groups, prepare, transformer_blocks
from lorakit.train.report import read_metrics
from lorakit.train.tasks import load_model
from tests.train.conftest import BERT

H, FF, L, C = BERT["hidden_size"], BERT["intermediate_size"], BERT["num_hidden_layers"], 2
V, P, T = BERT["vocab_size"], BERT["max_position_embeddings"], 2
EMBEDDINGS = V * H + P * H + T * H + 2 * H
LAYER = 4 * (H * H + H) + 2 * H + (H * FF + FF) + (FF * H + H) + 2 * H
POOLER, HEAD = H * H + H, H * C + C
TOTAL = EMBEDDINGS + L * LAYER + POOLER + HEAD
BIASES = H + L * (7 * H + FF) + H + C  # embedding LN; per layer q k v o, 2 LNs, ffn in/out; pooler; head
R = 4
LR = {"lora": 2e-2, "full": 5e-3, "top-k": 2e-2, "bitfit": 2e-2, "head": 5e-2}  # each fits 16 examples in 20 steps

EXPECTED = {  # method: (trainable, total)
    "lora": (2 * L * R * (H + H) + HEAD, TOTAL + 2 * L * R * (H + H) + HEAD),  # q, v: A (r, h) + B (h, r); head copy
    "full": (TOTAL, TOTAL),
    "top-k": (LAYER + HEAD, TOTAL),  # top_k = 1 of 2 layers
    "bitfit": (BIASES + H * C, TOTAL),
    "head": (HEAD, TOTAL),
}


def _model(tiny_bert_dir):
    torch.manual_seed(0)  # the new head's init
    return load_model(tiny_bert_dir, "classification", ["0", "1"])


def _config(tmp_path, tiny_bert_dir, method, **kw):
    base = dict(model=tiny_bert_dir, task="sst2", out=str(tmp_path / method), method=method, targets=None, r=R, top_k=1,
                train_limit=16, dev_limit=16, batch_size=16, max_steps=20, lr=LR[method], warmup_ratio=0.0,
                dropout=0.0, threads=1, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_counts_match_closed_forms(tiny_bert_dir, tmp_path, method):
    model = _model(tiny_bert_dir)
    assert count_parameters(model)["total"] == TOTAL  # the closed form describes this model
    prepare(model, _config(tmp_path, tiny_bert_dir, method), "classification")
    counts = count_parameters(model)
    assert (counts["trainable"], counts["total"]) == EXPECTED[method]


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_each_method_trains_and_leaves_frozen_tensors_alone(tiny_bert_dir, tmp_path, method):
    model = _model(tiny_bert_dir)
    before = {id(p): p.detach().clone() for p in model.parameters()}
    result = train(_config(tmp_path, tiny_bert_dir, method), model=model)
    assert result.model is model
    losses = [r["loss"] for r in read_metrics(tmp_path / method / "metrics.jsonl") if r["split"] == "train"]
    assert len(losses) == 20 and losses[-1] < 0.75 * losses[0], losses  # one repeated batch of 16: it fits
    frozen = [p for p in model.parameters() if not p.requires_grad]
    assert all(torch.equal(p, before[id(p)]) for p in frozen)
    assert (method == "full") == (not frozen)
    if method == "lora":  # the head trains as a copy; the original stays (frozen) as it was
        head, head_at_start = model.classifier.modules_to_save["default"], model.classifier.original_module.weight
    else:
        head, head_at_start = model.classifier, before[id(model.classifier.weight)]
    assert not torch.equal(head.weight, head_at_start)
    assert result.summary["trainable"] == EXPECTED[method][0]


def test_lora_b_learns_and_a_moves(tiny_bert_dir, tmp_path, monkeypatch):
    """B leaves 0 and A leaves its random init, in every layer. (A's gradient is s·Bᵀ·g·xᵀ: zero while B is 0,
    so A only moves once B has; a bug that froze A or re-initialised it would leave A at its init.)"""
    model, at_init = _model(tiny_bert_dir), {}

    def prepare_and_record(*args, **kwargs):  # the loop's own prepare, then a copy of each A it initialised
        out = prepare(*args, **kwargs)
        at_init.update({id(m): m.A("default").detach().clone() for m in out.modules() if isinstance(m, LoraModule)})
        return out

    monkeypatch.setattr(loop, "prepare", prepare_and_record)
    result = train(_config(tmp_path, tiny_bert_dir, "lora", eval_every=20), model=model)
    assert result.best_step == 20  # one evaluation, after the last step: the model holds the final tensors
    layers = [m for m in model.modules() if isinstance(m, LoraModule)]
    assert len(layers) == 2 * L and sorted(at_init) == sorted(map(id, layers))
    for m in layers:
        A, A0 = m.A("default").detach(), at_init[id(m)]
        assert m.B("default").abs().sum() > 0  # B starts at 0
        assert float(A0.norm()) > 0 and float((A - A0).norm() / A0.norm()) > 1e-2  # A moved, measurably


def test_lora_plus_and_weight_decay_groups(tiny_bert_dir, tmp_path):
    model = _model(tiny_bert_dir)
    config = _config(tmp_path, tiny_bert_dir, "lora", lora_plus_ratio=16.0, weight_decay=0.1, lr=1e-3)
    prepare(model, config, "classification")
    groups = param_groups(model, config)
    b_params = {id(m.B("default")) for m in model.modules() if isinstance(m, LoraModule)}
    by_lr = {}
    for g in groups:
        by_lr.setdefault(g["lr"], set()).update(id(p) for p in g["params"])
        assert g["weight_decay"] == (0.1 if all(p.dim() >= 2 for p in g["params"]) else 0.0)
        assert all(p.dim() >= 2 for p in g["params"]) or all(p.dim() < 2 for p in g["params"])
    assert sorted(by_lr) == [1e-3, 1e-3 * 16.0] and by_lr[1e-3 * 16.0] == b_params
    assert sum(p.numel() for g in groups for p in g["params"]) == EXPECTED["lora"][0]


def test_blocks_heads_and_method_errors(tiny_bert_dir, tiny_gpt2_dir, tmp_path):
    bert = _model(tiny_bert_dir)
    assert transformer_blocks(bert)[0] == "bert.encoder.layer" and head_names(bert, "classification") == ["classifier"]
    gpt2 = load_model(tiny_gpt2_dir, "causal_lm", [])
    assert transformer_blocks(gpt2)[0] == "transformer.h" and head_names(gpt2, "causal_lm") == []  # lm_head is tied
    with pytest.raises(LoraConfigError, match="method 'head' needs a task head"):
        prepare(gpt2, _config(tmp_path, tiny_gpt2_dir, "head"), "causal_lm")
    with pytest.raises(LoraConfigError, match="top_k=3 but the model has 2 blocks"):
        prepare(bert, _config(tmp_path, tiny_bert_dir, "top-k", top_k=3), "classification")
    with pytest.raises(LoraConfigError, match="extra_trainable='poler': no such module"):
        prepare(bert, _config(tmp_path, tiny_bert_dir, "lora", extra_trainable=["poler"]), "classification")
    prepare(bert, _config(tmp_path, tiny_bert_dir, "lora", extra_trainable=["pooler"]), "classification")
    assert count_parameters(bert)["trainable"] == EXPECTED["lora"][0] + POOLER


def test_extra_trainable_globs_train_every_matching_module(tiny_bert_dir, tmp_path):
    bert = _model(tiny_bert_dir)
    norms = [n for n, m in bert.named_modules() if isinstance(m, nn.LayerNorm)]
    hidden = bert.config.hidden_size
    assert len(norms) == 1 + 2 * bert.config.num_hidden_layers  # embeddings + two per block
    prepare(bert, _config(tmp_path, tiny_bert_dir, "lora", extra_trainable=["*LayerNorm"]), "classification")
    assert count_parameters(bert)["trainable"] == EXPECTED["lora"][0] + len(norms) * 2 * hidden
    trained = [n for n, p in bert.named_parameters() if p.requires_grad]
    assert all(sum(t.startswith(n + ".") for t in trained) == 2 for n in norms)  # each one's weight and bias
    with pytest.raises(LoraConfigError, match=r"extra_trainable='\*Layernorm': the pattern matches no module"):
        prepare(_model(tiny_bert_dir), _config(tmp_path, tiny_bert_dir, "lora", extra_trainable=["*Layernorm"]),
                "classification")
