"""torchrun with 2 processes (gloo, CPU) on a tiny model: the ranks end with identical adapters, equal to a
single-process run with the same global batch; DDP synchronises the trainable tensors only; with LoRA dropout
each rank draws its own masks."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from lorakit.train.methods import trainable_state
from lorakit.train.report import read_metrics

ROOT = Path(__file__).resolve().parents[2]
# Global batch 8 (4 per rank) x grad_accum 2; no dropout anywhere, so both runs see the same function.
SETTINGS = dict(task="sst2", targets=None, train_limit=64, dev_limit=16, batch_size=8, grad_accum=2, max_steps=8,
                lr=5e-3, dropout=0.0, eval_every=8, max_length=48, threads=1, progress=False, device="cpu")
# Same math, other summation order (two half-batch sums + an all-reduce vs one sum), through 8 AdamW steps;
# measured 1.2e-7.
TOLERANCE = 1e-5


def _torchrun(config: TrainConfig, tmp_path: Path) -> list[dict]:
    """Train `config` in 2 processes; each rank's trained tensors."""
    Path(config.out).mkdir()
    config.save(tmp_path / "config.json")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "train" / "ddp_worker.py"), str(tmp_path / "config.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [load_file(str(Path(config.out) / f"rank{r}.safetensors")) for r in (0, 1)]


def test_two_processes_match_one(tmp_path, tiny_bert_dir):
    ranks = _torchrun(TrainConfig(model=tiny_bert_dir, out=str(tmp_path / "ddp"), **SETTINGS), tmp_path)
    assert sorted(ranks[0]) == sorted(ranks[1]) and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    for r in (0, 1):
        facts = json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())
        assert facts["world"] == 2 and facts["frozen_grads"] == []
        assert sorted(facts["synced"]) == sorted(facts["trainable"]) == sorted(ranks[0])  # LoRA A/B + head only
    assert (tmp_path / "ddp" / "adapter" / "adapter_model.safetensors").is_file()  # written by rank 0

    single = trainable_state(train(TrainConfig(model=tiny_bert_dir, out=str(tmp_path / "one"), **SETTINGS)).model)
    # Dev metrics: each rank evaluated half the dev split; the gathered parts give the single process's numbers.
    dev = [[r for r in read_metrics(tmp_path / d / "metrics.jsonl") if r["split"] == "dev"] for d in ("ddp", "one")]
    assert len(dev[0]) == len(dev[1]) == 1
    assert dev[0][0]["accuracy"] == dev[1][0]["accuracy"]
    assert dev[0][0]["loss"] == pytest.approx(dev[1][0]["loss"], rel=1e-5)
    assert sorted(single) == sorted(ranks[0])
    worst = max(float((single[k] - ranks[0][k]).abs().max()) for k in single)
    print(f"max |single - ddp| = {worst:.3g}")
    assert worst <= TOLERANCE, worst
    lora_b = [k for k in single if ".lora_B." in k]
    assert len(lora_b) == 4 and min(float(single[k].abs().max()) for k in lora_b) > 1e-3  # B left 0: it trained


def test_causal_lm_two_processes_match_one(tmp_path, tiny_gpt2_dir):
    """The LM loss (labelled positions only, fused with the output layer) runs inside DDP's forward
    (LabelledLoss), so DDP still synchronises: the ranks end identical and equal to one process over the same
    global batches."""
    model_dir = tmp_path / "gpt2"  # the tiny GPT-2 without its own dropout, so both runs see the same function
    shutil.copytree(tiny_gpt2_dir, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                                                       "attn_pdrop": 0.0}))
    settings = {**SETTINGS, "task": "e2e", "max_length": 96}
    ranks = _torchrun(TrainConfig(model=str(model_dir), out=str(tmp_path / "ddp"), **settings), tmp_path)
    assert sorted(ranks[0]) == sorted(ranks[1]) and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    single = trainable_state(train(TrainConfig(model=str(model_dir), out=str(tmp_path / "one"), **settings)).model)
    assert sorted(single) == sorted(ranks[0])
    worst = max(float((single[k] - ranks[0][k]).abs().max()) for k in single)
    assert worst <= TOLERANCE, worst
    assert min(float(v.abs().max()) for k, v in single.items() if ".lora_B." in k) > 1e-3  # it trained


def test_ranks_draw_their_own_dropout_masks_and_stay_in_sync(tmp_path, tiny_bert_dir):
    """Same seed on every rank (so the init is identical), then a per-rank stream: rank 1's rows must not get
    rank 0's dropout masks, and DDP still keeps the adapters bit-identical."""
    settings = {**SETTINGS, "dropout": 0.1, "max_steps": 3, "grad_accum": 1}
    ranks = _torchrun(TrainConfig(model=tiny_bert_dir, out=str(tmp_path / "ddp"), **settings), tmp_path)
    assert sorted(ranks[0]) == sorted(ranks[1]) and all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    assert any(float(v.abs().max()) > 0 for k, v in ranks[0].items() if ".lora_B." in k)  # it trained
    seeds = [json.loads((tmp_path / "ddp" / f"rank{r}.json").read_text())["mask_seeds"] for r in (0, 1)]
    # 3 steps x 4 LoRA layers (q, v of 2 blocks), each mask drawn in forward and replayed in backward
    assert len(seeds[0]) == len(seeds[1]) == 3 * 4 * 2
    assert not set(seeds[0]) & set(seeds[1]), "rank 1 replayed rank 0's dropout masks"
