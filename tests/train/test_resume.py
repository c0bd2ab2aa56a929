"""Checkpoints: a training process killed with SIGKILL and resumed ends with the adapter of an uninterrupted
run; a crash while writing leaves the previous checkpoint usable; resuming refuses changed settings."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit.errors import LoraConfigError
from lorakit.train import checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train
from lorakit.train.report import read_metrics

ROOT = Path(__file__).resolve().parents[2]
# 96 examples / batch 8 = 12 steps an epoch: 60 steps cross four epoch boundaries; dropout on, so the RNG
# state must come back too; evaluations pick a best step, so the best-so-far tensors must come back too.
SETTINGS = dict(task="sst2", train_limit=96, dev_limit=16, batch_size=8, max_steps=60, lr=5e-3, dropout=0.1,
                eval_every=6, checkpoint_every=3, max_length=48, threads=1, progress=False)


def _flags(settings: dict) -> list[str]:
    out = []
    for k, v in settings.items():
        out += [f"--{'no-' if v is False else ''}{k}"] if isinstance(v, bool) else [f"--{k}", str(v)]
    return out


def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, tiny_bert_dir):
    reference = train(TrainConfig(model=tiny_bert_dir, out=str(tmp_path / "ref"), **SETTINGS))
    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lorakit", "train", "--model", tiny_bert_dir, "--out", str(killed), *_flags(SETTINGS)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while checkpoint.latest(killed) is None and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # as soon as the first checkpoint exists: mid-epoch, mid-run
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    step = int(checkpoint.latest(killed).name.split("-")[1])
    assert 3 <= step < 60 and not (killed / "adapter").exists()

    resumed = train(TrainConfig(model=tiny_bert_dir, out=str(killed), resume=True, **SETTINGS))
    ref_tensors = load_file(str(reference.adapter_dir / "adapter_model.safetensors"))
    got_tensors = load_file(str(resumed.adapter_dir / "adapter_model.safetensors"))
    assert sorted(got_tensors) == sorted(ref_tensors)
    worst = max(float((got_tensors[k] - ref_tensors[k]).abs().max()) for k in ref_tensors)
    assert worst <= 1e-6, worst
    assert resumed.best_step == reference.best_step and resumed.dev == pytest.approx(reference.dev, abs=1e-6)
    # metrics.jsonl reads as one run: rows after the checkpoint were dropped and written again
    ref_rows, got_rows = read_metrics(tmp_path / "ref" / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [(r["split"], r["step"]) for r in got_rows] == [(r["split"], r["step"]) for r in ref_rows]
    assert [r["loss"] for r in got_rows] == pytest.approx([r["loss"] for r in ref_rows], abs=1e-6)


class _Opt:
    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


def _save(out, step, config, value):
    progress = checkpoint.Progress(step=step, epoch=1, position=2, best_step=step, best_metrics={"accuracy": 0.5})
    return checkpoint.save(out, {"w": torch.full((2, 3), value)}, {"w": torch.zeros(2, 3)}, _Opt({"s": step}),
                           _Opt({"last_epoch": step}), progress, [checkpoint.rng_state()], config)


def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    config = TrainConfig(out=str(tmp_path))
    _save(tmp_path, 3, config, 1.0)

    def crash(tmp, *args):  # dies after writing part of the files, as a kill would
        (tmp / "trainable.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint, "_write_files", crash)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 6, config, 2.0)
    monkeypatch.undo()
    (tmp_path / "checkpoints" / "step-00000009").mkdir()  # renamed into place, killed before `latest` moved
    found = checkpoint.latest(tmp_path)
    assert found.name == "step-00000003"
    state = checkpoint.load(found, config)
    assert torch.equal(state["trainable"]["w"], torch.full((2, 3), 1.0)) and state["optimizer"] == {"s": 3}
    assert (state["progress"].step, state["progress"].epoch, state["progress"].position) == (3, 1, 2)
    _save(tmp_path, 9, config, 3.0)  # the next save replaces the stale directory and cleans up the rest
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest", "step-00000009"]
    assert torch.equal(checkpoint.load(checkpoint.latest(tmp_path), config)["trainable"]["w"], torch.full((2, 3), 3.0))


def test_resume_refuses_changed_settings_and_fresh_runs_refuse_old_checkpoints(tmp_path, tiny_bert_dir):
    config = TrainConfig(model=tiny_bert_dir, out=str(tmp_path), lr=1e-3)
    _save(tmp_path, 3, config, 1.0)
    changed = TrainConfig(model=tiny_bert_dir, out=str(tmp_path), lr=2e-3, r=4, resume=True, progress=False)
    with pytest.raises(LoraConfigError, match=r"differ.*r: checkpoint 8, now 4; lr: checkpoint 0.001, now 0.002"):
        checkpoint.load(checkpoint.latest(tmp_path), changed)
    with pytest.raises(LoraConfigError, match="holds a checkpoint .*step-00000003.* pass --resume"):
        train(TrainConfig(model=tiny_bert_dir, out=str(tmp_path), progress=False))
