"""Line charts for the experiments' reports (matplotlib, PNG): a metric against a setting, one line per series,
the mean over seeds with ± one standard deviation as error bars where there are several. A single-seed accuracy
measured on `n_eval` examples gets ± its binomial standard error sqrt(p(1-p)/n) instead, so a reader sees which
differences are inside the noise of the dev set (SST-2 dev, 872 sentences: ±1.2 points at p = 0.85)."""

from __future__ import annotations

from math import sqrt
from pathlib import Path
from statistics import mean, stdev

Points = list[tuple[float, list[float]]]  # (x, the metric of each seed at x)


def error_bar(values: list[float], n_eval: int = 0) -> float:
    """± one seed standard deviation over several seeds; for one seed's accuracy on `n_eval` examples its binomial
    standard error sqrt(p(1-p)/n); else 0."""
    if len(values) > 1:
        return stdev(values)
    p = values[0]
    return sqrt(p * (1 - p) / n_eval) if n_eval and 0 <= p <= 1 else 0.0


def plot_lines(series: dict[str, Points], path: str | Path, title: str, xlabel: str, ylabel: str,
               log_base: int = 0, n_eval: int = 0, ylim: tuple[float, float] | None = None,
               references: dict[str, float] | None = None) -> Path:
    """One line per series through the mean at each x, written to `path` (PNG); x on a log scale of `log_base`
    (0: linear). `ylim` fixes the y range (so a few tenths of a point are not drawn as a cliff), `references`
    adds labelled horizontal dashed lines (e.g. full fine-tuning's score). Returns the path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.6))
    for label, points in series.items():
        points = sorted(points)
        xs = [x for x, _ in points]
        means = [mean(v) for _, v in points]
        errors = [error_bar(v, n_eval) for _, v in points]
        ax.errorbar(xs, means, yerr=errors, marker="o", capsize=3, lw=1.2, label=label)
    for k, (label, y) in enumerate((references or {}).items()):
        ax.axhline(y, ls="--", lw=1, color=f"C{len(series) + k}", label=label)
    if ylim is not None:
        ax.set_ylim(*ylim)
    if log_base:
        ax.set_xscale("log", base=log_base)
    xs = sorted({x for points in series.values() for x, _ in points})
    if log_base == 2 or (not log_base and all(float(x).is_integer() for x in xs)):
        ax.set_xticks(xs, [f"{x:g}" for x in xs])  # ranks (1, 2, 4, 8, 64), not powers of 2; seeds, not 0.2, 0.4
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if len(series) + len(references or {}) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
