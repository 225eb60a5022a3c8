"""Iso-C (Marczak et al. 2025, "No task left behind: isotropic model merging with common
and task-specific subspaces", arXiv 2502.04959).

Isotropic merging in the common subspace. Per 2-D weight (d_out, d_in):

    sum_t D_t = U diag(sigma) V^T,    D = sigma_bar U V^T,    sigma_bar = mean_i sigma_i

i.e. task arithmetic's sum with its singular spectrum made flat. The mean runs over the
r = min(d_out, d_in) singular values of the thin SVD, as in the authors' public code.
Non-matrix parameters get the plain mean, also as in the authors' code (the sum there
is only for matrices). Global scaling coefficient 1.0 (the paper tunes it, ~1.0-1.5).

Rank-deficient sums (e.g. low-rank, LoRA-like task vectors): with ``flatten_over="all"``
(default, the authors' behaviour) the null directions the SVD picks also get sigma_bar,
so the result is full rank and partly arbitrary. ``flatten_over="rank"`` keeps only the
numerical rank (singular values above rtol * sigma_max, rtol = max(d_out, d_in) * machine
eps, the torch.linalg.matrix_rank cutoff) and averages over those; for a full-rank sum,
the normal case for fine-tuned weights, both agree exactly.

Low-rank path (LoRA experts D_t = B_t A_t, ``flatten_over="rank"`` only): the sum is
[B_1 ... B_T][A_1; ...; A_T]; its thin SVD from two QRs and a (sum r_t)^2 core,
O(d (T r)^2 + (T r)^3), equal to the dense rule. ``"all"`` has no low-rank form (it puts
sigma_bar on null directions the SVD picks), so it materializes the task vectors; on
adapters use ``flatten_over=rank``.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from acemerge.methods.lowrank import factored_svd
from acemerge.methods.registry import Factored, Method, MethodParams, compute_dtype_of, register
from acemerge.methods.spectral import full_rank_svd

Tensor = torch.Tensor


class IsoCParams(MethodParams):
    """Iso-C's parameters: only how rank-deficient sums are flattened."""

    flatten_over: Literal["all", "rank"] = Field(
        default="all",
        description="all r singular values (authors) or only the numerical rank",
    )


def numerical_rank(s: Tensor, shape: tuple[int, int], dtype: torch.dtype | None = None) -> int:
    """How many singular values exceed max(shape) * eps * s_max (0 for a zero matrix), eps
    of ``dtype`` (default: the singular values' own)."""
    if s.numel() == 0 or float(s[0]) == 0.0:
        return 0
    cutoff = max(shape) * torch.finfo(dtype or s.dtype).eps * s[0]
    return int((s > cutoff).sum())


def iso_c_matrix(task_vectors: list[Tensor], params: IsoCParams) -> Tensor:
    """Iso-C for one (d_out, d_in) weight: returns the merged task vector."""
    dtype = compute_dtype_of(task_vectors[0])
    total = torch.stack([tv.to(dtype) for tv in task_vectors]).sum(dim=0)  # task arithmetic
    u, s, vh = full_rank_svd(total)
    if params.flatten_over == "rank":
        keep = numerical_rank(s, tuple(total.shape))
        u, s, vh = u[:, :keep], s[:keep], vh[:keep]
    if s.numel() == 0:
        return torch.zeros_like(total)
    return s.mean() * (u @ vh)  # flat spectrum: every singular value sigma_bar


def iso_c_low_rank(factors: list[Factored], params: IsoCParams) -> Factored | None:
    """Iso-C with ``flatten_over="rank"`` on factored task vectors (float64 core)."""
    if params.flatten_over != "rank":
        return None
    dtype = compute_dtype_of(factors[0].left)
    u, s, vh = factored_svd(torch.cat([f.left.double() for f in factors], dim=1),
                            torch.cat([f.right.double() for f in factors]))
    keep = numerical_rank(s, factors[0].shape, dtype)
    sigma_bar = float(s[:keep].mean()) if keep else 0.0
    return Factored((sigma_bar * u[:, :keep]).to(dtype), vh[:keep].to(dtype))


METHOD = register(
    Method(
        low_rank_rule=iso_c_low_rank,
        low_rank_except="flatten_over=all, the default",
        name="iso_c",
        params=IsoCParams,
        matrix_rule=iso_c_matrix,
        paper="Marczak et al. 2025, No task left behind: isotropic model merging "
        "(Iso-C, arXiv 2502.04959)",
        summary="sum of the task vectors with its singular spectrum flattened to its mean",
    )
)
