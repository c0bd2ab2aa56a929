"""What a trained LoRA adapter learned (the LoRA paper, §7): subspace similarity, spectra, amplification; plots.

Works on any adapter, from a directory (PEFT layout) or from a model holding LoRA layers. Every module is
described in (out, in) orientation: A (r, in), B (out, r), ΔW = scale · B·A, W0 (out, in).

    φ(A1, A2, i, j) = ‖V1[:, :i]ᵀ V2[:, :j]‖²_F / min(i, j)       normalized subspace similarity, in [0, 1]

with V the right-singular vectors of A (A = U Σ Vᵀ; V's columns span the input directions A reads), sorted
by singular value. 1: the top-i directions of one contain the top-j of the other; 0: orthogonal.

    amplification = ‖ΔW‖_F / ‖Uᵀ W0 V‖_F       U (out, r), V (in, r): the top-r singular vectors of ΔW

(the paper's Table 7): how much ΔW amplifies the directions of W0 it selects. The same projection onto W0's
own top-r directions and onto random orthonormal directions gives the two reference rows of that table.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.errors import AdapterFileError

Factors = dict[str, tuple[Tensor, Tensor, float]]  # module path -> (A (r, in), B (out, r), scale)


def adapter_factors(source: str | Path | nn.Module, name: str = "default") -> Factors:
    """{module: (A, B, scale)} of every linear LoRA module of an adapter directory or of `name` in a model."""
    if isinstance(source, nn.Module):
        from lorakit.layers import LoraLinear

        out = {}
        for path, m in source.named_modules():
            if isinstance(m, LoraLinear) and name in m.adapter_names:
                A, B = m.dense_factors(name)
                out[path] = (A.detach().float().cpu(), B.detach().float().cpu(), float(m.scale[name]))
        return out
    from lorakit.adapter_file import read_adapter

    a = read_adapter(source)
    c = a.config
    out = {}
    for module, (A, B, emb) in a.lora.items():
        if not emb and A.dim() == 2:
            r = A.shape[0]
            out[module] = (A.float(), B.float(), c.alpha_for(module) / (math.sqrt(r) if c.use_rslora else r))
    if not out:
        raise AdapterFileError(f"{source}: no linear LoRA modules to analyse")
    return out


def delta_weight(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """ΔW = scale · B·A, (out, in), in float64 for the SVDs that follow."""
    return scale * (B.double() @ A.double())


def right_singular_vectors(A: Tensor) -> Tensor:
    """V (in, r): the right-singular vectors of A (r, in), columns sorted by descending singular value."""
    _, _, vh = torch.linalg.svd(A.double(), full_matrices=False)
    return vh.T


def similarity_grid(A1: Tensor, A2: Tensor) -> Tensor:
    """φ(A1, A2, i, j) for every i ≤ r1, j ≤ r2: a (r1, r2) tensor whose [i-1, j-1] entry is φ(i, j)."""
    if A1.shape[1] != A2.shape[1]:
        raise ValueError(f"A1 reads {A1.shape[1]} inputs and A2 {A2.shape[1]}; compare adapters of the same module")
    m = (right_singular_vectors(A1).T @ right_singular_vectors(A2)) ** 2  # (r1, r2)
    covered = m.cumsum(0).cumsum(1)  # [i-1, j-1] = ‖V1[:, :i]ᵀ V2[:, :j]‖²_F
    i = torch.arange(1, m.shape[0] + 1, dtype=m.dtype)[:, None]
    j = torch.arange(1, m.shape[1] + 1, dtype=m.dtype)[None, :]
    return covered / torch.minimum(i, j)


def subspace_similarity(A1: Tensor, A2: Tensor, i: int, j: int) -> float:
    """φ(A1, A2, i, j) = ‖V1[:, :i]ᵀ V2[:, :j]‖²_F / min(i, j)."""
    if not (1 <= i <= A1.shape[0] and 1 <= j <= A2.shape[0]):
        raise ValueError(f"i={i}, j={j}: expected 1 <= i <= {A1.shape[0]} and 1 <= j <= {A2.shape[0]}")
    return float(similarity_grid(A1, A2)[i - 1, j - 1])


def factor_svd(A: Tensor, B: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD of ΔW = scale·B·A from its factors, without forming ΔW: (U (out, r), S (r,), V (in, r)).

    B = Q_B R_B, Aᵀ = Q_A R_A (QR), so ΔW = Q_B (scale·R_B R_Aᵀ) Q_Aᵀ and the small r×r middle's SVD gives
    U = Q_B u, V = Q_A v: O(d·r²) instead of a d×d SVD.
    """
    qb, rb = torch.linalg.qr(B.double())  # (out, r), (r, r)
    qa, ra = torch.linalg.qr(A.double().T)  # (in, r), (r, r)
    u, sv, vh = torch.linalg.svd(scale * rb @ ra.T)
    return qb @ u, sv, qa @ vh.T


def singular_values(A: Tensor, B: Tensor, scale: float) -> Tensor:
    """The r singular values of ΔW = scale·B·A (the rest are 0), descending."""
    return factor_svd(A, B, scale)[1]


