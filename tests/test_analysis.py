"""lorakit.analysis against closed forms: φ of a subspace with itself is 1, of orthogonal ones 0, of random ones
max(i, j)/d on average; spectra of ΔW built with known singular values; amplification of a ΔW aligned with
W0's top or bottom direction; the random baseline's expectation; file and model sources agree; plots are PNGs."""

import math

import pytest
import torch

from lorakit import LoraConfig, inject, save_adapter
from lorakit.analysis import (
    adapter_factors,
    adapter_spectra,
    amplification,
    amplification_table,
    base_weight,
    plot_similarity,
    plot_spectra,
    similarity_grid,
    singular_values,
    subspace_similarity,
)
from lorakit.cli import main
from tests.conftest import make_tiny, randomize_adapters


@pytest.fixture(autouse=True)
def one_thread():
    """Small SVDs: one thread is fastest, and on a busy machine 2 threads spin-wait (10x slower, measured)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _orthonormal(d, k, seed):
    q, _ = torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    return q  # (d, k)


def test_phi_of_a_subspace_with_itself_is_one_and_ignores_the_basis():
    A = torch.randn(8, 50, generator=torch.Generator().manual_seed(0))
    grid = similarity_grid(A, A)
    torch.testing.assert_close(grid.diagonal(), torch.ones(8, dtype=torch.float64))
    mix = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))  # another basis of the same row space
    assert subspace_similarity(A, mix @ A, 8, 8) == pytest.approx(1.0)
    assert subspace_similarity(A, mix @ A, 3, 8) == pytest.approx(1.0)  # top-3 lies inside the full 8-dim space


def test_phi_of_orthogonal_subspaces_is_zero_and_of_nested_ones_is_one():
    basis = _orthonormal(40, 12, 0)
    A1, A2 = basis[:, :4].T.float(), basis[:, 4:12].T.float()
    assert similarity_grid(A1, A2).abs().max() < 1e-10
    scales = torch.tensor([4.0, 3.0, 2.0, 1.0])[:, None]
    A_small = scales * basis[:, :4].T  # singular directions e1..e4 in order
    A_big = torch.cat([A_small * 10, basis[:, 4:12].T]).float()  # the same four first, then eight more
    assert subspace_similarity(A_small.float(), A_big, 4, 4) == pytest.approx(1.0)
    assert subspace_similarity(A_small.float(), A_big, 2, 12) == pytest.approx(1.0)
    # half of a 4-dim subspace: φ(4, 2) = ‖V1ᵀV2‖² / 2 with V2 inside V1 = 1; φ(2, 4) too, by symmetry
    assert subspace_similarity(A_big, A_small.float(), 4, 2) == pytest.approx(1.0)


def test_phi_of_random_subspaces_is_max_i_j_over_d_on_average():
    d, i, j = 100, 4, 8  # E‖V1ᵀV2‖²_F = i·j/d for independent uniformly random subspaces
    values = [subspace_similarity(_orthonormal(d, i, s).T, _orthonormal(d, j, 100 + s).T, i, j) for s in range(20)]
    assert sum(values) / len(values) == pytest.approx(max(i, j) / d, rel=0.2)


def test_spectrum_of_a_delta_with_known_singular_values():
    s = torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64)
    U, V = _orthonormal(30, 3, 1), _orthonormal(20, 3, 2)
    B, A = U * s, V.T  # ΔW = scale · U diag(s) Vᵀ
    torch.testing.assert_close(singular_values(A, B, 2.0), 2.0 * s)  # from the factors: r values
    dense = torch.linalg.svdvals(2.0 * B @ A)
    torch.testing.assert_close(dense[:3], 2.0 * s)
    assert dense[3:].abs().max() < 1e-10


def test_amplification_of_a_delta_along_w0s_top_and_bottom_directions():
    sv = torch.tensor([9.0, 4.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    U, V = _orthonormal(12, 5, 3), _orthonormal(7, 5, 4)
    w0 = U @ torch.diag(sv) @ V.T  # (12, 7), singular values 9, 4, 2, 1, 0.5
    top = amplification(3.0 * torch.outer(U[:, 0], V[:, 0]), w0)
    assert top["r"] == 1 and top["proj_delta"] == pytest.approx(9.0) and top["factor"] == pytest.approx(3.0 / 9.0)
    bottom = amplification(3.0 * torch.outer(U[:, 4], V[:, 4]), w0)
    assert bottom["proj_delta"] == pytest.approx(0.5) and bottom["factor"] == pytest.approx(6.0)
    two = amplification(torch.outer(U[:, 3], V[:, 3]) + 0.5 * torch.outer(U[:, 4], V[:, 4]), w0)
    assert two["r"] == 2 and two["proj_delta"] == pytest.approx(math.hypot(1.0, 0.5))
    assert two["proj_w0"] == pytest.approx(math.hypot(9.0, 4.0))  # W0's own top-2: √(σ1² + σ2²)
    assert two["w0_norm"] == pytest.approx(float(sv.norm()))


def test_random_projection_matches_its_expectation():
    w0 = torch.randn(60, 40, generator=torch.Generator().manual_seed(1000), dtype=torch.float64)
    r = 4  # E‖UᵀW0V‖²_F = r² ‖W0‖²_F / (m·n) for random orthonormal U (m, r), V (n, r)
    delta = torch.randn(60, 40, dtype=torch.float64)
    values = [amplification(delta, w0, r, seed=s)["proj_random"] ** 2 for s in range(20)]
    assert sum(values) / len(values) == pytest.approx(r * r * float(w0.norm()) ** 2 / (60 * 40), rel=0.25)


def test_file_and_model_sources_agree_and_feed_the_tables(tmp_path):
    model = make_tiny("llama")
    inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    from_file, from_model = adapter_factors(tmp_path / "a"), adapter_factors(model)
    assert sorted(from_file) == sorted(from_model) == [f"model.layers.{i}.self_attn.{p}" for i in range(2)
                                                       for p in ("q_proj", "v_proj")]
    for name, (A, B, s) in from_file.items():
        A2, B2, s2 = from_model[name]
        torch.testing.assert_close((A, B, s), (A2, B2, s2))
        dense = torch.linalg.svdvals(model.get_submodule(name).delta_weight("default").double())
        torch.testing.assert_close(adapter_spectra(from_file)[name], dense[:4])
        assert dense[4:].abs().max() < 1e-6
    rows = amplification_table(from_file, model)
    for row in rows:  # from the factors == from the dense ΔW and W0
        A, B, s = from_file[row["module"]]
        dense = amplification(s * B.double() @ A.double(), base_weight(model, row["module"]), 4)
        for key in ("delta_norm", "w0_norm", "proj_delta", "proj_w0", "proj_random", "factor"):
            assert row[key] == pytest.approx(dense[key], rel=1e-6), key
    base = make_tiny("llama")
    torch.testing.assert_close(base_weight(model, rows[0]["module"]), base_weight(base, rows[0]["module"]))
    assert [r["r"] for r in rows] == [4, 4, 4, 4] and all(r["factor"] > 0 for r in rows)


def test_plots_are_pngs_and_inspect_draws_the_spectra(tmp_path, capsys):
    A = torch.randn(8, 30, generator=torch.Generator().manual_seed(0))
    assert plot_similarity(similarity_grid(A, A[:4]), tmp_path / "h.png").read_bytes()[:4] == b"\x89PNG"
    assert plot_spectra({"m": torch.tensor([3.0, 1.0, 0.0])}, tmp_path / "s.png").read_bytes()[:4] == b"\x89PNG"
    model = make_tiny("llama")
    inject(model, LoraConfig(r=4, alpha=8, targets=["q_proj", "v_proj"]))
    randomize_adapters(model)
    save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a"), "--plot", str(tmp_path / "spectra.png")]) == 0
    assert (tmp_path / "spectra.png").read_bytes()[:4] == b"\x89PNG"
    assert "spectra.png" in capsys.readouterr().out


def test_bad_inputs_name_the_problem():
    with pytest.raises(ValueError, match="same module"):
        similarity_grid(torch.randn(2, 5), torch.randn(2, 6))
    with pytest.raises(ValueError, match="1 <= i <= 2"):
        subspace_similarity(torch.randn(2, 5), torch.randn(2, 5), 3, 1)
    with pytest.raises(ValueError, match="base weight"):
        amplification(torch.randn(3, 4), torch.randn(4, 3))
