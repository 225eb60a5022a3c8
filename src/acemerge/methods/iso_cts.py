"""Iso-CTS (Marczak et al. 2025, "No task left behind: isotropic model merging with
common and task-specific subspaces", arXiv 2502.04959).

Isotropic merging in common and task-specific subspaces. Per 2-D weight (d_out, d_in),
r = min(d_out, d_in), T tasks:

1. Common space: the top k_c singular triplets of sum_t D_t, k_c from ``common_fraction``
   (see below).
2. Task-specific spaces: for each task, remove the common left subspace,
   D_t - U_c U_c^T D_t, and keep the top n = (r - k_c) / T singular triplets of what
   is left.
3. Concatenate the common and task-specific U's, V's and singular values (r of each),
   replace U and V by their polar factors (nearest orthonormal columns), and flatten the
   spectrum to the mean of the r concatenated singular values:
   D = mean(s) U_perp V_perp^T.

Size of the common space: k_c = floor(common_fraction * r), then r - k_c is moved to
the nearest multiple of T (Python's round, ties to even, as in the authors' public code)
so that every task gets the same n; it is capped at floor(r / T) * T so that k_c >= 0.
When r - floor(common_fraction * r) < T / 2 the task-specific share rounds to 0 and
Iso-CTS equals Iso-C (as does ``common_fraction`` = 1, and T = 1).

Non-matrix parameters get the plain mean, as in the authors' code. Global scaling
coefficient 1.0 (the paper tunes it, ~1.0-1.5). As with TSV-M, the polar factor is not
unique when the concatenated bases share directions (identical experts, say).
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register, sum_of
from acemerge.methods.spectral import polar_factor, top_svd
from acemerge.methods.tsv import Factors

Tensor = torch.Tensor


class IsoCtsParams(MethodParams):
    """Iso-CTS's parameters; the default is the paper's."""

    common_fraction: float = Field(
        default=0.8, ge=0, le=1, description="share of the r directions for the common space"
    )


def common_rank(rank: int, num_tasks: int, common_fraction: float) -> int:
    """k_c such that (r - k_c) is a multiple of T, near floor(common_fraction * r)."""
    initial = int(rank * common_fraction)
    specific = round((rank - initial) / num_tasks) * num_tasks
    return rank - min(specific, (rank // num_tasks) * num_tasks)


def task_specific(delta: Tensor, common_u: Tensor, n: int) -> Factors:
    """Top-n triplets of D_t with the common left subspace projected out (step 2)."""
    residual = delta - common_u @ (common_u.T @ delta)
    top = top_svd(residual, n)  # top triplets only (acemerge.methods.spectral)
    return Factors(top.u, top.s, top.vh.T)


def iso_cts_factors(task_vectors: list[Tensor], common_fraction: float = 0.8) -> Factors:
    """Steps 1-3 before flattening: orthogonalized U, V and the r concatenated values."""
    dtype = compute_dtype_of(task_vectors[0])
    deltas = [tv.to(dtype) for tv in task_vectors]
    rank = min(deltas[0].shape)
    k_c = common_rank(rank, len(deltas), common_fraction)
    n = (rank - k_c) // len(deltas)
    common = top_svd(sum_of(deltas), k_c)
    parts = [Factors(common.u, common.s, common.vh.T)]  # step 1: common space
    if n > 0:
        parts += [task_specific(delta, parts[0].u, n) for delta in deltas]
    concat_u = torch.cat([p.u for p in parts], dim=1)
    concat_v = torch.cat([p.v for p in parts], dim=1)
    values = torch.cat([p.s for p in parts])
    return Factors(polar_factor(concat_u), values, polar_factor(concat_v))  # step 3


def iso_cts_matrix(task_vectors: list[Tensor], params: IsoCtsParams) -> Tensor:
    """Iso-CTS for one (d_out, d_in) weight: returns the merged task vector."""
    factors = iso_cts_factors(task_vectors, params.common_fraction)
    return factors.s.mean() * (factors.u @ factors.v.T)  # flat spectrum


METHOD = register(
    Method(
        name="iso_cts",
        params=IsoCtsParams,
        matrix_rule=iso_cts_matrix,
        paper="Marczak et al. 2025, No task left behind: isotropic model merging "
        "(Iso-CTS, arXiv 2502.04959)",
        summary="common subspace of the sum plus per-task subspaces, orthogonalized, "
        "with a flat spectrum",
    )
)
