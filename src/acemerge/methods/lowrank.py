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
