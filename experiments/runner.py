"""Run one experiment: its training runs (each a TrainConfig through lorakit.train.loop.train), resumably,
then its tables (markdown) and figures (PNG) in the output directory.

    OUT/results.jsonl     one line per finished run: name, group, seed, config, summary, wall time (append-only)
    OUT/runs/NAME/        each run's own directory (adapter/, metrics.jsonl, summary.json, curves.png)
    OUT/*.md, OUT/*.png   what the experiment's `report` writes

A run already in results.jsonl is skipped, so an interrupted experiment resumes where it stopped (the run
that was cut off starts again from scratch); a run whose configuration a sibling experiment (OUT/../*) has
already trained is not trained again but recorded with `reused` = that run's directory. Each run trains in a
fresh Python process by default, so its peak memory is its own; `in_process=True` (quick mode) saves the
start-up time and reports the runner's peak.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from statistics import mean, stdev

import torch

from lorakit.errors import LoraConfigError
from lorakit.train.config import RESUMABLE_CHANGES, TrainConfig

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "results.jsonl"
# Quick mode: a tiny slice and a few steps per run, one seed; a smoke test, not a measurement.
QUICK = {"train_limit": 32, "dev_limit": 32, "max_steps": 2, "batch_size": 16, "eval_batch_size": 32,
         "max_length": 64, "warmup_ratio": 0.0}


@dataclass
class Spec:
    """One training run of an experiment: a unique name, the row it belongs to in the tables, its config."""

    name: str
    group: str
    config: dict
    seed: int = 0
    meta: dict = field(default_factory=dict)


@dataclass
class Experiment:
    """An experiment: `specs(quick, seeds, out)` lists its runs; `report(results, out, quick)` writes its outputs.

    One whose runs another script owns (the E2E table's rows) gives `run(out, quick, model, seeds, log)` instead,
    which trains what is missing and returns the paths it wrote.
    """

    name: str
    description: str
    specs: Callable[[bool, int | None, Path], list[Spec]] | None = None
    report: Callable[[list[dict], Path, bool], list[Path]] | None = None
    run: Callable[[Path, bool, str | None, int | None, Callable], list[Path]] | None = None


def read_results(out: Path) -> list[dict]:
    path = out / RESULTS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _train_in_subprocess(config_path: Path) -> None:
    code = ("import sys; from lorakit.train.config import TrainConfig; from lorakit.train.loop import train; "
            "train(TrainConfig.load(sys.argv[1]))")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path}
    proc = subprocess.run([sys.executable, "-c", code, str(config_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"run {config_path.parent.name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")


def _train_in_process(config: TrainConfig) -> None:
    from lorakit.train.loop import train

    train(config)


def build_config(spec: Spec, out: Path, quick: bool, model: str | None) -> TrainConfig:
    values = {**spec.config, "seed": spec.seed, "out": str(out / "runs" / spec.name), "progress": False}
    if quick:
        values |= QUICK
    if model is not None:
        values["model"] = model
    return TrainConfig(**values)


def _settings(config: dict) -> dict:
    """What decides a run's numbers: its config without where it is written and how it is executed."""
    return {k: v for k, v in config.items() if k not in RESUMABLE_CHANGES}


def finished_elsewhere(config: TrainConfig, out: Path) -> dict | None:
    """A finished run with the same settings in a sibling experiment (OUT/../*/results.jsonl) whose run directory
    is still there, or None. Experiments share configurations (rank's r=8 is glue-mini's lora-qv seed 0 and
    subspace's r=8), and a run is deterministic in its config, so it is trained once."""
    wanted = _settings(json.loads(json.dumps(config.to_dict())))  # JSON types, as results.jsonl holds them
    for path in sorted(out.parent.glob(f"*/{RESULTS}")):
        if path.parent.resolve() == out.resolve():
            continue
        for row in read_results(path.parent):
            if _settings(row["config"]) == wanted and (Path(row["config"]["out"]) / "summary.json").is_file():
                return row
    return None


def run_experiment(exp: Experiment, out: str | Path, quick: bool = False, model: str | None = None,
                   seeds: int | None = None, in_process: bool | None = None, log=print,
                   report_only: bool = False) -> list[Path]:
    """Train every run of `exp` not yet in OUT/results.jsonl, then write the tables and figures; their paths.
    report_only: train nothing; write them from the runs already finished (an interim report, marked as such)."""
    out = Path(out)
    if exp.run is not None:
        if report_only:
            raise LoraConfigError(f"experiment {exp.name}: --report is not available (its script writes its tables "
                                  "as each row finishes)")
        return exp.run(out, quick, model, seeds, log)
    in_process = quick if in_process is None else in_process
    specs = exp.specs(quick, seeds, out)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise LoraConfigError(f"experiment {exp.name}: run names repeat: {repeated}")
    configs = {s.name: build_config(s, out, quick, model) for s in specs}  # every config checked before any run
    out.mkdir(parents=True, exist_ok=True)
    done = {r["name"] for r in read_results(out)}
    todo = [s for s in specs if s.name not in done]
    log(f"experiment {exp.name}: {len(specs)} runs, {len(specs) - len(todo)} already done; results in {out}")
    missing = len(todo)
    if report_only:
        todo = []
        if missing == len(specs):
            raise LoraConfigError(f"experiment {exp.name}: no finished runs in {out} to report on")
    for i, spec in enumerate(todo, 1):
        config = configs[spec.name]
        twin = finished_elsewhere(config, out)
        if twin is not None:  # its config keeps the twin's out: the adapter the reports read is there
            row = {**twin, "name": spec.name, "group": spec.group, "seed": spec.seed, "meta": spec.meta,
                   "reused": twin["config"]["out"]}
            with open(out / RESULTS, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            log(f"  [{i}/{len(todo)}] {spec.name}: the same run as {twin['config']['out']}, reused")
            continue
        run_dir = Path(config.out)
        shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off earlier starts again
        run_dir.mkdir(parents=True)
        config.save(run_dir / "requested.json")
        start = time.perf_counter()
        if in_process:
            _train_in_process(config)
        else:
            _train_in_subprocess(run_dir / "requested.json")
        wall = time.perf_counter() - start
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        row = {"name": spec.name, "group": spec.group, "seed": spec.seed, "meta": spec.meta,
               "config": config.to_dict(), "summary": summary, "wall_s": wall, "in_process": in_process,
               "quick": quick, "cpu": cpu_name()}
        with open(out / RESULTS, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        log(f"  [{i}/{len(todo)}] {spec.name}: {summary['metric_name']} {summary['metric']:.4f}, {wall:.0f} s")
    wanted = set(names)
    results = [r for r in read_results(out) if r["name"] in wanted]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the reports' small SVDs: 2 threads on a busy 2-core machine were 10x slower
    try:
        written = exp.report(results, out, quick)
    finally:
        torch.set_num_threads(threads)
    if report_only and missing:
        for path in (p for p in written if p.suffix == ".md"):
            path.write_text(f"> **Interim report**: {len(specs) - missing} of {len(specs)} runs finished; "
                            f"`lorakit experiment {exp.name}` trains the rest.\n\n" + path.read_text(encoding="utf-8"),
                            encoding="utf-8")
    for path in written:
        log(f"  wrote {path}")
    return written


# --- helpers the reports share --------------------------------------------------------------------------------

def mean_std(values: list[float]) -> str:
    """'0.8735 ± 0.0040' (std over seeds, n-1), or the single value."""
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{mean(values):.4f} ± {stdev(values):.4f}"


def train_seconds(row: dict) -> float:
    """Time spent in optimizer steps (mean step time × steps), without evaluation or start-up."""
    return row["summary"]["step_time_s"] * row["summary"]["steps"]


def group_rows(results: list[dict], key: Callable[[dict], str] = lambda r: r["group"]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for r in results:
        out.setdefault(key(r), []).append(r)
    return out


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows]) + "\n"


def trainable_text(summary: dict) -> str:
    """'338,690 (1.47%)': trainable values and their share of the model's."""
    return f"{summary['trainable']:,} ({100 * summary['trainable'] / summary['total']:.3g}%)"


def memory_text(rows: list[dict]) -> str:
    """Mean peak memory of a group's runs; '(runner)' when they trained inside the runner's process (its peak)."""
    return f"{mean(r['summary']['memory_mib'] for r in rows):.0f} MiB" + (" (runner)" if rows[0]["in_process"] else "")


def method_table(results: list[dict]) -> str:
    """One row per group: dev metric mean ± std over seeds, trainable values (% of total), train time, memory."""
    rows = []
    for group, rs in group_rows(results).items():
        s = rs[0]["summary"]
        rows.append([group, f"{s['metric_name']} {mean_std([r['summary']['metric'] for r in rs])}", trainable_text(s),
                     f"{mean(train_seconds(r) for r in rs):.0f} s", memory_text(rs), str(len(rs))])
    return markdown_table(["run", "dev metric (mean ± std)", "trainable (% of total)", "train time", "peak memory",
                           "seeds"], rows)


def cpu_name() -> str:
    """The CPU model (train times from different machines do not compare; sessions may land on different VMs)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machines_text(results: list[dict]) -> str:
    """A line naming the CPUs the runs trained on, with counts (rows from before `cpu` was recorded: unrecorded)."""
    counts: dict[str, int] = {}
    for r in results:
        cpu = r.get("cpu") or "unrecorded"
        counts[cpu] = counts.get(cpu, 0) + 1
    return "\nTrained on: " + "; ".join(f"{cpu} ({n} run{'s' * (n != 1)})" for cpu, n in counts.items()) + \
        (". Train times compare only within one CPU.\n" if len(counts) > 1 else ".\n")


def write_text(path: Path, text: str, quick: bool) -> Path:
    note = ("> **--quick smoke run**: a few steps on a tiny slice; these numbers measure nothing.\n\n" if quick else "")
    path.write_text(note + text, encoding="utf-8")
    return path


__all__ = ["Experiment", "QUICK", "Spec", "build_config", "cpu_name", "group_rows", "machines_text",
           "markdown_table", "mean_std", "memory_text", "method_table", "read_results", "run_experiment",
           "train_seconds", "trainable_text", "write_text"]
