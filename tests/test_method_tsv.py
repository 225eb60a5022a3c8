"""TSV-M: orthonormal factors, the kept spectrum, a float64 transcription, r < T."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acemerge.methods import registry, tsv
from tests.factories import experts, np_polar

# (shape, task count): T k = r, T k < r, and each orientation.
CASES = {
    "tall": ((30, 12), 3),
    "wide": ((12, 30), 5),
    "square": ((20, 20), 4),
    "tall-uneven": ((25, 14), 4),
}






def tsv_reference(tvs):
    """Top floor(r/T) (>= 1) triplets per task, the r largest, polar factors, in float64."""
    mats = [t.double().numpy() for t in tvs]
    r = min(mats[0].shape)
    k = max(1, r // len(mats))
    triplets = []
    for m in mats:
        u, s, vh = np.linalg.svd(m, full_matrices=False)
        triplets += [(s[i], u[:, i], vh[i]) for i in range(k)]
    triplets = sorted(triplets, key=lambda t: -t[0])[:r]
    s = np.array([t[0] for t in triplets])
    u = np_polar(np.stack([t[1] for t in triplets], axis=1))
    v = np_polar(np.stack([t[2] for t in triplets], axis=1))
    return u @ np.diag(s) @ v.T, np.sort(s)[::-1]


def close(actual, expected, tol=1e-10):
    expected = torch.as_tensor(np.ascontiguousarray(expected), dtype=torch.float64)
    return float((actual.double() - expected).abs().max()) <= tol * float(expected.abs().max())


def assert_orthonormal(basis, atol=1e-10):
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    assert torch.allclose(basis.T @ basis, eye, atol=atol)


@pytest.mark.parametrize("case", CASES)
def test_matches_reference_and_spectrum(case):
    shape, count = CASES[case]
    tvs = experts(shape, count)
    merged = registry.get("tsv")(tvs)
    expected, values = tsv_reference(tvs)
    assert merged.shape == shape and merged.dtype == torch.float64
    assert close(merged, expected)
    k = min(shape) // count
    assert int(torch.linalg.matrix_rank(merged)) == count * k
    svals = torch.linalg.svdvals(merged)[: count * k]
    assert close(svals, values)  # the result's singular values are exactly s


@pytest.mark.parametrize("case", CASES)
def test_factors_are_orthonormal_and_keep_each_tasks_top_values(case):
    shape, count = CASES[case]
    tvs = experts(shape, count, seed=1)
    factors = tsv.tsv_factors(tvs)
    k = min(shape) // count
    assert factors.u.shape == (shape[0], count * k) and factors.v.shape == (shape[1], count * k)
    assert_orthonormal(factors.u)
    assert_orthonormal(factors.v)
    tops = torch.cat([torch.linalg.svdvals(t)[:k] for t in tvs])
    assert torch.allclose(factors.s, tops, atol=1e-12)
    assert torch.allclose(factors.matrix(), registry.get("tsv")(tvs), atol=1e-12)


def test_order_invariant():
    tvs = experts((25, 14), 4, seed=2)
    merged = registry.get("tsv")(tvs)
    assert torch.allclose(registry.get("tsv")(tvs[::-1]), merged, atol=1e-10)
    assert torch.allclose(registry.get("tsv")(tvs[1:] + tvs[:1]), merged, atol=1e-10)


def test_one_task_is_reconstructed():
    """T = 1: k = r, the polar factor of an orthonormal basis is itself."""
    tvs = experts((12, 30), 1, seed=3)
    assert torch.allclose(registry.get("tsv")(tvs), tvs[0], atol=1e-10)


@pytest.mark.parametrize("shape", [(3, 10), (10, 3)])
def test_fewer_ranks_than_tasks(shape):
    """r = 3 < T = 5: one triplet per task, the 3 largest kept."""
    tvs = experts(shape, 5, seed=4)
    assert tsv.per_task_rank(3, 5) == 1
    factors = tsv.tsv_factors(tvs)
    assert factors.u.shape == (shape[0], 3) and factors.v.shape == (shape[1], 3)
    assert_orthonormal(factors.u)
    assert_orthonormal(factors.v)
    firsts = torch.stack([torch.linalg.svdvals(t)[0] for t in tvs])
    assert torch.allclose(
        factors.s.sort(descending=True).values, firsts.sort(descending=True).values[:3], atol=1e-12
    )
    merged = registry.get("tsv")(tvs)
    expected, _ = tsv_reference(tvs)
    assert close(merged, expected)
    assert torch.allclose(registry.get("tsv")(tvs[::-1]), merged, atol=1e-10)


def test_identical_experts_keep_the_top_subspace():
    """The polar factor is not unique here; its shared-subspace block is: diag(s_k)."""
    base = experts((24, 16), 1, seed=5)[0]
    count, k = 4, 16 // 4
    merged = registry.get("tsv")([base.clone() for _ in range(count)])
    u, s, vh = torch.linalg.svd(base, full_matrices=False)
    uk, vk = u[:, :k], vh[:k].T
    assert torch.allclose(uk.T @ merged @ vk, torch.diag(s[:k]), atol=1e-8)
    # no cross terms: the rest of the result lives in the complements of both subspaces
    assert float((merged @ vk - uk @ (uk.T @ merged @ vk)).abs().max()) < 1e-8
    assert float((uk.T @ merged - (uk.T @ merged @ vk) @ vk.T).abs().max()) < 1e-8


def test_non_matrix_is_mean_and_dtypes():
    method = registry.get("tsv")
    vecs = [torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert torch.equal(method(vecs), torch.stack(vecs).mean(dim=0))
    tvs32 = experts((30, 12), 3, seed=6, dtype=torch.float32)
    merged = method(tvs32)
    assert merged.dtype == torch.float32
    assert close(merged, tsv_reference(tvs32)[0], tol=1e-4)
    half = method([t.half() for t in tvs32])
    assert half.dtype == torch.float16
    assert close(half, tsv_reference([t.half() for t in tvs32])[0], tol=1e-2)


def test_registry_entry():
    method = registry.get("tsv")
    assert method is tsv.METHOD
    assert method.defaults() == {"rank_cap": "numerical"} and method.default_scale == 1.0
    assert method.other_rule_name == "mean"
