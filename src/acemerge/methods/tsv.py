"""TSV-M (Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in
Model Merging", CVPR 2025, arXiv 2412.00081).

Per 2-D weight (d_out, d_in), r = min(d_out, d_in), T tasks:

1. Keep the top k = floor(r / T) singular triplets (u, s, v) of each task vector D_t.
2. Concatenate them: U (d_out x Tk), s (Tk), V (d_in x Tk).
3. Remove the interference between tasks by replacing U and V with their nearest
   matrices with orthonormal columns, the polar factor: X = P S Q^T -> P Q^T.
4. D = U_perp diag(s) V_perp^T, whose singular values are exactly s.

Non-matrix parameters get the plain mean. Global scaling coefficient 1.0 (the paper
tunes it on validation data, 0.1-3.0).

Fewer ranks than tasks (r < T, where floor(r / T) = 0 and the paper's recipe keeps
nothing): each task contributes its top triplet (k = 1) and, of the T triplets, the r
with the largest singular values are kept, so U and V still have at most r columns and
the result is independent of the task order.

Rank-deficient task vectors (LoRA experts, rank r_t < k): the paper's k would also take
triplets of zero singular values, whose directions the SVD picks from rounding noise, and
they enter the polar factor with the real ones. ``rank_cap="numerical"`` (default) takes
k_t = min(k, numerical rank of D_t) per task (tolerance: acemerge.methods.lowrank.
numerical_rank); it never changes the result for task vectors of numerical rank >= k, the
normal case for fine-tuned weights. ``rank_cap="paper"``: k for every task.

Low-rank path (LoRA experts D_t = B_t A_t): each task's triplets from the thin SVD of its
factors, the polar factors of the (d x sum_t k_t) concatenations: O(d (T r)^2 + (T r)^3),
equal to the dense rule with ``rank_cap="numerical"``.

The polar factor is unique only when the concatenated bases have full column rank; with
shared directions (identical experts, say) any completion is orthonormal, and the part of
the result outside the shared subspace depends on the one the SVD picks.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from pydantic import Field

from acemerge.methods.lowrank import factored_svd, numerical_rank
from acemerge.methods.registry import Factored, Method, MethodParams, compute_dtype_of, register
from acemerge.methods.spectral import TopSvd, polar_factor, top_svd

Tensor = torch.Tensor


class TsvParams(MethodParams):
    """TSV-M's parameters: only how rank-deficient task vectors are truncated."""

    rank_cap: Literal["numerical", "paper"] = Field(
        default="numerical",
        description="numerical: k_t = min(floor(r / T), numerical rank of D_t), so no "
        "direction of a zero singular value is kept (low-rank experts); never changes a "
        "result where every D_t has numerical rank >= k. paper: k = floor(r / T) always",
    )


class Factors(NamedTuple):
    """A merged task vector as u @ diag(s) @ v.T, with u and v orthonormal columns."""

    u: Tensor
    s: Tensor
    v: Tensor

    def matrix(self) -> Tensor:
        """u diag(s) v^T."""
        return (self.u * self.s) @ self.v.T


def per_task_rank(rank: int, num_tasks: int) -> int:
    """k = floor(r / T), at least 1 (the r < T fallback)."""
    return max(1, rank // num_tasks)


def top_triplets(triplets: list[TopSvd], k: int, cap: bool, shape: tuple[int, int],
                 dtype: torch.dtype) -> Factors:
    """The top-k of every task's triplets, k capped at its numerical rank when ``cap``,
    concatenated in task order."""
    us, ss, vs = [], [], []
    for u, s, vh, spectrum in triplets:
        k_t = min(k, numerical_rank(spectrum, shape, dtype)) if cap else k
        us.append(u[:, :k_t])
        ss.append(s[:k_t])
        vs.append(vh[:k_t].T)
    return Factors(torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1))


def keep_largest(factors: Factors, count: int) -> Factors:
    """The ``count`` triplets with the largest singular values (all if fewer)."""
    if factors.s.numel() <= count:
        return factors
    keep = torch.argsort(factors.s, descending=True, stable=True)[:count].sort().values
    return Factors(factors.u[:, keep], factors.s[keep], factors.v[:, keep])


def orthogonalized(triplets: list[TopSvd], params: TsvParams,
                   shape: tuple[int, int], dtype: torch.dtype) -> Factors:
    """Steps 1-3 from every task's SVD: the orthogonalized task singular vectors and their
    singular values (no columns when nothing is kept)."""
    rank = min(shape)
    k = per_task_rank(rank, len(triplets))
    concat = keep_largest(top_triplets(triplets, k, params.rank_cap == "numerical", shape,
                                       dtype), rank)
    if concat.s.numel() == 0:
        return concat
    return Factors(polar_factor(concat.u), concat.s, polar_factor(concat.v))


def tsv_factors(task_vectors: list[Tensor], params: TsvParams | None = None) -> Factors:
    """Steps 1-3 on dense task vectors."""
    dtype = compute_dtype_of(task_vectors[0])
    shape = tuple(task_vectors[0].shape)
    k = per_task_rank(min(shape), len(task_vectors))
    triplets = [top_svd(tv.to(dtype), k) for tv in task_vectors]  # top k only
    return orthogonalized(triplets, params or TsvParams(), shape, dtype)


def tsv_matrix(task_vectors: list[Tensor], params: TsvParams) -> Tensor:
    """TSV-M for one (d_out, d_in) weight: returns the merged task vector."""
    return tsv_factors(task_vectors, params).matrix()


def tsv_low_rank(factors: list[Factored], params: TsvParams) -> Factored | None:
    """TSV-M on factored task vectors (float64 core); None for ``rank_cap="paper"`` where a
    task's rank is below k (its extra triplets would be noise)."""
    dtype = compute_dtype_of(factors[0].left)
    shape = factors[0].shape
    triplets = [TopSvd(*svd, svd[1]) for svd in
                (factored_svd(f.left.double(), f.right.double()) for f in factors)]
    k = per_task_rank(min(shape), len(factors))
    if params.rank_cap == "paper" and any(len(t.s) < k for t in triplets):
        return None
    merged = orthogonalized(triplets, params, shape, dtype)
    return Factored((merged.u * merged.s).to(dtype), merged.v.T.to(dtype))


METHOD = register(
    Method(
        low_rank_output=True,
        low_rank_rule=tsv_low_rank,
        low_rank_except="rank_cap=paper where a task's rank is below k",
        name="tsv",
        params=TsvParams,
        matrix_rule=tsv_matrix,
        paper="Gargiulo et al. 2025, Task Singular Vectors (CVPR 2025, arXiv 2412.00081)",
        summary="per-task top singular vectors, orthogonalized across tasks (TSV-M)",
    )
)
