"""What a run shows and leaves behind: progress bar, metrics.jsonl, the summary table, the curves PNG."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


def progress_bar(total: int, initial: int, enabled: bool):
    """A tqdm bar over optimizer steps (tqdm adds elapsed time and ETA); disabled off rank 0."""
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                file=sys.stderr, desc="train")


def append_metrics(path: str | Path, row: dict) -> None:
    """Append one JSON line (a train step or a dev evaluation) to metrics.jsonl."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def truncate_metrics(path: str | Path, step: int) -> None:
    """Keep only rows up to `step`: a resumed run rewrites what followed its checkpoint."""
    rows = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    Path(path).write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(MiB, what was measured): CUDA max_memory_allocated on GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "CUDA max allocated"
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return kib / 1024, "peak RSS"


def summary_table(rows: list[dict]) -> str:
    """A text table, one row per run: method, trainable values (% of total), mean step time, peak memory,
    dev metric. Each row holds method, trainable, total, step_time_s, memory_mib, memory_kind,
    metric_name, metric."""
    head = ["method", "trainable (% of total)", "step time", "peak memory", "dev metric"]
    body = []
    for r in rows:
        body.append([r["method"], f"{r['trainable']:,} ({100 * r['trainable'] / max(r['total'], 1):.3f}%)",
                     f"{1000 * r['step_time_s']:.0f} ms", f"{r['memory_mib']:,.0f} MiB {r['memory_kind']}",
                     f"{r['metric_name']} {r['metric']:.4f}"])
    widths = [max(len(x) for x in col) for col in zip(head, *body, strict=True)]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in body]
    return "\n".join(out)


def plot_curves(rows: list[dict], path: str | Path, metric_name: str) -> Path:
    """PNG with two panels: train loss (and dev loss) by step, and the dev metric by step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("split") == "train"]
    dev = [r for r in rows if r.get("split") == "dev"]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if dev:
        ax_loss.plot([r["step"] for r in dev], [r["loss"] for r in dev], "o-", label="dev")
        ax_metric.plot([r["step"] for r in dev], [r[metric_name] for r in dev], "o-", color="C1")
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_metric.set(xlabel="optimizer step", ylabel=metric_name, title=f"dev {metric_name}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


__all__ = ["append_metrics", "peak_memory", "plot_curves", "progress_bar", "read_metrics", "summary_table",
           "truncate_metrics"]
