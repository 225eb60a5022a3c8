"""Task Arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic", arXiv 2212.04089).

The multi-task vector is the sum of the task vectors, tau = sum_t tau_t ("learning via
addition"), for every parameter; the merged weight is W_0 + lam * tau with lam tuned on
validation data in the paper (0.3 is the usual value, hence the default scale).
"""

from __future__ import annotations

import torch

from acemerge.methods.registry import Method, MethodParams, register, sum_of

Tensor = torch.Tensor


class TaskArithmeticParams(MethodParams):
    """Task Arithmetic has no parameters besides the scale lam."""


def task_sum(task_vectors: list[Tensor]) -> Tensor:
    """sum_t tau_t, accumulated in float32 at least."""
    return sum_of(task_vectors)


def task_arithmetic_rule(task_vectors: list[Tensor], params: TaskArithmeticParams) -> Tensor:
    """tau = sum_t tau_t (the same rule for every parameter)."""
    return task_sum(task_vectors)


METHOD = register(
    Method(
        name="task_arithmetic",
        params=TaskArithmeticParams,
        matrix_rule=task_arithmetic_rule,
        other_rule=task_arithmetic_rule,
        other_rule_name="sum",
        paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)",
        summary="sum of the task vectors (scale lam, typically 0.3)",
        default_scale=0.3,
    )
)
