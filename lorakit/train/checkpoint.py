"""Resumable checkpoints, written atomically: a crash at any instant leaves the previous one intact.

    <out>/checkpoints/step-00000040/   trainable.safetensors  the trained tensors (LoRA A/B, heads, ...)
                                       best.safetensors       the best-on-dev tensors so far (if any eval ran)
                                       optimizer.pt           AdamW state
                                       state.pt               scheduler, RNG states (one per process),
                                                              step, epoch, position in the epoch, best metric,
                                                              the run's config
    <out>/checkpoints/latest           "step-00000040"

A checkpoint is written into a temporary directory, fsynced, renamed into place, and only then does
`latest` (itself replaced by rename) point at it; older checkpoints are deleted last.
"""

from __future__ import annotations

import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from lorakit.errors import LoraConfigError
from lorakit.train.config import RESUMABLE_CHANGES, TrainConfig


@dataclass
class Progress:
    """Where a run stands: optimizer steps done, epoch, optimizer steps done within that epoch, best so far."""

    step: int = 0
    epoch: int = 0
    position: int = 0
    best_step: int = -1
    best_metrics: dict[str, float] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """This process's python and torch (CPU, CUDA) RNG states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(tmp: Path, trainable: dict, best: dict | None, optimizer, scheduler, progress: Progress,
                 rng: list, config: TrainConfig) -> None:
    save_file({k: v.contiguous() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
    if best is not None:
        save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / "best.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save({"scheduler": scheduler.state_dict(), "rng": rng, "progress": vars(progress).copy(),
                "config": config.to_dict()}, tmp / "state.pt")
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)


def save(out: str | Path, trainable: dict, best: dict | None, optimizer, scheduler, progress: Progress,
         rng: list[dict], config: TrainConfig) -> Path:
    """Write a checkpoint for `progress.step` atomically and point `latest` at it; returns its directory.

    `rng` holds one rng_state() per process (rank order), so every rank resumes its own dropout stream.
    """
    root = Path(out) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    name = f"step-{progress.step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    _write_files(tmp, trainable, best, optimizer, scheduler, progress, rng, config)
    final = root / name
    if final.exists():  # left by a run killed before `latest` moved on; `latest` never points here
        shutil.rmtree(final)
    os.rename(tmp, final)
    pointer = root / f".latest-{os.getpid()}"
    pointer.write_text(name + "\n", encoding="utf-8")
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    for old in root.iterdir():  # only now is it safe to drop older checkpoints and stale temporaries
        if old.name not in (name, "latest"):
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
    return final


def latest(out: str | Path) -> Path | None:
    """The directory `latest` points at, or None when the run has no checkpoint."""
    pointer = Path(out) / "checkpoints" / "latest"
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    return path if path.is_dir() else None


def check_config(saved: dict, config: TrainConfig, path: Path) -> None:
    """A resumed run must use the checkpoint's settings (except resume/progress/out/device/threads)."""
    current = config.to_dict()
    changed = [f"{k}: checkpoint {saved.get(k)!r}, now {current[k]!r}" for k in current
               if k not in RESUMABLE_CHANGES and saved.get(k) != current[k]]
    if changed:
        raise LoraConfigError(f"--resume: the settings differ from the checkpoint {path}: " + "; ".join(changed)
                              + ". Resume with the original settings, or start a new run in another --out")


def load(path: Path, config: TrainConfig) -> dict[str, Any]:
    """{trainable, best, optimizer, scheduler, rng, progress} of one checkpoint directory."""
    state = torch.load(path / "state.pt", weights_only=True)
    check_config(state["config"], config, path)
    best = path / "best.safetensors"
    return {"trainable": load_file(str(path / "trainable.safetensors")),
            "best": load_file(str(best)) if best.is_file() else None,
            "optimizer": torch.load(path / "optimizer.pt", weights_only=True),
            "scheduler": state["scheduler"], "rng": state["rng"], "progress": Progress(**state["progress"])}


__all__ = ["Progress", "latest", "load", "rng_state", "save", "set_rng_state"]
