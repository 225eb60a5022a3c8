"""Iso-C: a flat spectrum on the singular subspaces of the sum, a float64 transcription."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acemerge.methods import iso_c, registry
from tests.factories import experts

SHAPES = {"tall": (30, 12), "wide": (12, 30), "square": (20, 20)}




def low_rank_experts(shape, count, rank, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [
        torch.randn(shape[0], rank, generator=gen, dtype=torch.float64)
        @ torch.randn(rank, shape[1], generator=gen, dtype=torch.float64)
        for _ in range(count)
    ]


def iso_c_reference(tvs):
    """mean(sigma) U V^T of the sum, in numpy float64."""
    total = sum(t.double().numpy() for t in tvs)
    u, s, vh = np.linalg.svd(total, full_matrices=False)
    return s.mean() * (u @ vh)


def close(actual, expected, tol=1e-10):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return float((actual.double() - expected).abs().max()) <= tol * float(expected.abs().max())


def projector(basis):
    return basis @ basis.T


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("count", [1, 3, 8])
def test_matches_reference(shape_name, count):
    tvs = experts(SHAPES[shape_name], count)
    merged = registry.get("iso_c")(tvs)
    assert merged.shape == tvs[0].shape and merged.dtype == torch.float64
    assert close(merged, iso_c_reference(tvs))


@pytest.mark.parametrize("shape_name", SHAPES)
def test_flat_spectrum_on_the_sums_subspaces(shape_name):
    tvs = experts(SHAPES[shape_name], 4, seed=1)
    total = torch.stack(tvs).sum(dim=0)
    merged = registry.get("iso_c")(tvs)
    u_sum, s_sum, vh_sum = torch.linalg.svd(total, full_matrices=False)
    u_m, s_m, vh_m = torch.linalg.svd(merged, full_matrices=False)
    assert torch.allclose(s_m, torch.full_like(s_m, float(s_sum.mean())), rtol=1e-10)
    assert torch.allclose(projector(u_m), projector(u_sum), atol=1e-10)
    assert torch.allclose(projector(vh_m.T), projector(vh_sum.T), atol=1e-10)
    # same singular vectors, not only the same subspaces: merged = sigma_bar U V^T
    assert torch.allclose(
        u_sum.T @ merged @ vh_sum.T,
        float(s_sum.mean()) * torch.eye(len(s_sum), dtype=merged.dtype),
        atol=1e-10,
    )


def test_order_invariant_and_identical_experts():
    tvs = experts((30, 12), 5, seed=2)
    merged = registry.get("iso_c")(tvs)
    assert torch.allclose(registry.get("iso_c")(tvs[::-1]), merged, atol=1e-10)
    one = registry.get("iso_c")(tvs[:1])
    same = registry.get("iso_c")([tvs[0].clone() for _ in range(6)])
    assert torch.allclose(same, 6 * one, atol=1e-10)  # the sum is 6 D: sigma_bar scales by 6


@pytest.mark.parametrize("shape_name", SHAPES)
def test_rank_deficient_sums(shape_name):
    shape = SHAPES[shape_name]
    tvs = low_rank_experts(shape, 2, rank=2, seed=3)  # sum of rank 4 < r
    s_sum = torch.linalg.svdvals(torch.stack(tvs).sum(dim=0))
    r = min(shape)
    by_rank = registry.get("iso_c")(tvs, flatten_over="rank")
    s_rank = torch.linalg.svdvals(by_rank)
    assert torch.allclose(
        s_rank[:4], torch.full((4,), float(s_sum[:4].mean()), dtype=s_rank.dtype), rtol=1e-10
    )
    assert float(s_rank[4:].abs().max()) < 1e-10 * float(s_rank[0])
    default = registry.get("iso_c")(tvs)  # the authors' mean over all r values
    assert torch.allclose(
        torch.linalg.svdvals(default),
        torch.full((r,), float(s_sum.sum()) / r, dtype=s_sum.dtype),
        rtol=1e-8,
    )


def test_full_rank_options_agree_and_zero_input():
    tvs = experts((20, 20), 3, seed=4)
    assert torch.equal(registry.get("iso_c")(tvs), registry.get("iso_c")(tvs, flatten_over="rank"))
    zeros = [torch.zeros(6, 4), torch.zeros(6, 4)]
    for option in ("all", "rank"):
        assert torch.equal(registry.get("iso_c")(zeros, flatten_over=option), torch.zeros(6, 4))
    assert iso_c.numerical_rank(torch.tensor([3.0, 1e-9, 0.0]), (3, 3)) == 1


def test_non_matrix_is_mean_and_dtypes():
    method = registry.get("iso_c")
    vecs = [torch.randn(9, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert torch.equal(method(vecs), torch.stack(vecs).mean(dim=0))  # the mean, not the sum
    tvs32 = experts((30, 12), 3, seed=5, dtype=torch.float32)
    merged = method(tvs32)
    assert merged.dtype == torch.float32
    assert close(merged, iso_c_reference(tvs32), tol=1e-5)
    bf16 = [t.bfloat16() for t in tvs32]
    assert method(bf16).dtype == torch.bfloat16
    assert close(method(bf16), iso_c_reference(bf16), tol=1e-2)


def test_registry_entry():
    method = registry.get("iso_c")
    assert method is iso_c.METHOD
    assert method.defaults() == {"flatten_over": "all"}
    assert method.default_scale == 1.0 and method.other_rule_name == "mean"
