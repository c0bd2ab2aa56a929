"""The loop on every task, its loss and gradient against transformers' own, the schedule, best-on-dev
selection, the run directory, and bad input failing before any training."""

import json
import math

import pytest
import torch

from lorakit.errors import LoraConfigError, LoraError
from lorakit.train import distributed
from lorakit.train.config import TrainConfig
from lorakit.train.data import DataError, collate, encode, load_task, pad_token_id
from lorakit.train.inference import evaluate_adapter, predict_texts
from lorakit.train.loop import _enable_checkpointing, _optimizer_step, auto_threads, lr_factor, setup, train
from lorakit.train.report import read_metrics
from lorakit.train.tasks import (
    count_targets,
    eval_parts,
    evaluate,
    load_model,
    load_tokenizer,
    loss_sum,
    metrics_from_parts,
    model_inputs,
    step_module,
)

METRIC = {"sst2": "accuracy", "rte": "accuracy", "wnut17": "f1", "e2e": "loss"}
# Loss after 15 steps on one repeated batch of 8, relative to the first: a tiny random GPT-2 memorises 8 E2E
# completions through LoRA on q, v slowly (measured ~0.84), the classifiers quickly (measured < 0.3).
FIT = {"sst2": 0.6, "rte": 0.6, "wnut17": 0.6, "e2e": 0.9}


