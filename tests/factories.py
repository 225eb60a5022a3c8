"""Test data shared by the SVD-based method tests."""

from __future__ import annotations

import numpy as np
import torch


def experts(shape, count, seed=0, dtype=torch.float64):
    """A shared component plus each task's own, with different magnitudes."""
    gen = torch.Generator().manual_seed(seed)
    shared = torch.randn(shape, generator=gen, dtype=torch.float64)
    return [
        ((1 + 0.3 * t) * (0.5 * shared + torch.randn(shape, generator=gen,
                                                     dtype=torch.float64))).to(dtype)
        for t in range(count)
    ]


def np_polar(x):
    """The polar factor P Q^T of X = P S Q^T."""
    p, _, qh = np.linalg.svd(x, full_matrices=False)
    return p @ qh
