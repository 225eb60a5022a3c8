"""ACE's faster algebra equals the direct evaluation: top-k triplets from the Gram
eigendecomposition (acemerge.methods.spectral, also used by TSV-M and CART), Cholesky +
Sherman-Morrison for the prior system, Gram matrices from their upper block triangle and
a blocked Cholesky factor (acemerge.methods.symmetric), the row-Gram order for wide
matrices (the residual's rank-one identity is covered by tests/test_ace.py's independent
reference)."""

from __future__ import annotations

import pytest
import torch

from acemerge.methods import get, spectral, symmetric
from acemerge.methods.ace import AceParams, solve_prior_system, task_ridge, top_singular_part
from tests.ace_reference import ace_reference
from tests.test_ace import HETEROGENEOUS_SCALES, HOMOGENEOUS_SCALES, task_vectors

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
    gram = spectral.gram_svd
    monkeypatch.setattr(spectral, "gram_svd", lambda *a: used.append(gram(*a)) or used[-1])
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
    assert spectral.gram_svd(matrix, 40) is None
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


#: Shapes with several column blocks (MIN_BLOCK 128): 2, 8 uneven; the last two take
#: the row-Gram order (2 d_out < d_in) and keep 3 d_out >= d_in (a well-posed system).
BLOCKED = {"two blocks": (300, 260), "eight blocks": (400, 1030), "wide": (120, 300)}


@pytest.mark.parametrize("shape", BLOCKED.values(), ids=BLOCKED.keys())
def test_block_triangle_gram_equals_the_product(shape):
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.randn(*shape, generator=gen, dtype=torch.float64) for _ in range(3)]
    assert len(symmetric.block_edges(shape[1], matrices[0].device)) > 2  # really blocked
    single = symmetric.gram(matrices[0])
    assert torch.allclose(single, matrices[0].T @ matrices[0], rtol=1e-12, atol=1e-10)
    total = torch.zeros(shape[1], shape[1], dtype=torch.float64)
    for alpha, m in zip((0.5, 2.0, -1.0), matrices, strict=True):
        symmetric.add_gram_upper_(total, m, alpha=alpha)
    expected = sum(a * m.T @ m for a, m in zip((0.5, 2.0, -1.0), matrices, strict=True))
    assert torch.allclose(symmetric.mirror_upper_(total), expected, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("size", [300, 520, 64])
def test_blocked_cholesky_equals_lapack(size):
    x = torch.randn(2 * size, size, dtype=torch.float64)
    spd = x.T @ x / size + 0.1 * torch.eye(size, dtype=torch.float64)
    garbled = spd.tril() + 7.0 * torch.ones_like(spd).triu(1)  # only the lower part is read
    factor = symmetric.cholesky_lower(garbled)
    assert torch.allclose(factor, torch.linalg.cholesky(spd), rtol=1e-10, atol=1e-12)
    assert torch.equal(factor, factor.tril())


def test_blocked_cholesky_declines_an_indefinite_matrix():
    x = torch.randn(600, 300, dtype=torch.float64)
    spd = x.T @ x
    spd[290, 290] = -1.0  # a negative pivot in the last block
    assert symmetric.cholesky_lower(spd) is None


@pytest.mark.parametrize("shape", BLOCKED.values(), ids=BLOCKED.keys())
@pytest.mark.parametrize("scales", [HOMOGENEOUS_SCALES, HETEROGENEOUS_SCALES],
                         ids=["homogeneous", "heterogeneous"])
def test_ace_on_blocked_shapes_matches_the_reference(shape, scales):
    tvs = task_vectors(shape, scales)
    expected = torch.from_numpy(ace_reference([t.numpy() for t in tvs]))
    merged = get("ace")(tvs)
    assert float((merged - expected).abs().max() / expected.abs().max()) < 1e-6


@pytest.mark.parametrize("params", [{"eps": "auto", "auto_rule": rule} for rule in
                                    ("ledoit_wolf", "oas", "mp_edge")]
                         + [{"eps": 0.1, "eps_mode": "relative"}, {"eps": 0.1}],
                         ids=["ledoit_wolf", "oas", "mp_edge", "relative", "absolute"])
def test_ridge_is_the_same_from_the_row_gram(params):
    centered = torch.randn(20, 70, dtype=torch.float64)
    centered -= centered.mean(dim=0)
    ace = AceParams(**params)
    by_columns = task_ridge(centered, centered.T @ centered, ace)
    assert task_ridge(centered, centered @ centered.T, ace) == pytest.approx(by_columns,
                                                                              rel=1e-12)


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


@pytest.mark.parametrize("shape", [(120, 48), (300, 260), (50, 50)])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)],
                         ids=["float64", "float32"])
def test_polar_factor_from_the_gram_equals_the_svd(shape, dtype, tol):
    matrix = decaying(shape, dtype, seed=4)  # S_min = 0.01 S_max: the Gram path serves
    u, _, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
    polar = spectral.polar_factor(matrix)
    assert polar.dtype == dtype
    assert float((polar.double() - u @ vh).abs().max()) < tol


def test_polar_factor_of_a_singular_matrix_is_orthonormal_from_the_svd():
    basis = decaying((80, 30), torch.float64)
    repeated = torch.cat([basis, basis[:, :5]], dim=1)  # shared directions: rank 30 of 35
    polar = spectral.polar_factor(repeated)
    eye = torch.eye(35, dtype=torch.float64)
    assert float((polar.T @ polar - eye).abs().max()) < 1e-10


def test_iso_c_takes_the_gram_path_and_keeps_its_result():
    tvs = [decaying((90, 60), torch.float64, seed=s) for s in range(3)]
    total = sum(tvs)
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    assert spectral.gram_svd(total, 60) is not None
    merged = get("iso_c")(tvs)
    assert float((merged - s.mean() * (u @ vh)).abs().max() / s.mean()) < 1e-10
