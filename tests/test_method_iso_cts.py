"""Iso-CTS: the common-space size, orthonormal factors, a flat spectrum, a float64 transcription."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acemerge import AceMergeError
from acemerge.methods import iso_c, iso_cts, registry
from tests.factories import experts, np_polar

# (shape, task count, expected k_c at common_fraction 0.8), worked out by hand:
# r - floor(0.8 r) moved to the nearest multiple of T.
CASES = {
    "tall": ((30, 12), 3, 9),  # 12 - 9 = 3 -> 3
    "wide": ((14, 30), 4, 10),  # 14 - 11 = 3 -> 4
    "square": ((24, 24), 5, 19),  # 24 - 19 = 5 -> 5
    "square-round-down": ((30, 30), 4, 22),  # 30 - 24 = 6 -> 8 (6/4 = 1.5 rounds to 2)
    "all-common": ((10, 16), 4, 10),  # 10 - 8 = 2 -> 0 (2/4 = 0.5 rounds to 0)
}






def iso_cts_reference(tvs, k_c):
    """The paper's steps in numpy float64, given the common-space size."""
    mats = [t.double().numpy() for t in tvs]
    r = min(mats[0].shape)
    n = (r - k_c) // len(mats)
    u, s, vh = np.linalg.svd(sum(mats), full_matrices=False)
    us, ss, vs = [u[:, :k_c]], [s[:k_c]], [vh[:k_c].T]
    for m in mats:
        left = m - u[:, :k_c] @ u[:, :k_c].T @ m
        ut, st, vht = np.linalg.svd(left, full_matrices=False)
        us.append(ut[:, :n])
        ss.append(st[:n])
        vs.append(vht[:n].T)
    values = np.concatenate(ss)
    assert values.size == r
    return values.mean() * np_polar(np.hstack(us)) @ np_polar(np.hstack(vs)).T, values


def close(actual, expected, tol=1e-10):
    expected = torch.as_tensor(np.ascontiguousarray(expected), dtype=torch.float64)
    return float((actual.double() - expected).abs().max()) <= tol * float(expected.abs().max())


def assert_orthonormal(basis, atol=1e-10):
    eye = torch.eye(basis.shape[1], dtype=basis.dtype)
    assert torch.allclose(basis.T @ basis, eye, atol=atol)


@pytest.mark.parametrize("case", CASES)
def test_common_rank(case):
    shape, count, k_c = CASES[case]
    assert iso_cts.common_rank(min(shape), count, 0.8) == k_c


def test_common_rank_always_divides():
    for r in range(1, 60):
        for count in range(1, 12):
            for fraction in (0.0, 0.3, 0.8, 0.95, 1.0):
                k_c = iso_cts.common_rank(r, count, fraction)
                assert 0 <= k_c <= r and (r - k_c) % count == 0
    assert iso_cts.common_rank(15, 10, 0.0) == 5  # round(1.5) * 10 = 20 > 15: capped at 10


@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case):
    shape, count, k_c = CASES[case]
    tvs = experts(shape, count)
    merged = registry.get("iso_cts")(tvs)
    expected, _ = iso_cts_reference(tvs, k_c)
    assert merged.shape == shape and merged.dtype == torch.float64
    assert close(merged, expected)


@pytest.mark.parametrize("case", CASES)
def test_orthonormal_factors_and_flat_spectrum(case):
    shape, count, k_c = CASES[case]
    tvs = experts(shape, count, seed=1)
    factors = iso_cts.iso_cts_factors(tvs)
    r = min(shape)
    assert factors.u.shape == (shape[0], r) and factors.v.shape == (shape[1], r)
    assert_orthonormal(factors.u)
    assert_orthonormal(factors.v)
    _, values = iso_cts_reference(tvs, k_c)
    assert torch.allclose(factors.s, torch.from_numpy(values), rtol=1e-10)
    s_merged = torch.linalg.svdvals(registry.get("iso_cts")(tvs))
    assert torch.allclose(
        s_merged, torch.full((r,), float(values.mean()), dtype=s_merged.dtype), rtol=1e-10
    )


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_reduces_to_iso_c(shape):
    tvs = experts(shape, 3, seed=2)
    expected = registry.get("iso_c")(tvs)
    assert torch.allclose(registry.get("iso_cts")(tvs, common_fraction=1.0), expected, atol=1e-10)
    single = experts(shape, 1, seed=3)  # T = 1: common + task-specific = all of D's SVD
    assert torch.allclose(
        registry.get("iso_cts")(single), iso_c.iso_c_matrix(single, iso_c.IsoCParams()), atol=1e-10
    )
    assert not torch.allclose(registry.get("iso_cts")(tvs), expected, atol=1e-3)


def test_order_invariant():
    tvs = experts((24, 24), 5, seed=4)
    merged = registry.get("iso_cts")(tvs)
    assert torch.allclose(registry.get("iso_cts")(tvs[::-1]), merged, atol=1e-10)
    assert torch.allclose(registry.get("iso_cts")(tvs[2:] + tvs[:2]), merged, atol=1e-10)


def test_identical_experts_keep_the_top_subspace():
    """Shared directions: the polar factor is not unique, its top block is sigma_bar I."""
    base = experts((30, 12), 1, seed=5)[0]
    count, k_c, n = 3, 9, 1
    merged = registry.get("iso_cts")([base.clone() for _ in range(count)])
    u, s, vh = torch.linalg.svd(base, full_matrices=False)
    top = k_c + n
    ut, vt = u[:, :top], vh[:top].T
    # common values come from the sum (count * s), task-specific ones from each copy
    sigma_bar = float(count * s[:top].sum() / 12)
    assert torch.allclose(
        ut.T @ merged @ vt, sigma_bar * torch.eye(top, dtype=merged.dtype), atol=1e-8
    )
    assert float((merged @ vt - ut @ (ut.T @ merged @ vt)).abs().max()) < 1e-8
    assert float((ut.T @ merged - (ut.T @ merged @ vt) @ vt.T).abs().max()) < 1e-8


def test_non_matrix_is_mean_and_dtypes():
    method = registry.get("iso_cts")
    vecs = [torch.randn(9, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert torch.equal(method(vecs), torch.stack(vecs).mean(dim=0))
    tvs32 = experts((30, 12), 3, seed=6, dtype=torch.float32)
    merged = method(tvs32)
    assert merged.dtype == torch.float32
    assert close(merged, iso_cts_reference(tvs32, 9)[0], tol=1e-4)
    bf16 = [t.bfloat16() for t in tvs32]
    assert method(bf16).dtype == torch.bfloat16
    assert close(method(bf16), iso_cts_reference(bf16, 9)[0], tol=1e-2)


def test_registry_entry_and_validation():
    method = registry.get("iso_cts")
    assert method is iso_cts.METHOD
    assert method.defaults() == {"common_fraction": 0.8}
    assert method.default_scale == 1.0 and method.other_rule_name == "mean"
    with pytest.raises(AceMergeError, match="common_fraction"):
        method(experts((6, 5), 2), common_fraction=1.2)
