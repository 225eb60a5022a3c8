"""Linear algebra on factored matrices (helper, not a method)."""

from __future__ import annotations

import torch

Tensor = torch.Tensor


def factored_svd(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of left @ right ((m, k) @ (k, n)) without forming it: two reduced QRs and
    the SVD of a k x k core, O((m + n) k^2 + k^3). Returns U (m, k'), S (k'), Vh (k', n)."""
    q1, r1 = torch.linalg.qr(left)
    q2, r2 = torch.linalg.qr(right.T)
    u, s, vh = torch.linalg.svd(r1 @ r2.T, full_matrices=False)
    return q1 @ u, s, vh @ q2.T


def numerical_rank(singular_values: Tensor, shape: tuple[int, int], dtype: torch.dtype) -> int:
    """How many singular values exceed sigma_1 * max(max(d_out, d_in) * eps, sqrt(eps)) for
    the compute dtype's eps: torch.linalg.matrix_rank's tolerance, raised to sqrt(eps)
    because the matrices it judges may come out of an ill-conditioned solve (ACE's W_fused:
    rank-64 LoRA updates gave float64 "zero" singular values at 3e-9 sigma_1, far above
    2048 * eps) or be differences of rounded float32 weights."""
    if singular_values.numel() == 0:
        return 0
    eps = torch.finfo(dtype).eps
    tolerance = float(singular_values[0]) * max(max(shape) * eps, eps ** 0.5)
    return int((singular_values > tolerance).sum())
