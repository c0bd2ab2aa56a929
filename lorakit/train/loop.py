"""The training loop behind `lorakit train`: setup → loop → eval → checkpoint, top to bottom, no callbacks.

Every method (lora, full, top-k, bitfit, head) runs through the same `train`, so their numbers compare.
The loss of an optimizer step is the mean over every target in its global batch (examples, labelled
words or completion tokens, over all micro-batches and processes):

    L = Σ_micro-batches Σ_ranks loss_sum / N_targets(step)      (N all-reduced before the first backward)

so gradient accumulation and DDP give the gradient of the same global batch as one big batch would.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import save as save_tensors
from torch import nn

from lorakit.errors import LoraConfigError
from lorakit.injection import count_parameters
from lorakit.io import save_adapter, write_atomic
from lorakit.train import allocator, checkpoint, distributed, report
from lorakit.train.config import TrainConfig, recipe_line
from lorakit.train.data import collate, encode, load_task, make_batches, pad_token_id
from lorakit.train.methods import load_trainable_state, param_groups, prepare, trainable_state
from lorakit.train.tasks import (
    PRIMARY_METRIC,
    check_model_dir,
    count_targets,
    eval_parts,
    load_model,
    load_tokenizer,
    metrics_from_parts,
    resolve_model_path,
    step_module,
    summed_loss,
)
from lorakit.train_plan import train_plan

TRAINABLE_FILE = "trainable.safetensors"  # the "adapter" of methods other than lora: the trained tensors
RUN_INFO = "task.json"  # beside config.json: what eval/predict need to rebuild the model (kind, labels, base)


@dataclass
class TrainResult:
    """What `train` returns: the trained model (best-on-dev state), where its files are, and its numbers."""

    model: nn.Module
    tokenizer: object
    run_dir: Path
    adapter_dir: Path
    best_step: int
    dev: dict[str, float]
    summary: dict = field(default_factory=dict)


@dataclass
class Run:
    """Everything `setup` prepares and checks before the first step."""

    config: TrainConfig
    ctx: distributed.Context
    kind: str
    labels: list[str]
    info: dict
    tokenizer: object
    model: nn.Module
    train_items: list[dict]
    dev_items: list[dict]
    pad_id: int
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    steps_per_epoch: int
    total_steps: int
    resume_from: dict | None = None


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak lr at scheduler step `step` (0-based): linear warmup to 1, then decay.

    warmup: (step + 1) / warmup.  After: p = (step - warmup) / (total - warmup) and
    linear 1 - p, cosine (1 + cos πp) / 2, constant 1. No step runs at lr 0.
    """
    if step < warmup:
        return (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    return 1.0 - p if schedule == "linear" else 1.0


def auto_threads(local_processes: int = 1) -> int:
    """CPU threads per process: the cores not busy with other work, shared among this machine's processes.

    free = os.cpu_count() - 1-minute load average (rounded, at least 1). More threads than free cores
    makes OpenMP spin-wait on preempted threads: on a 2-core machine with one core busy, 2 threads trained
    MiniLM 6-10x slower than 1 (15 and 9 vs 89 examples/s, measured), while on idle cores 2 threads beat 1.
    """
    cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this platform
        busy = 0.0
    return max(1, max(1, min(cores, round(cores - busy))) // max(1, local_processes))


def _check_out_dir(config: TrainConfig) -> dict | None:
    """Refuse to mix runs: resume needs a checkpoint; a fresh run must not silently bury one."""
    found = checkpoint.latest(config.out)
    if config.resume and found is None:
        raise LoraConfigError(f"--resume: no checkpoint in {Path(config.out) / 'checkpoints'}; run without "
                              "--resume (and with --checkpoint_every N) to start one")
    if not config.resume and found is not None:
        raise LoraConfigError(f"{config.out} holds a checkpoint ({found.name}) of an earlier run; pass --resume "
                              "to continue it, or choose another --out (or delete that directory)")
    return checkpoint.load(found, config) if found is not None else None


def setup(config: TrainConfig, ctx: distributed.Context, model: nn.Module | None = None,
          tokenizer=None) -> Run:
    """Load and check data, model, method, optimizer and schedule; every input error is raised here."""
    config.validate()
    resume_from = _check_out_dir(config)
    data = load_task(config.task, config.data)
    model_path = resolve_model_path(config.model) if config.model or model is None else None
    if model is None:
        check_model_dir(model_path, data.kind)
    else:
        _check_given_model(model, data.kind, data.labels, model_path or tokenizer)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
    train_ex, dev_ex = data.train[:config.train_limit or None], data.dev[:config.dev_limit or None]
    train_items = encode(train_ex, data.kind, tokenizer, data.labels, config.max_length)
    dev_items = encode(dev_ex, data.kind, tokenizer, data.labels, config.max_length)
    pad_id = pad_token_id(tokenizer)
    random.seed(config.seed)
    torch.manual_seed(config.seed)  # the head's and LoRA's init; identical on every rank
    model = model if model is not None else load_model(model_path, data.kind, data.labels)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad_id  # GPT-2 classification finds each row's last token by it
    base = model_path or getattr(model.config, "name_or_path", None) or None
    prepare(model, config, data.kind, base)
    if config.gradient_checkpointing:
        _enable_checkpointing(model)
    model.to(ctx.device).train()
    distributed.seed_rank_stream(config.seed, ctx)  # init done (identical on every rank); dropout differs per rank
    optimizer = torch.optim.AdamW(param_groups(model, config), lr=config.lr, weight_decay=config.weight_decay)
    n_batches = len(_batches(config, ctx, train_items, epoch=0))
    steps_per_epoch = math.ceil(n_batches / config.grad_accum)
    if steps_per_epoch == 0:
        raise LoraConfigError(f"{len(train_items)} training examples make no batch on {ctx.world} processes; "
                              "use more examples or fewer processes")
    total = config.max_steps or config.epochs * steps_per_epoch
    warmup = round(config.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, warmup=warmup, total=total, schedule=config.schedule))
    info = {"task": config.task, "data": config.data and str(Path(config.data).resolve()), "kind": data.kind,
            "labels": data.labels, "model": config.model if config.model or model is None else base,  # None: MiniLM
            "pairs": bool(train_ex and getattr(train_ex[0], "text_pair", None) is not None),
            "method": config.method, "max_length": config.max_length}
    return Run(config, ctx, data.kind, data.labels, info, tokenizer, model, train_items, dev_items, pad_id,
               optimizer, scheduler, steps_per_epoch, total, resume_from)


def _enable_checkpointing(model: nn.Module) -> None:
    """transformers' activation checkpointing (non-reentrant; inputs made to require grad, so a frozen
    embedding still passes gradients to the LoRA layers above it)."""
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is None or not getattr(model, "supports_gradient_checkpointing", False):
        raise LoraConfigError(f"gradient_checkpointing=True: {type(model).__name__} does not support activation "
                              "checkpointing; set gradient_checkpointing to False")
    enable()


def _check_given_model(model: nn.Module, kind: str, labels: list[str], tokenizer_source) -> None:
    if tokenizer_source is None:
        raise LoraConfigError("train(config, model=...) needs tokenizer=... too, or config.model naming the "
                              "directory to load the tokenizer from")
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if kind != "causal_lm" and num_labels != len(labels):
        raise LoraConfigError(f"the given {type(model).__name__} has {num_labels} labels but the task has "
                              f"{len(labels)} ({labels[:8]}); build it with num_labels={len(labels)}")


def _batches(config: TrainConfig, ctx: distributed.Context, items: list[dict], epoch: int) -> list[list[int]]:
    batches = make_batches(len(items), [len(it["input_ids"]) for it in items], config.batch_size,
                           config.seed, epoch)
    # With several processes, a final batch smaller than the world cannot give every rank an example.
    return [b for b in batches if len(b) >= ctx.world]


def _epoch_groups(run: Run, epoch: int) -> list[list[list[int]]]:
    """The epoch's optimizer steps, each a list of grad_accum micro-batches (global index lists)."""
    batches = _batches(run.config, run.ctx, run.train_items, epoch)
    ga = run.config.grad_accum
    return [batches[i:i + ga] for i in range(0, len(batches), ga)]


def train(config: TrainConfig, model: nn.Module | None = None, tokenizer=None) -> TrainResult:
    """Train `config.method` on `config.task`; write the adapter, metrics.jsonl, config.json and curves.png
    to `config.out`; return the best-on-dev model and its numbers. `model`/`tokenizer` override loading
    `config.model` (the model must have the task's head). Runs under torchrun as DDP (see distributed.py).
    """
    ctx = distributed.init(config.device)
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads or auto_threads(ctx.local_world))
    allocator.keep_freed_memory()  # every step reuses the last step's pages (see allocator.py)
    try:
        run = setup(config, ctx, model, tokenizer)  # every check happens here, before the first step
        if ctx.is_main:
            print(recipe_line(run.config), flush=True)
        prog, best_state = _start(run)
        net = distributed.wrap(step_module(run.model, run.kind), ctx)  # DDP's forward runs the LM's loss
        metrics_path = Path(config.out) / "metrics.jsonl"
        bar = report.progress_bar(run.total_steps, prog.step, ctx.is_main and config.progress)
        step_times: list[float] = []
        # q/k/v and gate/up as one autograd function per block from the second step on (lorakit/train_plan.py;
        # it covers nothing with activation checkpointing on, whose recomputation must save what the forward saved)
        with train_plan(run.model):
            while prog.step < run.total_steps:
                groups = _epoch_groups(run, prog.epoch)
                for group in groups[prog.position:]:
                    t0 = time.perf_counter()
                    lr = run.scheduler.get_last_lr()[0]  # the lr this step uses (first group's)
                    loss, n_examples = _optimizer_step(run, net, group)
                    step_times.append(time.perf_counter() - t0)
                    prog.step, prog.position = prog.step + 1, prog.position + 1
                    row = {"split": "train", "step": prog.step, "epoch": prog.epoch, "loss": loss, "lr": lr,
                           "examples_per_s": n_examples / step_times[-1]}
                    if ctx.is_main:
                        report.append_metrics(metrics_path, row)
                    bar.set_postfix({"loss": f"{loss:.4f}", "lr": f"{lr:.2e}", "ex/s": f"{row['examples_per_s']:.1f}"},
                                    refresh=False)
                    bar.update(1)
                    end_of_epoch, done = prog.position == len(groups), prog.step == run.total_steps
                    if done or (prog.step % config.eval_every == 0 if config.eval_every else end_of_epoch):
                        best_state = _evaluate(run, prog, best_state, metrics_path)
                    if end_of_epoch:
                        prog.epoch, prog.position = prog.epoch + 1, 0
                    if done:
                        break
                    if config.checkpoint_every and prog.step % config.checkpoint_every == 0:
                        _checkpoint(run, prog, best_state)
        bar.close()
        return _finish(run, prog, best_state, step_times)
    finally:
        torch.set_num_threads(threads)
        distributed.close(ctx)


