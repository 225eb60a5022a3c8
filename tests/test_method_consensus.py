"""Consensus merging: TALL masks, keep entries that at least k masks select, times tau_MTL."""

from __future__ import annotations

import pytest
import torch

from acemerge.errors import AceMergeError
from acemerge.methods import consensus, registry

# Hand-made example, T = 3, five entries; tau_MTL = [4, 2.5, 4, 8, 3].
TVS = [
    torch.tensor([1.0, 2.0, 0.0, 3.0, -1.0]),
    torch.tensor([1.0, 1.0, 0.0, 2.0, 2.0]),
    torch.tensor([2.0, -0.5, 4.0, 3.0, 2.0]),
]
# lam 0.5: masks per entry (task 1, 2, 3): FFT, TTF, FFT, TFT, FTT -> votes 1, 2, 1, 2, 2
EXPECTED = torch.tensor([0.0, 2.5, 0.0, 8.0, 3.0])


def test_registered_with_defaults() -> None:
    method = registry.get("consensus")
    assert method is consensus.METHOD
    assert method.defaults() == {"lam_mask": 0.4, "k": 2}
    assert method.default_scale == 0.3
    assert method.other_rule_name == "consensus"


def test_hand_made_example() -> None:
    method = registry.get("consensus")
    assert torch.equal(method(TVS, lam_mask=0.5), EXPECTED)
    # the matrix rule is the same elementwise rule
    matrix = method([tv.reshape(1, 5) for tv in TVS], lam_mask=0.5)
    assert torch.equal(matrix, EXPECTED.reshape(1, 5))


def test_vote_threshold_k() -> None:
    method = registry.get("consensus")
    task_sum = TVS[0] + TVS[1] + TVS[2]
    assert torch.equal(method(TVS, lam_mask=0.5, k=1), task_sum)  # every entry has a vote
    assert torch.equal(method(TVS, lam_mask=0.5, k=0), task_sum)  # k = 0 is Task Arithmetic
    assert torch.equal(method(TVS, lam_mask=0.5, k=3), torch.zeros(5))


def test_per_task_lambdas() -> None:
    # lambda_1 = 0.1 adds task 1's vote to entries 0 and 4 -> entry 0 is kept
    merged = registry.get("consensus")(TVS, lam_mask=[0.1, 0.5, 0.5])
    assert torch.equal(merged, torch.tensor([4.0, 2.5, 0.0, 8.0, 3.0]))
    with pytest.raises(AceMergeError, match="2 values for 3 tasks"):
        registry.get("consensus")(TVS, lam_mask=[0.1, 0.5])


def test_mask_comparison_is_strict() -> None:
    ones = [torch.ones(3) for _ in range(3)]  # |1| == 0.5 * |3 - 1|: not selected
    assert torch.equal(registry.get("consensus")(ones, lam_mask=0.5), torch.zeros(3))
    # lam 0: a task votes where its entry is nonzero
    tvs = [torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 5.0])]
    assert torch.equal(registry.get("consensus")(tvs, lam_mask=0.0), torch.tensor([2.0, 0.0]))


def test_task_order_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    tvs = [torch.randn(9, 7, generator=gen) for _ in range(4)]
    lambdas = [0.2, 0.4, 0.3, 0.6]
    order = [3, 1, 0, 2]
    method = registry.get("consensus")
    torch.testing.assert_close(
        method(tvs, lam_mask=lambdas),
        method([tvs[i] for i in order], lam_mask=[lambdas[i] for i in order]),
    )


def test_low_precision_and_validation() -> None:
    merged = registry.get("consensus")([tv.to(torch.float16) for tv in TVS], lam_mask=0.5)
    assert merged.dtype == torch.float16
    assert torch.equal(merged.float(), EXPECTED)
    with pytest.raises(AceMergeError, match="lam_mask"):
        registry.get("consensus")(TVS, lam_mask=-0.1)
    with pytest.raises(AceMergeError, match="parameter 'k'"):
        registry.get("consensus")(TVS, k=-1)
