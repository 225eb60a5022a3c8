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

The polar factor is unique only when the concatenated bases have full column rank; with
shared directions (identical experts, say) any completion is orthonormal, and the part of
the result outside the shared subspace depends on the one the SVD picks.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register

Tensor = torch.Tensor


class TsvParams(MethodParams):
    """TSV-M has no parameters besides the global scaling coefficient."""


class Factors(NamedTuple):
    """A merged task vector as u @ diag(s) @ v.T, with u and v orthonormal columns."""

    u: Tensor
    s: Tensor
    v: Tensor

    def matrix(self) -> Tensor:
        """u diag(s) v^T."""
        return (self.u * self.s) @ self.v.T


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthonormal polar factor P Q^T of matrix = P S Q^T (columns <= rows)."""
    p, _, qh = torch.linalg.svd(matrix, full_matrices=False)
    return p @ qh


def per_task_rank(rank: int, num_tasks: int) -> int:
    """k = floor(r / T), at least 1 (the r < T fallback)."""
    return max(1, rank // num_tasks)


def top_triplets(task_vectors: list[Tensor], k: int) -> Factors:
    """The top-k singular triplets of every task, concatenated in task order."""
    dtype = compute_dtype_of(task_vectors[0])
    us, ss, vs = [], [], []
    for tv in task_vectors:
        u, s, vh = torch.linalg.svd(tv.to(dtype), full_matrices=False)
        us.append(u[:, :k])
        ss.append(s[:k])
        vs.append(vh[:k].T)
    return Factors(torch.cat(us, dim=1), torch.cat(ss), torch.cat(vs, dim=1))


def keep_largest(factors: Factors, count: int) -> Factors:
    """The ``count`` triplets with the largest singular values (all if fewer)."""
    if factors.s.numel() <= count:
        return factors
    keep = torch.argsort(factors.s, descending=True, stable=True)[:count].sort().values
    return Factors(factors.u[:, keep], factors.s[keep], factors.v[:, keep])


def tsv_factors(task_vectors: list[Tensor]) -> Factors:
    """Steps 1-3: the orthogonalized task singular vectors and their singular values."""
    rank = min(task_vectors[0].shape)
    k = per_task_rank(rank, len(task_vectors))
    concat = keep_largest(top_triplets(task_vectors, k), rank)
    return Factors(polar_factor(concat.u), concat.s, polar_factor(concat.v))


def tsv_matrix(task_vectors: list[Tensor], params: TsvParams) -> Tensor:
    """TSV-M for one (d_out, d_in) weight: returns the merged task vector."""
    return tsv_factors(task_vectors).matrix()


METHOD = register(
    Method(
        low_rank_output=True,
        name="tsv",
        params=TsvParams,
        matrix_rule=tsv_matrix,
        paper="Gargiulo et al. 2025, Task Singular Vectors (CVPR 2025, arXiv 2412.00081)",
        summary="per-task top singular vectors, orthogonalized across tasks (TSV-M)",
    )
)
