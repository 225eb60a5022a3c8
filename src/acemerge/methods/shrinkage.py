"""Shrinkage intensities of a sample covariance toward a scaled identity (helper, not a method).

The rows x_1..x_n (in R^p) of a centered matrix C are treated as samples; S = C^T C / n is
their sample covariance and mu = tr(S) / p its mean eigenvalue. A shrinkage intensity
delta in [0, 1] gives the estimate (1 - delta) S + delta mu I, which is C^T C plus a ridge
of  rho * tr(C^T C) / p  up to an overall factor, with rho = delta / (1 - delta).

Everything is computed from the Gram G = C^T C (which ACE forms anyway) and the rows' norms;
only tr(G) and ||G||_F^2 are read, which the row Gram C C^T shares, so either serves:
O(p^2 + n p) extra work, torch only (any device, any float dtype).

- Ledoit & Wolf (2004), "A well-conditioned estimator for large-dimensional covariance
  matrices": delta = min(b^2, d^2) / d^2 with d^2 = ||S - mu I||_F^2 / p and
  b^2 = (1 / (n p)) ((1/n) sum_i ||x_i||^4 - ||S||_F^2).
- OAS, Chen, Wiesel, Eldar & Hero (2010), "Shrinkage algorithms for MMSE covariance
  estimation", Eq. 23 (as scikit-learn writes it, without the 2/p terms):
  delta = min(1, (tr(S^2) + tr(S)^2) / ((n + 1) (tr(S^2) - tr(S)^2 / p))).
- Marchenko-Pastur edge: the largest eigenvalue that isotropic noise with the same total
  variance would show, mu (1 + sqrt(p / n))^2; as a ridge that is rho = (1 + sqrt(p / n))^2
  (no intensity: it is a ridge directly).

Both intensities equal scikit-learn's ``ledoit_wolf_shrinkage`` / ``oas`` on the same rows
(tests/test_ace_eps.py checks it to 1e-10 in float64).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor

#: Intensities are capped below 1 so that the ridge rho = delta / (1 - delta) stays finite.
MAX_INTENSITY = 1.0 - 1e-3


def _moments(gram: Tensor, n: int) -> tuple[float, float]:
    """tr(S) and ||S||_F^2 of S = gram / n, in float64."""
    gram = gram.double()
    return float(torch.trace(gram)) / n, float(gram.pow(2).sum()) / n**2


def ledoit_wolf_intensity(centered: Tensor, gram: Tensor) -> float | None:
    """Ledoit-Wolf's intensity for the rows of ``centered`` (n x p) with ``gram`` = C^T C.

    None when undefined (no variance: a zero or single-row matrix).
    """
    n, p = centered.shape
    trace, frob2 = _moments(gram, n)
    if n < 2 or trace <= 0:
        return None
    mu = trace / p
    d2 = (frob2 - 2 * mu * trace + p * mu**2) / p
    row_norm4 = float(centered.double().pow(2).sum(dim=1).pow(2).sum())
    b2 = min((row_norm4 / n - frob2) / (n * p), d2)
    return 0.0 if b2 <= 0 else b2 / d2


def oas_intensity(centered: Tensor, gram: Tensor) -> float | None:
    """The OAS intensity for the rows of ``centered`` (n x p) with ``gram`` = C^T C."""
    n, p = centered.shape
    trace, frob2 = _moments(gram, n)
    if n < 2 or trace <= 0:
        return None
    alpha, mu2 = frob2 / p**2, (trace / p) ** 2
    den = (n + 1) * (alpha - mu2 / p)
    return 1.0 if den == 0 else min((alpha + mu2) / den, 1.0)


def ridge_ratio(intensity: float) -> float:
    """rho = delta / (1 - delta): the ridge, in units of the mean eigenvalue, that the
    intensity ``delta`` amounts to (delta capped at :data:`MAX_INTENSITY`)."""
    delta = min(max(intensity, 0.0), MAX_INTENSITY)
    return delta / (1.0 - delta)


def mp_edge_ratio(n: int, p: int) -> float:
    """(1 + sqrt(p / n))^2: the Marchenko-Pastur upper edge over the mean eigenvalue."""
    return (1.0 + math.sqrt(p / n)) ** 2


def auto_ridge_ratio(rule: str, centered: Tensor, gram: Tensor) -> float | None:
    """rho for one task under ``rule`` (ledoit_wolf, oas, mp_edge); None when undefined."""
    n, p = centered.shape
    if rule == "mp_edge":
        defined = n >= 2 and float(torch.trace(gram)) > 0
        return mp_edge_ratio(n, p) if defined else None
    intensity = (ledoit_wolf_intensity if rule == "ledoit_wolf" else oas_intensity)(
        centered, gram)
    return None if intensity is None else ridge_ratio(intensity)