def _start(run: Run) -> tuple[checkpoint.Progress, dict | None]:
    """Fresh start, or the checkpoint's tensors, optimizer, schedule, RNG and position; writes config.json."""
    out, ctx = Path(run.config.out), run.ctx
    metrics_path = out / "metrics.jsonl"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        run.config.save(out / "config.json")
        (out / RUN_INFO).write_text(json.dumps(run.info, indent=2) + "\n", encoding="utf-8")
    ck = run.resume_from
    if ck is None:
        if ctx.is_main:
            metrics_path.unlink(missing_ok=True)
        return checkpoint.Progress(), None
    load_trainable_state(run.model, ck["trainable"])
    run.optimizer.load_state_dict(ck["optimizer"])
    run.scheduler.load_state_dict(ck["scheduler"])
    checkpoint.set_rng_state(ck["rng"][min(ctx.rank, len(ck["rng"]) - 1)])  # another world size: not bit-exact
    if ctx.is_main:
        report.truncate_metrics(metrics_path, ck["progress"].step)
    return ck["progress"], ck["best"]


def _optimizer_step(run: Run, net: nn.Module, group: list[list[int]]) -> tuple[float, int]:
    """Forward/backward over the step's micro-batches, clip, AdamW step, lr step; (mean loss, examples).
    `net` is `step_module(run.model, run.kind)`, DDP-wrapped when distributed."""
    ctx, kind = run.ctx, run.kind
    batches = [collate([run.train_items[i] for i in distributed.shard(b, ctx)], run.pad_id) for b in group]
    batches = [{k: v.to(ctx.device) for k, v in b.items()} for b in batches]
    (n_targets,) = distributed.all_sum([sum(count_targets(kind, b["labels"]) for b in batches)], ctx)
    total = 0.0
    for i, batch in enumerate(batches):
        last = i == len(batches) - 1
        with nullcontext() if last or not ctx.distributed else net.no_sync():  # all-reduce once per step
            with torch.autocast(ctx.device.type, torch.bfloat16, enabled=run.config.precision == "bf16"):
                loss = summed_loss(net, kind, batch) / max(n_targets, 1)  # fp32; causal LM: fused, labelled only
            (loss * ctx.world).backward()  # DDP averages over ranks; × world makes it the global sum
        total += float(loss.detach())
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    if run.config.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm)
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    (total,) = distributed.all_sum([total], ctx)
    return total, sum(len(b) for b in group)


