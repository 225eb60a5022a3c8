"""Fisher merging (Matena & Raffel, NeurIPS 2022, "Merging Models with Fisher-Weighted
Averaging", arXiv 2111.09832).

Every parameter, matrix or not, is a per-entry average weighted by each task's diagonal
Fisher F_t (mean squared gradient of the log-likelihood, shaped like the parameter;
collected with ``acemerge.statistics.collect_statistics(..., kinds=("fishers",))``):

    W = sum_t F_t W_t / sum_t F_t                               (elementwise)

In task-vector form, D = sum_t F_t D_t / sum_t F_t with D_t = W_t - W_0 (identical, since
the weights F_t / sum_t F_t sum to one per entry). The paper uses equal merging
coefficients by default; so does this implementation.

Zero Fishers: as in the authors' code each Fisher is floored, F_t <- max(F_t, floor), so an
entry no task's data moved (every F_t <= floor) gets exactly the plain mean. With
``fisher_floor=0`` an entry whose Fishers sum to 0 gets the plain mean too. The floor is
absolute: Fishers far below it (very large models, few samples) are flattened towards the
mean, so lower it then.
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.errors import AceMergeError
from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register

Tensor = torch.Tensor


class FisherParams(MethodParams):
    """Fisher merging's parameter: the floor applied to every Fisher entry."""

    fisher_floor: float = Field(
        default=1e-6,
        ge=0,
        description="each Fisher entry is raised to at least this (the authors' 1e-6); "
        "entries where all are at the floor get the plain mean",
    )


def check_fishers(task_vectors: list[Tensor], fishers: list[Tensor]) -> None:
    """One Fisher per task vector, shaped like it."""
    if len(fishers) != len(task_vectors):
        raise AceMergeError(
            f"method 'fisher': {len(fishers)} Fishers for {len(task_vectors)} task vectors"
        )
    shape = tuple(task_vectors[0].shape)
    for task, fisher in enumerate(fishers):
        if tuple(fisher.shape) != shape:
            raise AceMergeError(
                f"method 'fisher': the Fisher of task {task} has shape "
                f"{tuple(fisher.shape)}, the parameter has {shape}"
            )


def fisher_rule(task_vectors: list[Tensor], params: FisherParams,
                fishers: list[Tensor]) -> Tensor:
    """Fisher-weighted average of the task vectors of one parameter (any shape)."""
    check_fishers(task_vectors, fishers)
    dtype = compute_dtype_of(task_vectors[0])
    numerator = torch.zeros_like(task_vectors[0], dtype=dtype)
    denominator = torch.zeros_like(numerator)
    mean = torch.zeros_like(numerator)
    for tv, fisher in zip(task_vectors, fishers, strict=True):
        weight = fisher.to(dtype).clamp_min(params.fisher_floor)  # max(F_t, floor)
        numerator += weight * tv.to(dtype)  # sum_t F_t D_t
        denominator += weight  # sum_t F_t
        mean += tv.to(dtype)
    mean /= len(task_vectors)
    covered = denominator > 0
    return torch.where(covered, numerator / torch.where(covered, denominator, 1.0), mean)


METHOD = register(
    Method(
        name="fisher",
        params=FisherParams,
        matrix_rule=fisher_rule,
        other_rule=fisher_rule,
        other_rule_name="fisher",
        paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging "
        "(arXiv 2111.09832)",
        summary="per-entry average weighted by each task's diagonal Fisher (needs data)",
        matrix_needs=("fishers",),
        other_needs=("fishers",),
    )
)
