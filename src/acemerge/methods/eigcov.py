"""EigCov (arXiv 2604.01329, "Model Merging via Data-Free Covariance Estimation").

RegMean's closed form with each task's input covariance replaced by the uncentered Gram
of its own task vector. Per 2-D weight (d_out, d_in), input on the right:

    G_t = D_t^T D_t,        D = (sum_t D_t G~_t) (sum_t G~_t)^+

with the Moore-Penrose pseudo-inverse and no ridge by default. Weightings of G~_t (from
the authors' code): "none" (G~_t = G_t), "energy" (G_t / ||D_t||_F^2, "alpha-weighted";
its solution is the exact minimizer of WUDI-Merging's objective), "gram"
(G_t / ||G_t||_F^2). With one task the result is D_1 G_1 G_1^+ = D_1, since the rows of
D_1 lie in the range of G_1. Weights whose largest side is >= ``max_dim`` (vocabulary
matrices) and non-matrix parameters get the plain mean, as in the authors' runs.

Pseudo-inverse: eigendecomposition of the symmetric PSD sum (cheaper than an SVD);
eigenvalues <= rtol * lambda_max are treated as zero, with rtol = d_in * machine eps of the
compute dtype by default, the cutoff torch.linalg.pinv uses (for a PSD matrix its
eigenvalues are its singular values). A task vector of zeros gets weight zero, never NaN.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from acemerge.methods.ace import solve_right
from acemerge.methods.registry import (
    Factored,
    Method,
    MethodParams,
    compute_dtype_of,
    mean_rule,
    register,
)
from acemerge.methods.symmetric import GramSums

Tensor = torch.Tensor

Weighting = Literal["none", "energy", "gram"]


class EigCovParams(MethodParams):
    """EigCov's parameters; defaults are the paper's (pseudo-inverse, unweighted Grams)."""

    ridge: float = Field(
        default=0.0,
        ge=0,
        description="0: pseudo-inverse; > 0: solve with (sum G~_t + ridge I) (1e-4..1e-2)",
    )
    weighting: Weighting = Field(
        default="none",
        description="G~_t = G_t (none), G_t/||D_t||_F^2 (energy, = WUDI), G_t/||G_t||_F^2 (gram)",
    )
    max_dim: int = Field(
        default=20000, ge=1, description="weights whose largest side is >= this get the mean"
    )
    rtol: float | None = Field(
        default=None,
        ge=0,
        description="pseudo-inverse cutoff relative to the largest eigenvalue "
        "(default d_in * machine eps, as torch.linalg.pinv)",
    )


def gram_weight(delta: Tensor, gram: Tensor, weighting: str) -> float:
    """The scalar w_t with G~_t = w_t G_t; 0 for a zero task vector (norms in float64)."""
    if weighting == "none":
        return 1.0
    source = delta if weighting == "energy" else gram
    norm_sq = float(torch.linalg.vector_norm(source, dtype=torch.float64)) ** 2
    return 1.0 / norm_sq if norm_sq > 0 else 0.0


def psd_pinv_right(numerator: Tensor, system: Tensor, rtol: float | None) -> Tensor:
    """numerator @ system^+ for a symmetric PSD system, via its eigendecomposition."""
    evals, evecs = torch.linalg.eigh(system)
    if rtol is None:
        rtol = system.shape[0] * torch.finfo(system.dtype).eps
    cutoff = rtol * max(float(evals.max()), 0.0)
    keep = evals > cutoff  # strict: an all-zero system keeps nothing and returns zeros
    basis = evecs[:, keep]
    return ((numerator @ basis) / evals[keep]) @ basis.T


def accumulate(task_vectors: list[Tensor], weighting: str) -> tuple[Tensor, Tensor]:
    """sum_t D_t G~_t (d_out, d_in) and sum_t G~_t (d_in, d_in) in the compute dtype (for
    wide weights from the row Grams: acemerge.methods.symmetric.GramSums)."""
    d_out, d_in = task_vectors[0].shape
    dtype = compute_dtype_of(task_vectors[0])
    sums = GramSums(d_out, d_in, dtype, task_vectors[0].device)
    for tv in task_vectors:
        delta = tv.to(dtype)
        small = sums.small_gram(delta)  # G_t (uncentered), or D D^T
        weight = gram_weight(delta, small, weighting)  # ||D D^T||_F = ||G_t||_F
        if weight != 0.0:
            sums.add(delta, small, weight)  # w_t G_t and w_t D_t G_t
    return sums.finish()


def eigcov_matrix(task_vectors: list[Tensor], params: EigCovParams) -> Tensor:
    """EigCov for one (d_out, d_in) weight: the merged task vector."""
    if max(task_vectors[0].shape) >= params.max_dim:
        return mean_rule(task_vectors, params)
    numerator, system = accumulate(task_vectors, params.weighting)
    if params.ridge > 0:
        eye = torch.eye(system.shape[0], dtype=system.dtype, device=system.device)
        return solve_right(numerator, system + params.ridge * eye, "solve")
    return psd_pinv_right(numerator, system, params.rtol)


def eigcov_low_rank(factors: list[Factored], params: EigCovParams) -> Factored | None:
    """The same rule on factored task vectors D_t = B_t A_t (R = sum_t r_t).

    G_t = A_t^T H_t A_t with H_t = B_t^T B_t, so with A = [A_t] = (Q Rq)^T (thin QR) the
    system is Q M Q^T, M = Rq blockdiag(w_t H_t) Rq^T (R x R, the same nonzero eigenvalues,
    the same cutoff), and the numerator is [B_t] blockdiag(w_t K_tt H_t) A with
    K_tt = A_t A_t^T. A ridge is inverted with Woodbury instead. Float64 core.
    """
    d_out, d_in = factors[0].shape
    dtype = compute_dtype_of(factors[0].left)
    if max(d_out, d_in) >= params.max_dim:
        return None
    lefts, rights, h_blocks, p_blocks = [], [], [], []
    for f in factors:
        b, a = f.left.double(), f.right.double()
        h, k = b.T @ b, a @ a.T
        weight = _factored_weight(h, k, params.weighting)
        if weight == 0.0 or not len(h):
            continue
        lefts.append(b)
        rights.append(a)
        h_blocks.append(weight * h)
        p_blocks.append(weight * (k @ h))
    if not lefts:
        return Factored(factors[0].left.new_zeros(d_out, 0), factors[0].right.new_zeros(0, d_in))
    a_cat, b_cat = torch.cat(rights), torch.cat(lefts, dim=1)
    hd, p = torch.block_diag(*h_blocks), torch.block_diag(*p_blocks)
    if params.ridge > 0:
        k_full = a_cat @ a_cat.T
        eye = torch.eye(len(k_full), dtype=torch.float64)
        z = p @ (eye - k_full @ torch.linalg.solve(params.ridge * eye + hd @ k_full, hd))
        return Factored(b_cat.to(dtype), (z @ a_cat / params.ridge).to(dtype))
    q, r = torch.linalg.qr(a_cat.T)  # A^T = Q Rq
    evals, evecs = torch.linalg.eigh(r @ hd @ r.T)
    rtol = params.rtol if params.rtol is not None else d_in * torch.finfo(dtype).eps
    keep = evals > rtol * max(float(evals.max()), 0.0)
    basis = evecs[:, keep]
    left = b_cat @ (p @ r.T @ basis / evals[keep])
    return Factored(left.to(dtype), (basis.T @ q.T).to(dtype))


def _factored_weight(h: Tensor, k: Tensor, weighting: str) -> float:
    """gram_weight from the small factors: ||D||_F^2 = tr(H K), ||G||_F^2 = tr(H K H K)."""
    if weighting == "none":
        return 1.0
    norm_sq = float((h * k).sum()) if weighting == "energy" else float(
        ((h @ k) * (h @ k).T).sum())
    return 1.0 / norm_sq if norm_sq > 0 else 0.0


METHOD = register(
    Method(
        low_rank_output=True,
        low_rank_rule=eigcov_low_rank,
        name="eigcov",
        params=EigCovParams,
        matrix_rule=eigcov_matrix,
        paper="EigCov, Model Merging via Data-Free Covariance Estimation (arXiv 2604.01329)",
        summary="RegMean closed form with each task's Gram D_t^T D_t as its input covariance",
    )
)