def _evaluate(run: Run, prog: checkpoint.Progress, best_state: dict | None, metrics_path: Path) -> dict | None:
    """Dev metrics now; keep a copy of the trainable tensors if they are the best so far.

    Each rank evaluates every world-th dev example; the parts are gathered in rank order, so every rank
    computes the same metrics and agrees on the best; rank 0 alone writes the row.
    """
    cfg, ctx = run.config, run.ctx
    shard = run.dev_items[ctx.rank::ctx.world]
    parts = distributed.gather(eval_parts(run.model, run.kind, shard, cfg.eval_batch_size, run.pad_id, ctx.device),
                               ctx)
    metrics = metrics_from_parts(run.kind, run.labels, parts)
    if ctx.is_main:
        report.append_metrics(metrics_path, {"split": "dev", "step": prog.step, "epoch": prog.epoch, **metrics})
    name, higher = PRIMARY_METRIC[run.kind]
    old = prog.best_metrics.get(name)
    if old is None or (metrics[name] > old if higher else metrics[name] < old):
        prog.best_step, prog.best_metrics = prog.step, metrics
        return trainable_state(run.model)
    return best_state


def _checkpoint(run: Run, prog: checkpoint.Progress, best_state: dict | None) -> None:
    rngs = distributed.gather(checkpoint.rng_state(), run.ctx)  # every rank's dropout stream
    if run.ctx.is_main:
        checkpoint.save(run.config.out, trainable_state(run.model), best_state, run.optimizer, run.scheduler,
                        prog, rngs, run.config)


