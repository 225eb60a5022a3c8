"""The methods mergekit users expect, each by its defining property (the oracle test compares
them with mergekit itself: tests/test_mergekit_oracle.py)."""

from __future__ import annotations

import math

import pytest
import torch

from acemerge import AceMergeError
from acemerge.methods import get
from acemerge.methods.sparsify import della_mask, magnitude_mask, outlier_mask


def tvs(count=3, shape=(20, 30), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) * (i + 1)
            for i in range(count)]


def test_linear_is_the_weighted_average_of_the_weights():
    base = torch.randn(5, 4, dtype=torch.float64)
    deltas = tvs(3, (5, 4))
    weights = [1.0, 0.5, 2.0]
    merged = get("linear")(deltas, base=base, weight=weights)
    expected = sum(w * (base + d) for w, d in zip(weights, deltas, strict=True)) / 3.5
    torch.testing.assert_close(base + merged, expected)
    raw = get("linear")(deltas, base=base, weight=weights, normalize=False)
    torch.testing.assert_close(base + raw, expected * 3.5)


def test_slerp_endpoints_and_constant_norm_on_a_great_circle():
    base = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    other = torch.tensor([[0.0, 1.0]], dtype=torch.float64)
    slerp = get("slerp")
    assert torch.allclose(base + slerp([other - base], base=base, t=0.0), base)
    assert torch.allclose(base + slerp([other - base], base=base, t=1.0), other)
    half = base + slerp([other - base], base=base, t=0.5)
    assert torch.allclose(half, torch.tensor([[math.sqrt(0.5)] * 2], dtype=torch.float64))
    assert float(half.norm()) == pytest.approx(1.0)  # linear interpolation would give 0.707
    with pytest.raises(AceMergeError, match="at most 1"):
        from acemerge.engine import check_expert_count

        check_expert_count(slerp, 2)


def test_model_stock_ratio_from_the_angle():
    stock = get("model_stock")
    same = tvs(1)[0]
    # identical task vectors: cos = 1, t = 1, the average itself
    torch.testing.assert_close(stock([same, same.clone()]), same)
    # orthogonal task vectors: cos = 0, t = 0, the base
    a = torch.zeros(4, 4, dtype=torch.float64)
    b = torch.zeros(4, 4, dtype=torch.float64)
    a[0, 0], b[1, 1] = 1.0, 2.0
    assert torch.count_nonzero(stock([a, b])) == 0
    # two vectors at cos 0.5: t = 2 * 0.5 / (1 + 0.5) = 2/3
    u = torch.tensor([1.0, 0.0], dtype=torch.float64)
    v = torch.tensor([0.5, math.sqrt(0.75)], dtype=torch.float64)
    torch.testing.assert_close(stock([u, v]), (2 / 3) * (u + v) / 2)


def test_magmax_takes_the_largest_magnitude_per_entry():
    vectors = tvs(4, (7, 9), seed=3)
    stacked = torch.stack(vectors)
    index = stacked.abs().argmax(dim=0, keepdim=True)
    expected = stacked.gather(0, index)[0]
    torch.testing.assert_close(get("magmax")(vectors), expected)


def test_breadcrumbs_mask_drops_outliers_then_small_entries():
    x = torch.arange(1, 101, dtype=torch.float64)  # magnitudes 1..100
    mask = outlier_mask(x, density=0.5, gamma=0.1)
    kept = x[mask.bool()]
    assert kept.numel() == 50 and kept.max() == 90 and kept.min() == 41


def test_magnitude_mask_keeps_int_density_n_at_least_one():
    x = torch.arange(1, 11, dtype=torch.float64)
    assert magnitude_mask(x, 0.25).sum() == 2  # int(2.5) = 2, mergekit's rounding
    assert magnitude_mask(x, 0.01).sum() == 1
    assert x[magnitude_mask(x, 0.3).bool()].tolist() == [8.0, 9.0, 10.0]


def test_della_keep_rate_rises_with_magnitude_rank():
    rows = torch.arange(1, 201, dtype=torch.float64).repeat(400, 1)  # 400 rows, ranks 0..199
    mask = della_mask(rows, density=0.5, epsilon=0.3, generator=torch.Generator().manual_seed(1))
    rate = mask.mean(dim=0)
    assert float(rate[:20].mean()) == pytest.approx(0.23, abs=0.04)  # ~density - epsilon
    assert float(rate[-20:].mean()) == pytest.approx(0.77, abs=0.04)  # ~density + epsilon
    assert float(mask.mean()) == pytest.approx(0.5, abs=0.02)
    with pytest.raises(AceMergeError, match="della"):
        della_mask(rows, density=0.9, epsilon=0.2, generator=torch.Generator())


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_rescale_to_the_l1_norm(method):
    vectors = tvs(1, (50, 60))
    merged = get(method)([vectors[0], torch.zeros_like(vectors[0])], density=0.3,
                         weight=[1.0, 0.0], epsilon=0.1)
    assert float(merged.abs().sum()) == pytest.approx(float(vectors[0].abs().sum()), rel=1e-9)
    assert 0.2 < float((merged != 0).double().mean()) < 0.4


def test_ties_mergekit_semantics_weights_and_zero_sum():
    a = torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([-1.0, 2.0, 1.0], dtype=torch.float64)
    merged = get("ties")([a, b], semantics="mergekit", weight=[1.0, 2.0])
    # weighted: a = [1, -2, 3], 2b = [-2, 4, 2]; sums [-1, 2, 5] elect [-, +, +]
    torch.testing.assert_close(merged, torch.tensor([-1.0, 2.0, 5.0 / 3.0],
                                                    dtype=torch.float64))
    tie = get("ties")([a[:1], -a[:1]], semantics="mergekit")  # zero sum elects +
    torch.testing.assert_close(tie, a[:1])
    with pytest.raises(AceMergeError, match="semantics='mergekit'"):
        get("ties").validate({"weight": [1.0, 2.0]})


def test_task_arithmetic_per_task_weights():
    vectors = tvs(3)
    merged = get("task_arithmetic")(vectors, weight=[0.5, 1.0, 2.0])
    torch.testing.assert_close(merged, 0.5 * vectors[0] + vectors[1] + 2 * vectors[2])
    with pytest.raises(AceMergeError, match="3 values for 2"):
        get("task_arithmetic")(vectors[:2], weight=[1.0, 1.0, 1.0])


def test_dare_per_task_weights_scale_each_sparsified_vector():
    vectors = tvs(3)
    dare = get("dare")
    unweighted = [dare([tv if i == t else torch.zeros_like(tv) for i, tv in enumerate(vectors)])
                  for t in range(3)]
    weighted = dare(vectors, weight=[0.5, 1.0, 2.0])
    torch.testing.assert_close(weighted, 0.5 * unweighted[0] + unweighted[1]
                               + 2 * unweighted[2])
