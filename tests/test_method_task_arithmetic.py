"""Task Arithmetic: the merged task vector is the sum of the task vectors."""

from __future__ import annotations

import pytest
import torch

from acemerge.errors import AceMergeError
from acemerge.methods import registry, task_arithmetic


def _vectors(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_registered_with_defaults() -> None:
    method = registry.get("task_arithmetic")
    assert method is task_arithmetic.METHOD
    assert method.default_scale == 0.3
    assert method.defaults() == {"weight": 1.0, "normalize": False}
    assert method.other_rule_name == "sum"


def test_hand_made_sum() -> None:
    tvs = [torch.tensor([[1.0, -2.0], [0.5, 0.0]]), torch.tensor([[3.0, 1.0], [-0.5, 4.0]])]
    merged = registry.get("task_arithmetic")(tvs)
    assert torch.equal(merged, torch.tensor([[4.0, -1.0], [0.0, 4.0]]))


@pytest.mark.parametrize("shape", [(6, 5), (7,), (2, 3, 4)])
def test_sum_for_every_parameter_kind(shape: tuple[int, ...]) -> None:
    tvs = _vectors(shape)
    merged = registry.get("task_arithmetic")(tvs)
    torch.testing.assert_close(merged, tvs[0] + tvs[1] + tvs[2])


def test_task_order_invariant() -> None:
    tvs = _vectors((8, 4), n=4)
    method = registry.get("task_arithmetic")
    torch.testing.assert_close(method(tvs), method(tvs[::-1]))


def test_low_precision_inputs_accumulate_in_float32() -> None:
    # 256 + 1 + ... is not representable in bfloat16 step by step; in float32 it is.
    tvs = [torch.tensor([256.0], dtype=torch.bfloat16)] + [
        torch.tensor([1.0], dtype=torch.bfloat16) for _ in range(4)
    ]
    merged = registry.get("task_arithmetic")(tvs)
    assert merged.dtype == torch.bfloat16
    assert float(merged) == float(torch.tensor(260.0, dtype=torch.bfloat16))
    assert float(task_arithmetic.task_sum(tvs)) == 260.0


def test_rejects_parameters() -> None:
    with pytest.raises(AceMergeError, match="unknown parameter"):
        registry.get("task_arithmetic")(_vectors((2, 2)), lam=1.0)
