"""CART: agreement with a float64 transcription, the task-count defaults, limiting cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from acemerge import AceMergeError
from acemerge.methods import cart, registry
from tests.factories import experts

SHAPES = {"tall": (30, 12), "wide": (12, 30), "square": (20, 20)}
# The paper's (lam, rho) per benchmark size, written out here independently of the module.
PAPER_SETTINGS = {
    3: (2.0, 0.12),
    8: (2.0, 0.12),
    9: (1.5, 0.16),
    14: (1.5, 0.16),
    15: (1.9, 0.32),
    20: (1.9, 0.32),
}




def cart_reference(tvs, lam, rho):
    """D_avg + lam * sum_t SVD_k(D_t - D_avg), k = max(1, int(rho r)), in numpy float64."""
    mats = [t.double().numpy() for t in tvs]
    mean = sum(mats) / len(mats)
    k = max(1, int(rho * min(mean.shape)))
    low = np.zeros_like(mean)
    for m in mats:
        u, s, vh = np.linalg.svd(m - mean, full_matrices=False)
        low += u[:, :k] @ np.diag(s[:k]) @ vh[:k]
    return mean + lam * low


def close(actual, expected, tol=1e-10):
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return float((actual.double() - expected).abs().max()) <= tol * float(expected.abs().max())


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("count", sorted(PAPER_SETTINGS))
def test_defaults_follow_task_count_and_match_reference(shape_name, count):
    tvs = experts(SHAPES[shape_name], count)
    lam, rho = PAPER_SETTINGS[count]
    merged = registry.get("cart")(tvs)
    assert merged.shape == tvs[0].shape and merged.dtype == torch.float64
    assert close(merged, cart_reference(tvs, lam, rho))
    explicit = registry.get("cart")(tvs, rank_fraction=rho, lam_c=lam)
    assert torch.equal(merged, explicit)


@pytest.mark.parametrize("shape_name", SHAPES)
def test_user_values_and_rho_alias(shape_name):
    tvs = experts(SHAPES[shape_name], 4, seed=1)
    merged = registry.get("cart")(tvs, rho=0.3, lam_c=0.7)
    assert close(merged, cart_reference(tvs, 0.7, 0.3))
    assert torch.equal(merged, registry.get("cart")(tvs, rank_fraction=0.3, lam_c=0.7))
    only_lam = registry.get("cart")(tvs, lam_c=0.5)  # rho from the task count (0.12)
    assert close(only_lam, cart_reference(tvs, 0.5, 0.12))


@pytest.mark.parametrize("shape_name", SHAPES)
def test_rank_zero_and_full_rank_give_the_mean(shape_name):
    tvs = experts(SHAPES[shape_name], 5, seed=2)
    mean = torch.stack(tvs).mean(dim=0)
    zero_rank = registry.get("cart")(tvs, rank_fraction=0.0, lam_c=2.0)
    assert torch.allclose(zero_rank, mean, rtol=0, atol=1e-12)  # summation order only
    # k = r: the centered task vectors sum to zero, so the low-rank term vanishes.
    full = registry.get("cart")(tvs, rank_fraction=1.0, lam_c=2.0)
    assert torch.allclose(full, mean, atol=1e-10)
    assert not torch.allclose(registry.get("cart")(tvs), mean, atol=1e-3)


def test_rank_rule():
    assert cart.cart_rank(0.0, (30, 12)) == 0
    assert cart.cart_rank(0.01, (30, 12)) == 1  # max(1, int(0.12))
    assert cart.cart_rank(0.12, (30, 12)) == 1  # int(1.44)
    assert cart.cart_rank(0.32, (100, 25)) == 8
    assert cart.cart_rank(1.0, (12, 30)) == 12


def test_low_rank_term_has_the_right_rank():
    tvs = experts((30, 12), 3, seed=3)
    mean = torch.stack(tvs).mean(dim=0)
    for k in (1, 2, 3):
        for tv in tvs:
            assert int(torch.linalg.matrix_rank(cart.truncated_svd(tv - mean, k))) == k
        term = cart.low_rank_term(tvs, k)
        assert int(torch.linalg.matrix_rank(term)) == 3 * k  # T k independent directions
    assert torch.equal(cart.low_rank_term(tvs, 0), torch.zeros_like(mean))


def test_two_tasks_is_the_mean():
    """With T = 2 the centered task vectors are negatives of each other: the terms cancel."""
    tvs = experts((20, 20), 2, seed=4)
    assert torch.allclose(registry.get("cart")(tvs), torch.stack(tvs).mean(dim=0), atol=1e-10)


def test_order_invariant_and_identical_experts():
    tvs = experts((30, 12), 5, seed=5)
    merged = registry.get("cart")(tvs)
    assert torch.allclose(registry.get("cart")(tvs[::-1]), merged, atol=1e-10)
    same = [tvs[0].clone() for _ in range(6)]
    assert torch.allclose(registry.get("cart")(same), tvs[0], atol=1e-12)


def test_non_matrix_is_mean_and_dtypes():
    method = registry.get("cart")
    vecs = [torch.randn(7, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    assert torch.equal(method(vecs), torch.stack(vecs).mean(dim=0))
    tvs32 = experts((30, 12), 4, seed=6, dtype=torch.float32)
    assert close(method(tvs32), cart_reference(tvs32, 2.0, 0.12), tol=1e-5)
    bf16 = [t.to(torch.bfloat16) for t in tvs32]
    merged = method(bf16)
    assert merged.dtype == torch.bfloat16
    assert close(merged, cart_reference(bf16, 2.0, 0.12), tol=1e-2)


def test_registry_entry_and_validation():
    method = registry.get("cart")
    assert method is cart.METHOD
    assert method.defaults() == {"rank_fraction": None, "lam_c": None}
    assert method.default_scale == 1.0 and method.other_rule_name == "mean"
    tvs = experts((6, 5), 2)
    with pytest.raises(AceMergeError, match="rank_fraction"):
        method(tvs, rank_fraction=1.5)
    with pytest.raises(AceMergeError, match="unknown parameter 'lam'"):
        method(tvs, lam=1.0)
    with pytest.raises(AceMergeError):
        method(tvs, lam_c=float("nan"))
