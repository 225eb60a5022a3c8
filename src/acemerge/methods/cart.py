"""CART (Choi et al. 2024/2025, "Revisiting weight averaging for model merging", arXiv 2411.09263).

Centered Arithmetic with Rank-reduced Task vectors. Per 2-D weight (d_out, d_in), with
the weight average as the new origin:

    D_avg = mean_t D_t,     D = D_avg + lam_c * sum_t SVD_k(D_t - D_avg)

where SVD_k keeps the top k = max(1, int(rho * r)) singular triplets, r = min(d_out, d_in).
``lam_c`` is CART's own coefficient inside this rule; the global scaling coefficient of
the merged task vector stays 1.0. Non-matrix parameters get the plain mean (their
centered task vectors sum to zero, so a full-rank "CART" of them is the mean anyway).

Defaults: the paper tunes (lam, rho) per benchmark: 8 tasks 2.0/0.12, 14 tasks 1.5/0.16,
20 tasks 1.9/0.32. Left unset (None), each is chosen by the number of tasks T:
T <= 8 -> 2.0/0.12, T <= 14 -> 1.5/0.16, otherwise 1.9/0.32.

Limiting cases: ``rank_fraction`` = 0 is allowed and means no low-rank term (k = 0), so
CART returns exactly the mean; this extends the paper, whose k is at least 1. At full
rank (k = r) the centered task vectors sum to zero, so the result is the mean again.
"""

from __future__ import annotations

import torch
from pydantic import AliasChoices, Field

from acemerge.methods.lowrank import factored_svd
from acemerge.methods.registry import (
    Factored,
    Method,
    MethodParams,
    compute_dtype_of,
    register,
    sum_of,
)
from acemerge.methods.spectral import top_svd

Tensor = torch.Tensor

#: (largest task count, lam_c, rho) from the paper's 8/14/20-task benchmarks.
DEFAULTS_BY_TASK_COUNT: tuple[tuple[int | None, float, float], ...] = (
    (8, 2.0, 0.12),
    (14, 1.5, 0.16),
    (None, 1.9, 0.32),
)


class CartParams(MethodParams):
    """CART's parameters; None = the paper's value for the number of tasks."""

    rank_fraction: float | None = Field(
        default=None,
        ge=0,
        le=1,
        validation_alias=AliasChoices("rank_fraction", "rho"),
        description="rho: k = max(1, int(rho * r)); 0 = no low-rank term (the mean); "
        "None = by task count (0.12 / 0.16 / 0.32)",
    )
    lam_c: float | None = Field(
        default=None,
        allow_inf_nan=False,
        description="coefficient of the low-rank term (not the global scale); "
        "None = by task count (2.0 / 1.5 / 1.9)",
    )


def defaults_for(num_tasks: int) -> tuple[float, float]:
    """The paper's (lam_c, rho) for ``num_tasks`` tasks."""
    for most, lam_c, rho in DEFAULTS_BY_TASK_COUNT:
        if most is None or num_tasks <= most:
            return lam_c, rho
    raise AssertionError("unreachable: the last row has no bound")


def settings(params: CartParams, num_tasks: int) -> tuple[float, float]:
    """(lam_c, rho) in effect: the user's values, else the task-count defaults."""
    lam_c, rho = defaults_for(num_tasks)
    return (
        lam_c if params.lam_c is None else params.lam_c,
        rho if params.rank_fraction is None else params.rank_fraction,
    )


def cart_rank(rho: float, shape: tuple[int, int]) -> int:
    """k = max(1, int(rho * r)) for rho > 0; 0 for rho = 0 (the mean)."""
    if rho == 0:
        return 0
    return min(max(1, int(rho * min(shape))), min(shape))


def truncated_svd(matrix: Tensor, rank: int) -> Tensor:
    """SVD_k: the best rank-``rank`` approximation of ``matrix`` (top triplets only, see
    acemerge.methods.spectral)."""
    return top_svd(matrix, rank).matrix()


def mean_and_deltas(task_vectors: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
    """D_avg and the task vectors, in the compute dtype."""
    dtype = compute_dtype_of(task_vectors[0])
    deltas = [tv.to(dtype) for tv in task_vectors]
    return sum_of(deltas).div_(len(deltas)), deltas


def low_rank_term(task_vectors: list[Tensor], rank: int) -> Tensor:
    """sum_t SVD_k(D_t - D_avg) in the compute dtype (zeros when rank is 0)."""
    mean, deltas = mean_and_deltas(task_vectors)
    total = torch.zeros_like(mean)
    if rank > 0:
        for delta in deltas:
            total += truncated_svd(delta - mean, rank)
    return total


def cart_matrix(task_vectors: list[Tensor], params: CartParams) -> Tensor:
    """CART for one (d_out, d_in) weight: returns the merged task vector."""
    lam_c, rho = settings(params, len(task_vectors))
    mean, _ = mean_and_deltas(task_vectors)
    rank = cart_rank(rho, tuple(task_vectors[0].shape))
    if rank == 0:
        return mean  # the limiting case: no low-rank term
    return mean + lam_c * low_rank_term(task_vectors, rank)


def cart_low_rank(factors: list[Factored], params: CartParams) -> Factored:
    """The same rule on factored task vectors: the mean's factors side by side, and each
    SVD_k(D_t - D_avg) from the thin SVD of [B_t, -B/T] [A_t; A] (k capped at its rank: the
    dense rule's extra triplets have zero singular values and add nothing)."""
    count = len(factors)
    lam_c, rho = settings(params, count)
    dtype = compute_dtype_of(factors[0].left)
    mean_left = torch.cat([f.left.double() / count for f in factors], dim=1)
    mean_right = torch.cat([f.right.double() for f in factors])
    rank = cart_rank(rho, factors[0].shape)
    lefts, rights = [mean_left], [mean_right]
    for f in factors if rank > 0 else []:
        u, s, vh = factored_svd(torch.cat([f.left.double(), -mean_left], dim=1),
                                torch.cat([f.right.double(), mean_right]))
        k = min(rank, len(s))
        lefts.append(lam_c * u[:, :k] * s[:k])
        rights.append(vh[:k])
    return Factored(torch.cat(lefts, dim=1).to(dtype), torch.cat(rights).to(dtype))


METHOD = register(
    Method(
        low_rank_output=True,
        low_rank_rule=cart_low_rank,
        name="cart",
        params=CartParams,
        matrix_rule=cart_matrix,
        paper="Choi et al. 2024, Revisiting weight averaging for model merging "
        "(CART, arXiv 2411.09263)",
        summary="mean plus a scaled sum of low-rank approximations of the centered task vectors",
    )
)
