"""Task Arithmetic (Ilharco et al. 2023, "Editing models with task arithmetic", arXiv 2212.04089).

The multi-task vector is the sum of the task vectors, tau = sum_t tau_t ("learning via
addition"), for every parameter; the merged weight is W_0 + lam * tau with lam tuned on
validation data in the paper (0.3 is the usual value, hence the default scale).
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.methods.gta import PerTask, per_task
from acemerge.methods.registry import (
    Factored,
    Method,
    MethodParams,
    compute_dtype_of,
    register,
    sum_of,
)
from acemerge.methods.sparsify import weighted_merge

Tensor = torch.Tensor


class TaskArithmeticParams(MethodParams):
    """Per-task weights (mergekit's ``weight``, default 1) and ``normalize``; lam is the
    scale."""

    weight: PerTask = Field(default=1.0, description="per-task weight (a number or a list)")
    normalize: bool = Field(default=False, description="divide by the sum of the weights")


def task_sum(task_vectors: list[Tensor]) -> Tensor:
    """sum_t tau_t, accumulated in float32 at least."""
    return sum_of(task_vectors)


def task_arithmetic_rule(task_vectors: list[Tensor], params: TaskArithmeticParams) -> Tensor:
    """tau = sum_t w_t tau_t (/ sum_t w_t with ``normalize``), the same for every parameter."""
    if params.weight == 1.0 and not params.normalize:
        return task_sum(task_vectors)
    weights = per_task(params.weight, len(task_vectors), "weight")
    dtype = compute_dtype_of(task_vectors[0])
    return weighted_merge([tv.to(dtype) for tv in task_vectors], weights, consensus=False,
                          normalize=params.normalize)


def task_arithmetic_low_rank(factors: list[Factored], params: TaskArithmeticParams
                             ) -> Factored:
    """sum_t w_t L_t R_t = [w_t L_t] [R_t] (/ sum_t w_t): the factors side by side."""
    weights = per_task(params.weight, len(factors), "weight")
    if params.normalize:
        total = sum(weights)
        weights = [w / (total if abs(total) >= 1e-8 else 1.0) for w in weights]
    return Factored(torch.cat([w * f.left for w, f in zip(weights, factors, strict=True)],
                              dim=1), torch.cat([f.right for f in factors]))


METHOD = register(
    Method(
        low_rank_output=True,
        low_rank_rule=task_arithmetic_low_rank,
        name="task_arithmetic",
        params=TaskArithmeticParams,
        matrix_rule=task_arithmetic_rule,
        other_rule=task_arithmetic_rule,
        other_rule_name="sum",
        paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv 2212.04089)",
        summary="sum of the task vectors (scale lam, typically 0.3)",
        default_scale=0.3,
        per_task_params=("weight",),
    )
)
