"""FroM: the mean of the task vectors weighted by ||tau_t||_F^k."""

from __future__ import annotations

import pytest
import torch

from acemerge.errors import AceMergeError
from acemerge.methods import fro_m, registry

# ||D1||_F = 5, ||D2||_F = 1
D1 = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
D2 = torch.tensor([[0.0, 0.0], [0.0, 1.0]])


def test_registered_with_defaults() -> None:
    method = registry.get("from")
    assert method is fro_m.METHOD
    assert method.defaults() == {"k": 2.0}
    assert method.default_scale == 1.0
    assert method.other_rule_name == "from"


@pytest.mark.parametrize(
    ("k", "expected"),
    [
        (2.0, torch.tensor([[75.0, 0.0], [0.0, 101.0]]) / 26),  # weights 25 : 1
        (1.0, torch.tensor([[15.0, 0.0], [0.0, 21.0]]) / 6),  # weights 5 : 1
        (0.0, torch.tensor([[1.5, 0.0], [0.0, 2.5]])),  # k = 0: plain mean
    ],
)
def test_norm_weights_hand_made(k: float, expected: torch.Tensor) -> None:
    torch.testing.assert_close(registry.get("from")([D1, D2], k=k), expected)
    # non-matrix parameters get the same rule
    torch.testing.assert_close(
        registry.get("from")([D1.reshape(-1), D2.reshape(-1)], k=k), expected.reshape(-1)
    )


def test_weights_sum_to_one() -> None:
    weights = fro_m.norm_weights([D1, D2, 2 * D2], 2.0)
    torch.testing.assert_close(weights, torch.tensor([25.0, 1.0, 4.0], dtype=torch.float64) / 30)


def test_zero_task_vectors_are_safe() -> None:
    zero = torch.zeros(2, 2)
    merged = registry.get("from")([zero, zero, zero])
    assert torch.equal(merged, zero)
    assert torch.equal(registry.get("from")([zero, zero], k=0.0), zero)
    # a zero task vector gets weight 0 for k > 0, and counts in the mean for k = 0
    torch.testing.assert_close(registry.get("from")([D1, zero]), D1)
    torch.testing.assert_close(registry.get("from")([D1, zero], k=0.0), D1 / 2)


def test_huge_norms_do_not_overflow() -> None:
    big = [D1 * 1e30, D2 * 1e30]  # ||.||^12 would overflow even float64
    merged = registry.get("from")(big, k=12.0)
    assert torch.isfinite(merged).all()
    torch.testing.assert_close(merged, registry.get("from")([D1, D2], k=12.0) * 1e30)


def test_task_order_invariant() -> None:
    gen = torch.Generator().manual_seed(0)
    tvs = [torch.randn(6, 5, generator=gen) * s for s in (0.5, 1.0, 2.0, 3.0)]
    method = registry.get("from")
    torch.testing.assert_close(method(tvs), method([tvs[i] for i in (2, 0, 3, 1)]))


def test_low_precision_and_validation() -> None:
    merged = registry.get("from")([D1.to(torch.bfloat16), D2.to(torch.bfloat16)])
    assert merged.dtype == torch.bfloat16
    torch.testing.assert_close(merged.float(), (25 * D1 + D2) / 26, atol=0.02, rtol=0.01)
    with pytest.raises(AceMergeError, match="parameter 'k'"):
        registry.get("from")([D1, D2], k=-1.0)
