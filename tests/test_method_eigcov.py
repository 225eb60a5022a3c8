"""EigCov: D = (sum_t D_t G~_t)(sum_t G~_t)^+ with G_t = D_t^T D_t."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acemerge.errors import AceMergeError
from acemerge.methods import eigcov
from acemerge.methods.registry import get

METHOD = get("eigcov")
SHAPES = {"tall": (9, 5), "square": (6, 6), "wide": (3, 10)}
#: Several column blocks of acemerge.methods.symmetric; the wide one takes the row-Gram order.
BLOCKED = {"tall": (300, 260), "wide": (120, 300)}


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def experts(shape: tuple[int, int], count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    """Task vectors with different energies, so that the weightings differ."""
    return [randn(*shape, seed=seed + t) * (1.0 + 2.0 * t) for t in range(count)]


def low_rank(d_out: int, d_in: int, rank: int, seed: int) -> torch.Tensor:
    return randn(d_out, rank, seed=seed) @ randn(rank, d_in, seed=seed + 100)


def numpy_reference(
    tvs: list[torch.Tensor], weighting: str = "none", ridge: float = 0.0
) -> np.ndarray:
    """The closed form written directly in numpy float64."""
    mats = [tv.double().numpy() for tv in tvs]
    d_in = mats[0].shape[1]
    numerator = np.zeros_like(mats[0])
    system = np.zeros((d_in, d_in))
    for mat in mats:
        gram = mat.T @ mat
        scale = {
            "none": 1.0,
            "energy": 1.0 / np.sum(mat**2),
            "gram": 1.0 / np.sum(gram**2),
        }[weighting]
        numerator += scale * mat @ gram
        system += scale * gram
    if ridge > 0:
        return numerator @ np.linalg.inv(system + ridge * np.eye(d_in))
    return numerator @ np.linalg.pinv(system, rcond=1e-10, hermitian=True)


def close(actual: torch.Tensor, expected: np.ndarray | torch.Tensor, tol: float) -> bool:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    err = (actual.double() - expected).norm() / expected.norm().clamp_min(1e-300)
    return float(err) < tol


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_one_task_returns_it(kind: str, dtype: torch.dtype, tol: float) -> None:
    tv = randn(*SHAPES[kind], seed=1, dtype=dtype)
    out = METHOD([tv])
    assert out.dtype == dtype
    assert close(out, tv, tol)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_one_rank_deficient_task_returns_it(dtype: torch.dtype, tol: float) -> None:
    exact = low_rank(8, 8, 3, seed=2)  # G_1 singular, yet D_1 G_1 G_1^+ = D_1
    gram = exact.T @ exact
    assert torch.linalg.matrix_rank(gram) == 3
    assert close(exact @ gram @ torch.linalg.pinv(gram, hermitian=True), exact, 1e-10)
    tv = exact.to(dtype)
    for weighting in ("none", "energy", "gram"):
        assert close(METHOD([tv], weighting=weighting), tv, tol)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("weighting", ["none", "energy", "gram"])
def test_matches_numpy_pseudo_inverse(kind: str, weighting: str) -> None:
    tvs = experts(SHAPES[kind])
    assert close(METHOD(tvs, weighting=weighting), numpy_reference(tvs, weighting), 1e-9)


@pytest.mark.parametrize("kind", BLOCKED)
@pytest.mark.parametrize("weighting", ["none", "gram"])
def test_blocked_grams_match_numpy(kind: str, weighting: str) -> None:
    tvs = experts(BLOCKED[kind])
    assert close(METHOD(tvs, weighting=weighting), numpy_reference(tvs, weighting), 1e-9)


def test_matches_numpy_when_the_sum_of_grams_is_singular() -> None:
    tvs = experts((2, 10), count=3)  # rank of sum G_t is 6 < 10
    assert torch.linalg.matrix_rank(sum(tv.T @ tv for tv in tvs)) == 6
    assert close(METHOD(tvs), numpy_reference(tvs), 1e-9)


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("ridge", [1e-4, 1e-2, 10.0])
def test_ridge_matches_direct_solve(kind: str, ridge: float) -> None:
    tvs = experts(SHAPES[kind])
    out = METHOD(tvs, ridge=ridge)
    assert close(out, numpy_reference(tvs, ridge=ridge), 1e-9)
    if ridge == 10.0:
        assert not close(out, numpy_reference(tvs), 1e-3)  # the ridge does something


def test_float32_matches_float64() -> None:
    tvs = experts((16, 12))
    out = METHOD([tv.float() for tv in tvs])
    assert out.dtype == torch.float32
    assert close(out, numpy_reference(tvs), 1e-4)


def test_weightings_differ() -> None:
    tvs = experts((9, 5))
    outs = [METHOD(tvs, weighting=w) for w in ("none", "energy", "gram")]
    for i in range(3):
        for j in range(i + 1, 3):
            assert not close(outs[i], outs[j], 1e-3)


def test_orthogonal_input_subspaces_give_the_sum() -> None:
    basis = torch.linalg.qr(randn(12, 12, seed=3))[0]
    tvs = [randn(5, 4, seed=10 + t) @ basis[:, 4 * t : 4 * t + 4].T for t in range(3)]
    for weighting in ("none", "energy", "gram"):
        assert close(METHOD(tvs, weighting=weighting), sum(tvs), 1e-10)


@pytest.mark.parametrize("weighting", ["none", "energy", "gram"])
def test_invariant_to_expert_order(weighting: str) -> None:
    tvs = experts((7, 6), count=4)
    ref = METHOD(tvs, weighting=weighting)
    assert close(METHOD(tvs[::-1], weighting=weighting), ref, 1e-12)
    assert close(METHOD([tvs[2], tvs[0], tvs[3], tvs[1]], weighting=weighting), ref, 1e-12)


def test_homogeneous_of_degree_one() -> None:
    tvs = experts((7, 6))
    for weighting in ("none", "energy", "gram"):
        scaled = METHOD([5.0 * tv for tv in tvs], weighting=weighting)
        assert close(scaled, 5.0 * METHOD(tvs, weighting=weighting), 1e-10)


@pytest.mark.parametrize("weighting", ["none", "energy", "gram"])
@pytest.mark.parametrize("ridge", [0.0, 1e-3])
def test_zero_task_vectors_are_safe(weighting: str, ridge: float) -> None:
    tvs = experts((6, 5), count=2)
    zero = torch.zeros(6, 5, dtype=torch.float64)
    with_zero = METHOD([tvs[0], zero, tvs[1]], weighting=weighting, ridge=ridge)
    assert torch.isfinite(with_zero).all()
    assert close(with_zero, METHOD(tvs, weighting=weighting, ridge=ridge), 1e-10)
    all_zero = METHOD([zero, zero.clone()], weighting=weighting, ridge=ridge)
    assert torch.equal(all_zero, zero)


def test_max_dim_falls_back_to_the_mean() -> None:
    tvs = experts((3, 10))
    mean = torch.stack(tvs).mean(dim=0)
    assert torch.equal(METHOD(tvs, max_dim=10), mean)
    assert not close(METHOD(tvs, max_dim=11), mean, 1e-3)
    assert close(METHOD(tvs, max_dim=11), numpy_reference(tvs), 1e-9)


def test_non_matrix_parameters_get_the_mean() -> None:
    vecs = [randn(7, seed=t) for t in range(3)]
    assert torch.equal(METHOD(vecs), torch.stack(vecs).mean(dim=0))


def test_low_precision_input_is_computed_in_float32() -> None:
    tvs = experts((8, 6))
    out = METHOD([tv.bfloat16() for tv in tvs])
    assert out.dtype == torch.bfloat16
    ref = numpy_reference([tv.bfloat16().double() for tv in tvs])
    assert close(out, ref, 2e-2)


def test_rtol_cuts_small_eigenvalues() -> None:
    left = torch.linalg.qr(randn(6, 6, seed=4))[0]
    right = torch.linalg.qr(randn(6, 6, seed=5))[0]
    spectrum = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1e-4], dtype=torch.float64)
    tv = left @ torch.diag(spectrum) @ right.T  # eigenvalues of G: 1 (x5) and 1e-8
    assert close(METHOD([tv]), tv, 1e-8)  # kept by the default cutoff (6 * 2.2e-16)
    truncated = METHOD([tv], rtol=1e-6)  # dropped: D P with the weak direction projected out
    expected = tv @ (torch.eye(6, dtype=torch.float64) - right[:, 5:] @ right[:, 5:].T)
    assert close(truncated, expected, 1e-10)
    assert not close(truncated, tv, 1e-5)


def test_params_and_defaults() -> None:
    assert METHOD.defaults() == {
        "ridge": 0.0,
        "weighting": "none",
        "max_dim": 20000,
        "rtol": None,
    }
    assert METHOD.default_scale == 1.0
    assert METHOD.other_rule_name == "mean"
    for bad in ({"ridge": -1.0}, {"weighting": "alpha"}, {"max_dim": 0}, {"lam": 1.0}):
        with pytest.raises(AceMergeError):
            METHOD.validate(bad)


def test_module_pieces() -> None:
    system = torch.diag(torch.tensor([4.0, 2.0, 0.0], dtype=torch.float64))
    numerator = torch.ones(2, 3, dtype=torch.float64)
    out = eigcov.psd_pinv_right(numerator, system, rtol=None)
    assert torch.allclose(out, torch.tensor([[0.25, 0.5, 0.0]] * 2, dtype=torch.float64))
    zero = torch.zeros(2, 2)
    assert eigcov.gram_weight(zero, zero, "energy") == 0.0
    assert eigcov.gram_weight(zero, zero, "gram") == 0.0
