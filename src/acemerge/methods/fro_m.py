"""FroM (Li et al. 2025, "FroM: Frobenius norm-based data-free adaptive model merging",
arXiv 2506.02478, Findings of EMNLP 2025), the full-fine-tuning form.

Per parameter, minimize sum_t ||tau_t||_F^k ||tau - tau_t||_F^2; the closed-form minimizer
is the norm-weighted mean tau = sum_t w_t tau_t / sum_t w_t with w_t = ||tau_t||_F^k.
k = 0 gives the plain mean; larger k favours the tasks that moved the parameter most.

Default k = 2: w_t is then the task's energy ||tau_t||_F^2 = tr(tau_t^T tau_t), the scalar
summary of the task-vector Gram that RegMean-style data-free merges (EigCov) use; the
paper tunes k, and its recommended value could not be checked here, so treat 2 as a
documented choice. k >= 0 only, so a zero task vector never gets an infinite weight.
Weights are computed in float64 as (||tau_t|| / max_s ||tau_s||)^k, which cannot overflow;
if every task vector is zero the result is zero.
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register

Tensor = torch.Tensor


class FroMParams(MethodParams):
    """FroM's one parameter, the exponent k of the Frobenius-norm weights."""

    k: float = Field(default=2.0, ge=0, description="exponent of ||tau_t||_F in the weights")


def norm_weights(task_vectors: list[Tensor], k: float) -> Tensor:
    """w_t = ||tau_t||_F^k / sum_s ||tau_s||_F^k (float64); all zeros if every norm is 0."""
    norms = torch.stack([torch.linalg.vector_norm(tv, dtype=torch.float64) for tv in task_vectors])
    largest = norms.max()
    if largest == 0:
        return torch.zeros_like(norms)
    raw = (norms / largest) ** k  # 0 ** 0 = 1: with k = 0 a zero vector still counts
    return raw / raw.sum()


def fro_m_rule(task_vectors: list[Tensor], params: FroMParams) -> Tensor:
    """sum_t w_t tau_t with the normalized Frobenius-norm weights."""
    dtype = compute_dtype_of(task_vectors[0])
    weights = norm_weights(task_vectors, params.k).tolist()
    merged = torch.zeros(task_vectors[0].shape, dtype=dtype, device=task_vectors[0].device)
    for weight, tv in zip(weights, task_vectors, strict=True):
        merged += weight * tv.to(dtype)
    return merged


METHOD = register(
    Method(
        low_rank_output=True,
        name="from",
        display_name="FroM",
        params=FroMParams,
        matrix_rule=fro_m_rule,
        other_rule=fro_m_rule,
        other_rule_name="from",
        paper="Li et al. 2025, FroM: Frobenius norm-based data-free adaptive model merging "
        "(arXiv 2506.02478)",
        summary="mean of the task vectors weighted by ||tau_t||_F^k",
        default_scale=1.0,
    )
)