def _config(tmp_path, model_dir, task="sst2", **kw):
    base = dict(model=model_dir, task=task, out=str(tmp_path / "run"), targets=None, train_limit=8, dev_limit=8,
                batch_size=8, max_steps=15, lr=2e-2, warmup_ratio=0.0, max_length=64, threads=1, progress=False)
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize("task", ["sst2", "rte", "wnut17", "e2e"])
def test_every_task_trains_and_writes_its_run_directory(tmp_path, tiny_bert_dir, tiny_gpt2_dir, task):
    model_dir = tiny_gpt2_dir if task == "e2e" else tiny_bert_dir
    config = _config(tmp_path, model_dir, task, max_length=128 if task == "e2e" else 64)
    result = train(config)
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 15 and losses[-1] < FIT[task] * losses[0], losses  # one repeated batch of 8 is learned
    dev = [r for r in rows if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15]  # 1 step = 1 epoch
    run = tmp_path / "run"
    assert sorted(p.name for p in (run / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert TrainConfig.load(run / "config.json") == config
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    info = json.loads((run / "task.json").read_text())
    assert info["labels"] == load_task(task).labels and info["model"] == model_dir
    name = METRIC[task]
    assert result.summary["metric_name"] == name and result.dev[name] == result.summary["metric"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["task_type"] == {
        "sst2": "SEQ_CLS", "rte": "SEQ_CLS", "wnut17": "TOKEN_CLS", "e2e": "CAUSAL_LM"}[task]
    if task == "e2e":  # greedy generation from base + adapter, reloaded from the run directory
        (pred,) = predict_texts(run / "adapter", ["name : Zizzi | area : riverside"])
        assert isinstance(pred["completion"], str) and pred["completion"]


@pytest.mark.parametrize("task", ["sst2", "wnut17", "e2e"])
def test_loss_equals_transformers_own_loss(tiny_bert_dir, tiny_gpt2_dir, task):
    model_dir = tiny_gpt2_dir if task == "e2e" else tiny_bert_dir
    data, tok = load_task(task), load_tokenizer(model_dir)
    model = load_model(model_dir, data.kind, data.labels).eval()
    batch = collate(encode(data.dev[:6], data.kind, tok, data.labels, 128), pad_token_id(tok))
    with torch.no_grad():
        ours = loss_sum(data.kind, model(**model_inputs(batch, data.kind)).logits, batch["labels"])
        ref = model(**model_inputs(batch, data.kind), labels=batch["labels"]).loss  # HF's mean (shifted for LM)
    assert float(ours) / count_targets(data.kind, batch["labels"]) == pytest.approx(float(ref), rel=1e-5)


@pytest.mark.parametrize("task", ["sst2", "wnut17", "e2e"])
def test_dev_metrics_from_shards_equal_the_whole_split(tiny_bert_dir, tiny_gpt2_dir, task):
    # What DDP evaluation does: each of 3 ranks takes every 3rd example; the parts combine to the same metrics.
    model_dir = tiny_gpt2_dir if task == "e2e" else tiny_bert_dir
    data, tok = load_task(task), load_tokenizer(model_dir)
    model = load_model(model_dir, data.kind, data.labels)
    items = encode(data.dev[:20], data.kind, tok, data.labels, 128)
    whole = evaluate(model, data.kind, items, data.labels, 8, pad_token_id(tok))
    parts = [eval_parts(model, data.kind, items[k::3], 8, pad_token_id(tok)) for k in range(3)]
    sharded = metrics_from_parts(data.kind, data.labels, parts)
    assert sharded.keys() == whole.keys() and len(whole) > 1
    assert sharded == pytest.approx(whole, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("task", ["wnut17", "e2e"])
def test_micro_batches_give_the_gradient_of_the_global_batch(tmp_path, tiny_bert_dir, tiny_gpt2_dir, task):
    """One step over [0..7] as one batch, as micro-batches of 3 + 5 (other target counts), and HF's loss
    (for the LM: over the full logits, while the loop computes the labelled positions' logits only)."""
    model_dir = tiny_gpt2_dir if task == "e2e" else tiny_bert_dir
    config = _config(tmp_path, model_dir, task, max_grad_norm=0.0, dropout=0.0, max_length=128)
    ctx = distributed.Context()
    deltas = []
    for group in ([list(range(8))], [[0, 1, 2], [3, 4, 5, 6, 7]]):
        run = setup(config, ctx)
        run.model.eval()  # the tiny GPT-2's own dropout off: micro-batches would draw other masks
        params = [p for g in run.optimizer.param_groups for p in g["params"]]
        run.optimizer = torch.optim.SGD(params, lr=1.0)  # the step is then exactly -gradient
        run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: 1.0)
        before = [p.detach().clone() for p in params]
        head_inputs = []
        if task == "e2e":
            run.model.get_output_embeddings().register_forward_hook(
                lambda m, a, o, seen=head_inputs: seen.append(a[0].shape))
        _optimizer_step(run, step_module(run.model, run.kind), group)
        if task == "e2e":  # the output layer ran on the labelled positions' hidden states only
            assert [s[0] for s in head_inputs] == [count_targets("causal_lm", collate(
                [run.train_items[i] for i in b], run.pad_id)["labels"]) for b in group]
        deltas.append(torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)]))
    run = setup(config, ctx)  # reference: transformers' own mean loss on the whole batch
    run.model.eval()
    batch = collate(run.train_items[:8], run.pad_id)
    run.model(**model_inputs(batch, run.kind), labels=batch["labels"]).loss.backward()
    ref = torch.cat([p.grad.flatten() for g in run.optimizer.param_groups for p in g["params"]])
    assert ref.abs().max() > 1e-3
    torch.testing.assert_close(deltas[0], ref, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(deltas[1], ref, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_train_runs_q_k_v_and_gate_up_as_one_function_from_its_second_step(tmp_path, tiny_llama_dir, checkpointing):
    """lorakit.train_plan around the loop (not with activation checkpointing, which must recompute what it saved)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    mlp, seen = model.model.layers[0].mlp, []

    def hook(m, args, out):  # on every module: gate_proj is replaced by its LoRA layer once training sets up
        if m is mlp.gate_proj:
            seen.append(torch.is_grad_enabled() and type(out.grad_fn).__name__)

    config = _config(tmp_path, tiny_llama_dir, "e2e", targets="all-linear", max_steps=3, eval_every=0,
                     max_length=128, gradient_checkpointing=checkpointing)
    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        train(config, model=model)
    finally:
        handle.remove()
    steps = [name for name in seen if name][:3]  # the training forwards (evaluation runs without gradients)
    fused = "_SharedInputLoraBackward"
    assert steps == (["_LeanLoraLinearBackward"] * 3 if checkpointing else ["_LeanLoraLinearBackward", fused, fused])
    assert not any("_train_plan" in m.__dict__ for m in model.modules())


def _sgd_step_delta(config) -> torch.Tensor:
    """The change of every trainable value after one SGD step at lr 1 on examples 0..7: minus the gradient."""
    run = setup(config, distributed.Context())
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    run.optimizer = torch.optim.SGD(params, lr=1.0)
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda step: 1.0)
    before = [p.detach().clone() for p in params]
    _optimizer_step(run, run.model, [list(range(8))])
    return torch.cat([(b - p.detach()).flatten() for b, p in zip(before, params, strict=True)])


def test_gradient_checkpointing_and_bf16_give_the_plain_gradient(tmp_path, tiny_bert_dir):
    # The model's own dropout is on (train mode): checkpointing must replay the same masks.
    base = dict(max_grad_norm=0.0, targets="all-linear", dropout=0.1)
    plain = _sgd_step_delta(_config(tmp_path / "a", tiny_bert_dir, **base))
    assert plain.abs().max() > 1e-3
    checkpointed = _sgd_step_delta(_config(tmp_path / "b", tiny_bert_dir, gradient_checkpointing=True, **base))
    torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
    bf16 = _sgd_step_delta(_config(tmp_path / "c", tiny_bert_dir, precision="bf16", **base))
    assert bf16.dtype == torch.float32
    assert (bf16 - plain).norm() / plain.norm() < 3e-2  # bf16 keeps ~3 significant digits
    with pytest.raises(LoraConfigError, match="Linear does not support activation checkpointing"):
        _enable_checkpointing(torch.nn.Linear(2, 2))


def test_bf16_with_checkpointing_trains(tmp_path, tiny_bert_dir):
    train(_config(tmp_path, tiny_bert_dir, precision="bf16", gradient_checkpointing=True))
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert losses[-1] < FIT["sst2"] * losses[0], losses


def test_schedule_warmup_then_decay(tmp_path, tiny_bert_dir):
    warm = [(s + 1) / 2 for s in range(2)]
    assert [lr_factor(s, 2, 8, "linear") for s in range(8)] == pytest.approx(warm + [1 - k / 6 for k in range(6)])
    assert [lr_factor(s, 2, 8, "cosine") for s in range(8)] == pytest.approx(
        warm + [(1 + math.cos(math.pi * k / 6)) / 2 for k in range(6)])
    assert [lr_factor(s, 0, 4, "constant") for s in range(4)] == [1.0] * 4
    train(_config(tmp_path, tiny_bert_dir, "sst2", max_steps=8, warmup_ratio=0.25, lr=1e-3, schedule="cosine"))
    logged = [r["lr"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "train"]
    assert logged == pytest.approx([1e-3 * lr_factor(s, 2, 8, "cosine") for s in range(8)])


def test_best_on_dev_is_saved_and_reloads_with_the_same_metrics(tmp_path, tiny_bert_dir):
    config = _config(tmp_path, tiny_bert_dir, "sst2", train_limit=32, dev_limit=32, max_steps=12, eval_every=3,
                     lr=5e-3, grad_accum=2)
    result = train(config)
    dev = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["split"] == "dev"]
    assert [r["step"] for r in dev] == [3, 6, 9, 12]
    best = max(dev, key=lambda r: (r["accuracy"], -r["step"]))  # the first of the best
    assert result.best_step == best["step"] and result.dev["accuracy"] == best["accuracy"]
    again = evaluate_adapter(result.adapter_dir, dev_limit=32)
    assert again == pytest.approx({k: best[k] for k in again}, abs=1e-6)


def _write(path, files):
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    return str(path)


TSV = "sentence\tlabel\ngood\t1\nbad\t0\n"
BAD_INPUT = {  # case: (config overrides, files for --data or None, error, message substrings)
    "missing data dir": ({"data": "NOWHERE"}, None, DataError, ["does not exist"]),
    "wrong columns": ({"task": "classification"}, {"train.tsv": "text_a\tlbl\nx\t1\n", "dev.tsv": TSV},
                      DataError, ["no 'label' column"]),
    "empty split": ({"task": "classification"}, {"train.tsv": TSV, "dev.tsv": "sentence\tlabel\n"}, DataError,
                    ["dev.tsv", "no examples"]),
    "unseen dev label": ({"task": "classification"}, {"train.tsv": TSV, "dev.tsv": "sentence\tlabel\nok\t2\n"},
                         DataError, ["'2' never occurs in the training file"]),
    "task/model mismatch": ({"task": "e2e"}, None, LoraConfigError, ["causal_lm needs a decoder", "'bert'"]),
    "no model": ({"model": "NOWHERE"}, None, LoraConfigError, ["no config.json"]),
    "targets match nothing": ({"targets": ["qkv"]}, None, LoraConfigError, ["match no module", "query"]),
    "resume without checkpoint": ({"resume": True}, None, LoraConfigError, ["no checkpoint"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_bad_input_fails_before_training(tmp_path, tiny_bert_dir, case):
    overrides, files, error, needles = BAD_INPUT[case]
    overrides = {k: str(tmp_path / v) if v == "NOWHERE" else v for k, v in overrides.items()}
    if files is not None:
        overrides["data"] = _write(tmp_path / "data", files)
    with pytest.raises(error) as err:
        train(_config(tmp_path, tiny_bert_dir, **{"task": "sst2", **overrides}))
    for needle in needles:
        assert needle in str(err.value)
    assert not (tmp_path / "run").exists()  # nothing was written: it failed before training


def test_config_errors_are_collected():
    with pytest.raises(LoraError) as err:
        TrainConfig(r=0, lr=-1.0, method="lorax", schedule="step", dropout=1.0, precision="fp16")
    for needle in ["r=0", "lr=-1.0", "method='lorax'", "schedule='step'", "dropout=1.0",
                   "precision='fp16': expected one of fp32, bf16"]:
        assert needle in str(err.value)


@pytest.mark.parametrize("cores, load, processes, expected", [
    (2, 0.1, 1, 2), (2, 1.2, 1, 1), (2, 5.0, 1, 1), (8, 0.0, 2, 4), (8, 3.4, 2, 2), (1, 0.0, 4, 1)])
def test_auto_threads_leaves_busy_cores_alone(monkeypatch, cores, load, processes, expected):
    monkeypatch.setattr("os.cpu_count", lambda: cores)
    monkeypatch.setattr("os.getloadavg", lambda: (load, load, load))
    assert auto_threads(processes) == expected


def test_a_given_model_must_fit_the_task(tmp_path, tiny_bert_dir):
    model = load_model(tiny_bert_dir, "classification", ["a", "b", "c"])
    with pytest.raises(LoraConfigError, match=r"has 3 labels but the task has 2 \(\['0', '1'\]\)"):
        train(_config(tmp_path, tiny_bert_dir), model=model)
    with pytest.raises(LoraConfigError, match="needs tokenizer="):
        train(_config(tmp_path, None), model=model)
    assert not (tmp_path / "run").exists()
