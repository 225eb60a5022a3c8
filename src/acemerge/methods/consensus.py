"""Consensus Task Arithmetic with TALL masks (Wang et al. 2024, "Localizing task information
for improved model merging and compression", arXiv 2405.07813, ICML 2024).

Elementwise, for every parameter:
- multi-task vector tau_MTL = sum_t tau_t;
- TALL mask of task t: m_t = 1{|tau_t| > lambda_t * |tau_MTL - tau_t|} (the entries where
  task t dominates the other tasks' contribution);
- consensus mask: entries selected by at least k task masks (k = 2 drops "selfish" weights
  used by one task only and "catastrophic" weights used by none);
- merged task vector: m_consensus * tau_MTL, scaled by lam (tuned like Task Arithmetic,
  hence the default scale 0.3).

The comparison is strict, as in METHODS.md and the authors' released code; it differs from
>= only on exact ties, e.g. with lam_mask = 0 it keeps entries where at least k task
vectors are nonzero. Masks are elementwise, so per-parameter and whole-model masking agree.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field, field_validator

from acemerge.errors import AceMergeError
from acemerge.methods.registry import Method, MethodParams, register
from acemerge.methods.task_arithmetic import task_sum

Tensor = torch.Tensor


class ConsensusParams(MethodParams):
    """Consensus merging's parameters; k = 2 as in the paper, lambda in its 0.2-0.6 range."""

    lam_mask: float | tuple[float, ...] = Field(
        default=0.4,
        description="TALL-mask lambda_t: one value for all tasks, or one per task",
    )
    k: int = Field(default=2, ge=0, description="minimum number of task masks per entry")

    @field_validator("lam_mask")
    @classmethod
    def _nonnegative(cls, value: float | tuple[float, ...]) -> float | tuple[float, ...]:
        values = value if isinstance(value, tuple) else (value,)
        if not values or not all(math.isfinite(v) and v >= 0 for v in values):
            raise ValueError("lambda values must be finite and >= 0")
        return value


def mask_lambdas(lam_mask: float | tuple[float, ...], n_tasks: int) -> tuple[float, ...]:
    """lambda_t for each task: a shared value repeated, or the per-task values checked."""
    if not isinstance(lam_mask, tuple):
        return (float(lam_mask),) * n_tasks
    if len(lam_mask) != n_tasks:
        raise AceMergeError(
            f"method 'consensus': lam_mask has {len(lam_mask)} values for {n_tasks} tasks"
        )
    return lam_mask


def consensus_rule(task_vectors: list[Tensor], params: ConsensusParams) -> Tensor:
    """m_consensus * tau_MTL, elementwise (the same rule for every parameter)."""
    total = task_sum(task_vectors)  # tau_MTL
    lambdas = mask_lambdas(params.lam_mask, len(task_vectors))
    votes = torch.zeros(total.shape, dtype=torch.int64, device=total.device)
    for tv, lam in zip(task_vectors, lambdas, strict=True):
        delta = tv.to(total.dtype)
        votes += delta.abs() > lam * (total - delta).abs()  # TALL mask m_t
    return torch.where(votes >= params.k, total, 0.0)  # consensus mask times tau_MTL


METHOD = register(
    Method(
        name="consensus",
        params=ConsensusParams,
        matrix_rule=consensus_rule,
        other_rule=consensus_rule,
        other_rule_name="consensus",
        paper="Wang et al. 2024, Localizing task information for improved model merging "
        "and compression (arXiv 2405.07813, ICML 2024)",
        summary="task arithmetic restricted to entries that at least k TALL masks select",
        default_scale=0.3,
    )
)