def _rank(sv: Tensor) -> int:
    return max(1, int((sv > sv[0] * 1e-6).sum())) if sv.numel() and sv[0] > 0 else 1


def _projections(u: Tensor, v: Tensor, norm: float, w0: Tensor, r: int, seed: int) -> dict[str, float]:
    """Table 7's row for ΔW's top-r directions u (out, ≥r), v (in, ≥r) and its norm ‖ΔW‖_F."""
    w0 = w0.double()
    g = torch.Generator().manual_seed(seed)
    # Random directions: Q of a Gaussian's QR is Haar-distributed, as a Gaussian matrix's singular vectors are.
    ru = torch.linalg.qr(torch.randn(w0.shape[0], r, generator=g, dtype=torch.float64))[0]
    rv = torch.linalg.qr(torch.randn(w0.shape[1], r, generator=g, dtype=torch.float64))[0]
    proj = float(torch.linalg.matrix_norm(u[:, :r].T @ w0 @ v[:, :r]))
    top = torch.linalg.svdvals(w0)[:r]
    return {"r": r, "delta_norm": norm, "w0_norm": float(torch.linalg.matrix_norm(w0)), "proj_delta": proj,
            "proj_w0": float(top.norm()), "proj_random": float(torch.linalg.matrix_norm(ru.T @ w0 @ rv)),
            "factor": norm / proj if proj > 0 else math.inf}


def amplification(delta: Tensor, w0: Tensor, r: int | None = None, seed: int = 0) -> dict[str, float]:
    """The paper's Table 7 numbers for one module: ‖UᵀW0V‖_F with U, V the top-r singular vectors of ΔW,
    of W0 itself (= √(σ1² + … + σr²) of W0), and random orthonormal directions; ‖W0‖_F, ‖ΔW‖_F and the factor
    ‖ΔW‖_F / ‖Uᵀ W0 V‖_F (U, V of ΔW). r defaults to ΔW's numerical rank."""
    if delta.shape != w0.shape:
        raise ValueError(f"ΔW is {tuple(delta.shape)} but W0 is {tuple(w0.shape)}; pass the module's own base weight")
    u, sv, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    return _projections(u, vh.T, float(sv.norm()), w0, r or _rank(sv), seed)


def amplification_from_factors(A: Tensor, B: Tensor, scale: float, w0: Tensor, r: int | None = None,
                               seed: int = 0) -> dict[str, float]:
    """`amplification` of ΔW = scale·B·A, computed from the factors (see factor_svd)."""
    if (B.shape[0], A.shape[1]) != tuple(w0.shape):
        raise ValueError(f"ΔW is {(B.shape[0], A.shape[1])} but W0 is {tuple(w0.shape)}; pass the module's own "
                         "base weight")
    u, sv, v = factor_svd(A, B, scale)
    return _projections(u, v, float(sv.norm()), w0, r or _rank(sv), seed)


def base_weight(model: nn.Module, module: str) -> Tensor:
    """W0 (out, in) of `module` in `model`, a plain model or one with LoRA layers."""
    from lorakit.layers import LoraLinear

    m = model.get_submodule(module)
    if isinstance(m, LoraLinear):
        return m.weight_out_in().detach()
    w = m.weight.detach()
    return w.T if type(m).__name__ == "Conv1D" else w  # GPT-2's Conv1D stores (in, out)


def amplification_table(factors: Factors, model: nn.Module, seed: int = 0) -> list[dict]:
    """One amplification row per module of an adapter, W0 read from `model` (the base it was trained on)."""
    return [{"module": name, **amplification_from_factors(A, B, s, base_weight(model, name), A.shape[0], seed)}
            for name, (A, B, s) in sorted(factors.items())]


def plot_similarity(grid: Tensor, path: str | Path, title: str = "", xlabel: str = "j", ylabel: str = "i") -> Path:
    """A heatmap of a φ grid (rows i, columns j, both from 1), written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.2, 3.6))
    im = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", origin="upper", aspect="auto",
                   extent=(0.5, grid.shape[1] + 0.5, grid.shape[0] + 0.5, 0.5))
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    fig.colorbar(im, ax=ax, label="φ")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_spectra(spectra: dict[str, Tensor], path: str | Path, title: str = "singular values of ΔW",
                 max_lines: int = 24) -> Path:
    """The singular values of each module's ΔW (log scale), one line per module, written to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, s in list(spectra.items())[:max_lines]:
        s = s[s > 0]
        ax.semilogy(range(1, len(s) + 1), s.numpy(), marker=".", lw=1, label=name if len(spectra) <= 8 else None)
    ax.set(title=title, xlabel="index", ylabel="singular value")
    if len(spectra) <= 8:
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def adapter_spectra(factors: Factors) -> dict[str, Tensor]:
    """{module: singular values of its ΔW} for an adapter's factors."""
    return {name: singular_values(A, B, s) for name, (A, B, s) in sorted(factors.items())}


__all__ = ["Factors", "adapter_factors", "adapter_spectra", "amplification", "amplification_from_factors",
           "amplification_table", "base_weight", "delta_weight", "factor_svd", "plot_similarity", "plot_spectra",
           "right_singular_vectors", "similarity_grid", "singular_values", "subspace_similarity"]
