"""Top singular triplets and polar factors without a full SVD (helper, not a method).

Methods that keep only the top k singular triplets of a matrix (ACE's refinement, TSV-M,
CART, Iso-CTS; Iso-C with k = r) take them from the eigendecomposition of the smaller Gram
matrix (W^T W or W W^T, r x r) in float64 on CPU: the Gram costs one product (half of one:
acemerge.methods.symmetric) and its eigendecomposition is several times cheaper than a
full SVD of W. The polar factor P Q^T of X = P S Q^T (TSV-M's and Iso-CTS's
orthogonalization) is X V S^-1 V^T from the same Gram, X^T X = V S^2 V^T.

Squaring W squares its condition number: the Gram's eigenvalues carry absolute errors of
about eps64 sigma_1^2, a relative error of eps64 (sigma_1 / sigma_i)^2 / 2 in sigma_i, so
the Gram serves only while sigma_k >= GRAM_MIN_RATIO sigma_1 (then every kept sigma_i is
exact to ~1e-10 and the top-k subspace to the same order divided by the gap); otherwise,
and on CUDA (no float64 round trip), a full SVD runs (the polar factor: where S_min >=
GRAM_MIN_RATIO S_max; its error is then about eps64 (S_max / S_min)^2 <= 1e-10).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from acemerge.methods.symmetric import gram

Tensor = torch.Tensor

#: The smallest sigma_k / sigma_1 for which the Gram eigendecomposition is used.
GRAM_MIN_RATIO = 1e-3


class TopSvd(NamedTuple):
    """The top-k triplets (u: d_out x k, s: k, vh: k x d_in) and every singular value
    (``spectrum``, descending; below GRAM_MIN_RATIO sigma_1 only approximate when it came
    from the Gram)."""

    u: Tensor
    s: Tensor
    vh: Tensor
    spectrum: Tensor

    def matrix(self) -> Tensor:
        """u diag(s) vh: the best rank-k approximation."""
        return (self.u * self.s) @ self.vh


def full_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD; on CPU a float32 matrix is decomposed in float64 (its small singular
    values may decide a numerical rank)."""
    if matrix.device.type == "cpu" and matrix.dtype == torch.float32:
        u, s, vh = torch.linalg.svd(matrix.double(), full_matrices=False)
        return u.float(), s.float(), vh.float()
    return torch.linalg.svd(matrix, full_matrices=False)


def top_svd(matrix: Tensor, k: int) -> TopSvd:
    """The top ``k`` singular triplets of ``matrix`` in its dtype (see the module doc)."""
    top = gram_svd(matrix, k)
    if top is not None:
        return top
    u, s, vh = full_svd(matrix)
    return TopSvd(u[:, :k], s[:k], vh[:k], s)


def gram_svd(matrix: Tensor, k: int) -> TopSvd | None:
    """:func:`top_svd` through the float64 Gram matrix on CPU; None on other devices, for
    k outside 1..r, and where it is not accurate (sigma_k < GRAM_MIN_RATIO sigma_1)."""
    if matrix.device.type != "cpu" or not 0 < k <= min(matrix.shape):
        return None
    wide = matrix.shape[0] < matrix.shape[1]
    w = matrix.double()
    values, vectors = torch.linalg.eigh(gram(w.T) if wide else gram(w))  # ascending
    spectrum = values.flip(0).clamp_min(0).sqrt()
    if float(spectrum[0]) == 0.0 or float(spectrum[k - 1]) < GRAM_MIN_RATIO * float(spectrum[0]):
        return None
    basis, s = vectors.flip(1)[:, :k], spectrum[:k]
    if wide:  # basis = U_k, V_k^T = diag(1/s) U_k^T W
        u, vh = basis, (basis / s).T @ w
    else:  # basis = V_k, U_k = W V_k diag(1/s)
        u, vh = (w @ basis) / s, basis.T
    dtype = matrix.dtype
    return TopSvd(u.to(dtype), s.to(dtype), vh.to(dtype), spectrum.to(dtype))


def full_rank_svd(matrix: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The thin SVD (all r triplets): from the float64 Gram where every singular value is
    at least GRAM_MIN_RATIO sigma_1 (then all r are above any rank cutoff), else torch's SVD
    in the matrix's dtype."""
    top = gram_svd(matrix, min(matrix.shape))
    if top is not None:
        return top.u, top.s, top.vh
    return torch.linalg.svd(matrix, full_matrices=False)


def polar_factor(matrix: Tensor) -> Tensor:
    """The orthonormal polar factor P Q^T of matrix = P S Q^T (from :func:`full_rank_svd`)."""
    u, _, vh = full_rank_svd(matrix)
    return u @ vh