def save_trained(model: nn.Module, method: str, path: Path) -> Path:
    """The run's adapter: PEFT's layout for lora, else the trained tensors in trainable.safetensors."""
    if path.exists() and any(f.name not in ("adapter_config.json", "adapter_model.safetensors", TRAINABLE_FILE,
                                            "README.md") for f in path.iterdir()):
        raise LoraConfigError(f"{path} holds files that are not an adapter; move them or choose another --out")
    if path.exists() and (method == "lora") != (path / "adapter_config.json").exists():
        shutil.rmtree(path)  # an adapter of another method from an earlier run in this directory
    if method == "lora":
        return save_adapter(model, path)
    return write_atomic(path, {TRAINABLE_FILE: save_tensors({k: v.contiguous() for k, v in
                                                             trainable_state(model).items()})})


def _finish(run: Run, prog: checkpoint.Progress, best_state: dict | None, step_times: list[float]) -> TrainResult:
    """Load the best-on-dev tensors, save the adapter, the summary and the curves; print the table."""
    cfg, out = run.config, Path(run.config.out)
    if best_state is not None:
        load_trainable_state(run.model, best_state)
    counts = count_parameters(run.model)
    memory, memory_kind = report.peak_memory(run.ctx.device)
    name, _ = PRIMARY_METRIC[run.kind]
    summary = {"method": cfg.method, "trainable": counts["trainable"], "total": counts["total"],
               "step_time_s": sum(step_times) / max(len(step_times), 1), "memory_mib": memory,
               "memory_kind": memory_kind, "metric_name": name, "metric": prog.best_metrics.get(name, float("nan")),
               "best_step": prog.best_step, "steps": prog.step}
    adapter = out / "adapter"
    if run.ctx.is_main:
        save_trained(run.model, cfg.method, adapter)
        (out / "summary.json").write_text(json.dumps({**summary, "dev": prog.best_metrics}, indent=2) + "\n")
        report.plot_curves(report.read_metrics(out / "metrics.jsonl"), out / "curves.png", name)
        print(report.summary_table([summary]))
        print(f"best dev {name} {summary['metric']:.4f} at step {prog.best_step}; adapter saved to {adapter}")
    distributed.barrier(run.ctx)
    return TrainResult(run.model, run.tokenizer, out, adapter, prog.best_step, dict(prog.best_metrics), summary)


__all__ = ["Run", "TrainResult", "auto_threads", "lr_factor", "save_trained", "setup", "train"]
