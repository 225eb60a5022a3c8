"""ACE's faster algebra equals the direct evaluation: top-k triplets from the Gram
eigendecomposition (acemerge.methods.spectral, also used by TSV-M and CART), Cholesky +
Sherman-Morrison for the prior system and the cheaper product order (the residual's
rank-one identity is covered by tests/test_ace.py's independent reference)."""

from __future__ import annotations

import pytest
import torch

from acemerge.methods import spectral
from acemerge.methods.ace import solve_prior_system, times_proxy, top_singular_part

SHAPES = {"tall": (120, 48), "wide": (48, 120), "square": (80, 80)}


def decaying(shape, dtype, seed=0) -> torch.Tensor:
    """A matrix with singular values 1 ... 0.01 (distinct, so top-k subspaces are defined)."""
    gen = torch.Generator().manual_seed(seed)
    r = min(shape)
    u, _ = torch.linalg.qr(torch.randn(shape[0], r, generator=gen, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(shape[1], r, generator=gen, dtype=torch.float64))
    s = torch.logspace(0, -2, r, dtype=torch.float64)
    return ((u * s) @ v.T).to(dtype)


def direct(matrix: torch.Tensor, rank: int) -> tuple[float, torch.Tensor]:
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    return float(s[:rank].mean()), u[:, :rank] @ vh[:rank]


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
@pytest.mark.parametrize("which", ["k=1", "k=0.3r", "k=r"])
def test_top_k_refinement_equals_the_full_svd(shape, dtype, tol, which, monkeypatch):
    matrix = decaying(shape, dtype)
    r = min(shape)
    rank = {"k=1": 1, "k=0.3r": int(0.3 * r), "k=r": r}[which]
    used = []
    gram = spectral._top_from_gram
    monkeypatch.setattr(spectral, "_top_from_gram", lambda *a: used.append(gram(*a)) or used[-1])
    sigma, product = top_singular_part(matrix, rank, dtype)
    ref_sigma, ref_product = direct(matrix, rank)
    assert product.dtype == dtype
    assert abs(sigma - ref_sigma) / ref_sigma < tol
    assert float((product.double() - ref_product).abs().max()) < tol * 10
    # the Gram path serves k = 1 and 0.3 r; k = r reaches sigma_r = 0.01 sigma_1 (allowed)
    assert used[0] is not None


def test_top_k_falls_back_to_the_svd_where_the_gram_is_inaccurate():
    matrix = decaying((60, 40), torch.float64)
    matrix = matrix @ torch.diag(torch.logspace(0, -6, 40, dtype=torch.float64))
    assert spectral._top_from_gram(matrix, 40) is None
    sigma, product = top_singular_part(matrix, 40, None)
    ref_sigma, ref_product = direct(matrix, 40)
    assert abs(sigma - ref_sigma) / ref_sigma < 1e-12
    assert float((product - ref_product).abs().max()) < 1e-8


@pytest.mark.parametrize("with_prior", [True, False])
def test_cholesky_sherman_morrison_equals_the_general_solve(with_prior):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 50, generator=gen, dtype=torch.float64)
    symmetric = x.T @ x / 200 + 1e-3 * torch.eye(50, dtype=torch.float64)
    prior = symmetric.mean(dim=0) if with_prior else None
    numerator = torch.randn(30, 50, generator=gen, dtype=torch.float64)
    system = symmetric + prior.unsqueeze(0) if with_prior else symmetric
    expected = torch.linalg.solve(system, numerator, left=False)
    result = solve_prior_system(numerator, symmetric, prior)
    assert float((result - expected).abs().max() / expected.abs().max()) < 1e-10


def test_prior_system_declines_an_indefinite_matrix():
    indefinite = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    assert solve_prior_system(torch.ones(2, 3, dtype=torch.float64), indefinite, None) is None


@pytest.mark.parametrize("shape", [(10, 40), (40, 10), (20, 40)])
def test_times_proxy_orders_agree(shape):
    c = torch.randn(*shape, dtype=torch.float64)
    assert torch.allclose(times_proxy(c, c.T @ c), c @ (c.T @ c), rtol=1e-12, atol=1e-12)



@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_top_svd_triplets_equal_the_full_svd(shape, dtype, tol):
    matrix = decaying(shape, dtype, seed=2)
    k = min(shape) // 4
    top = spectral.top_svd(matrix, k)
    u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    assert float((top.s.double() - s[:k]).abs().max() / s[0]) < tol
    assert float((top.matrix().double() - (u[:, :k] * s[:k]) @ vh[:k]).abs().max()
                 / s[0]) < tol
    # orthonormal factors, each triplet consistent up to a common sign
    eye = torch.eye(k, dtype=torch.float64)
    assert float((top.u.double().T @ top.u.double() - eye).abs().max()) < tol * 10
    signs = torch.sign((top.u.double() * u[:, :k]).sum(dim=0))
    assert float((top.vh.double() * signs.unsqueeze(1) - vh[:k]).abs().max()) < tol * 100
