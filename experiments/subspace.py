"""subspace (the paper's §7): LoRA q, v on SST-2 at r=8 and r=64, seeds 0 and 1; then
- φ(A_r8, A_r64, i, j) heatmaps (query and value of one middle layer), and φ between the two seeds at r=64;
- the singular spectra of ΔW;
- the amplification factor ‖ΔW‖_F / ‖Uᵀ W0 V‖_F per layer, with W0's own and random directions as references.
"""

from __future__ import annotations

from pathlib import Path

from experiments.recipes import RECIPES
from experiments.runner import Experiment, Spec, markdown_table, write_text
from lorakit.analysis import (
    adapter_factors,
    adapter_spectra,
    amplification_table,
    plot_similarity,
    plot_spectra,
    similarity_grid,
)

RUNS = ((8, 0), (64, 0), (8, 1), (64, 1))


def specs(quick: bool, seeds: int | None, out: Path) -> list[Spec]:
    return [Spec(f"sst2-qv-r{r}-s{seed}", f"r={r} seed {seed}", {"task": "sst2", **RECIPES["lora-qv"], "r": r}, seed,
                 {"r": r}) for r, seed in RUNS]


def _base_model(result: dict):
    from lorakit.train.tasks import default_model_path, load_model

    return load_model(result["config"]["model"] or default_model_path(), "classification", ["0", "1"])


def _pick(factors: dict, kind: str, layer: int) -> str:
    hits = sorted(n for n in factors if n.endswith(kind) and f".{layer}." in n)
    if not hits:
        raise KeyError(f"no {kind} module in layer {layer} among {sorted(factors)[:4]}")
    return hits[0]


def report(results: list[dict], out: Path, quick: bool) -> list[Path]:
    runs = {(r["meta"]["r"], r["seed"]): r for r in results}
    factors = {key: adapter_factors(Path(r["config"]["out"]) / "adapter") for key, r in runs.items()}
    layers = sorted({int(p) for n in factors[(8, 0)] for p in n.split(".") if p.isdigit()})
    mid = layers[len(layers) // 2]
    written = []
    for kind in ("query", "value"):
        name = _pick(factors[(8, 0)], kind, mid)
        grid = similarity_grid(factors[(8, 0)][name][0], factors[(64, 0)][name][0])
        written.append(plot_similarity(grid, out / f"phi_r8_r64_{kind}.png", f"φ(A_r=8, A_r=64) {kind}, layer {mid}",
                                       "j (r=64)", "i (r=8)"))
        seeds = similarity_grid(factors[(64, 0)][name][0], factors[(64, 1)][name][0])
        written.append(plot_similarity(seeds, out / f"phi_seeds_r64_{kind}.png",
                                       f"φ(A_r=64 seed 0, seed 1) {kind}, layer {mid}", "j (seed 1)", "i (seed 0)"))
    written.append(plot_spectra(adapter_spectra(factors[(64, 0)]), out / "spectra_r64.png",
                                "singular values of ΔW, r=64 (q, v, every layer)"))
    written.append(plot_spectra(adapter_spectra(factors[(8, 0)]), out / "spectra_r8.png",
                                "singular values of ΔW, r=8 (q, v, every layer)"))
    written.append(_amplification_report(runs, factors, out, quick, mid))
    return written


def _amplification_report(runs: dict, factors: dict, out: Path, quick: bool, mid: int) -> Path:
    model = _base_model(runs[(8, 0)])
    rows = []
    for r in (8, 64):
        for row in amplification_table(factors[(r, 0)], model):
            rows.append([row["module"].removeprefix("bert.encoder."), str(r), f"{row['delta_norm']:.3g}",
                         f"{row['w0_norm']:.3g}", f"{row['proj_delta']:.3g}", f"{row['proj_w0']:.3g}",
                         f"{row['proj_random']:.3g}", f"{row['factor']:.3g}"])
    header = ["module", "r", "‖ΔW‖_F", "‖W0‖_F", "‖UᵀW0V‖ (ΔW dirs)", "‖UᵀW0V‖ (W0 dirs)", "‖UᵀW0V‖ (random)",
              "amplification ‖ΔW‖/‖UᵀW0V‖"]
    mid_rows = _phi_rows(factors, mid)
    text = ("# subspace: what LoRA learns (SST-2, q and v)\n\n" + markdown_table(header, rows) + "\n"
            + markdown_table([f"φ, layer {mid}", "query", "value", "random subspaces: max(i, j) / d"], mid_rows)
            + "\nFigures: phi_r8_r64_{query,value}.png, phi_seeds_r64_{query,value}.png, spectra_r{8,64}.png\n")
    return write_text(out / "subspace.md", text, quick)


def _phi_rows(factors: dict, mid: int) -> list[list[str]]:
    """φ at a few (i, j) for r=8 vs r=64 and for the two r=64 seeds, beside random subspaces' expectation."""
    names = [_pick(factors[(8, 0)], k, mid) for k in ("query", "value")]
    d = factors[(8, 0)][names[0]][0].shape[1]
    rows = []
    for label, a, b, points in (("r=8 vs r=64", (8, 0), (64, 0), ((1, 1), (8, 8), (8, 64))),
                                ("r=64 seed 0 vs seed 1", (64, 0), (64, 1), ((1, 1), (8, 8), (64, 64)))):
        grids = [similarity_grid(factors[a][n][0], factors[b][n][0]) for n in names]
        for i, j in points:
            i, j = min(i, grids[0].shape[0]), min(j, grids[0].shape[1])
            rows.append([f"{label}, i={i}, j={j}", *(f"{float(g[i - 1, j - 1]):.3f}" for g in grids),
                         f"{max(i, j) / d:.3f}"])
    return rows


EXPERIMENT = Experiment("subspace", "r=8 vs r=64 and two seeds: φ heatmaps, spectra, amplification", specs, report)
