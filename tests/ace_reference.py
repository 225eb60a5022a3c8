"""An independent float64 NumPy transcription of ACE-Merging (arXiv 2603.02945, Alg. 1).

Written literally from the equations (explicit matrices, explicit inverse, lists of
per-task estimators) so it shares no code or shortcuts with ``acemerge.methods.ace``.
"""

from __future__ import annotations

import numpy as np

FLOOR = 1e-12


def gamma_of(deltas: list[np.ndarray]) -> float:
    """Eq. 7 with the unbiased variance (ddof=1)."""
    logs = np.log(np.array([np.trace(d.T @ d) for d in deltas]) + FLOOR)
    return float(np.var(logs, ddof=1) / (np.mean(logs) ** 2 + FLOOR))


def ace_reference(
    deltas: list[np.ndarray],
    eps: float | list[float] = 1e-5,
    tau: float = 0.3,
    k_frac: float = 0.3,
    adaptive: bool = True,
    prior: bool = True,
    refine: bool = True,
) -> np.ndarray:
    deltas = [np.asarray(d, dtype=np.float64) for d in deltas]
    n_tasks = len(deltas)
    d_out, d_in = deltas[0].shape
    ones_out, ones_in, eye = np.ones(d_out), np.ones(d_in), np.eye(d_in)
    energies = np.array([np.trace(d.T @ d) for d in deltas])  # Eq. 12 / A.4
    het = gamma_of(deltas) > tau
    eps_of = list(eps) if isinstance(eps, list | tuple) else [eps] * n_tasks  # per task

    centered = [d - np.outer(ones_out, d.T @ ones_out / d_out) for d in deltas]  # Eq. 5
    sigma = [w.T @ w for w in centered]  # Eq. 6
    if het and adaptive:
        traces = [np.trace(s) + FLOOR for s in sigma]
        sigma_tilde = [s / tr for s, tr in zip(sigma, traces, strict=True)]  # Eq. 8
        sigma_reg = [st + (e / tr) * eye
                     for st, tr, e in zip(sigma_tilde, traces, eps_of, strict=True)]
    else:
        sigma_tilde = sigma
        sigma_reg = [s + e * eye for s, e in zip(sigma, eps_of, strict=True)]  # Eq. 10

    c = (ones_in @ sum(sigma_tilde)) / d_in  # Eq. 11
    c_agg = np.outer(ones_in, c)
    if het and adaptive:
        c_agg = c_agg / (energies.mean() + FLOOR)  # Eq. 13
    system = sum(sigma_reg) + (c_agg if prior else 0.0)
    numerator = sum(w @ s for w, s in zip(centered, sigma_reg, strict=True))
    w_pre = numerator @ np.linalg.inv(system)  # Eq. 14
    if not (het and refine):
        return w_pre

    mean_reg = sum(sigma_reg) / n_tasks  # Eq. 16
    residual = sum(d @ (st - mean_reg) for d, st in zip(deltas, sigma_tilde, strict=True))
    u, s, vt = np.linalg.svd(w_pre + residual, full_matrices=False)
    k = int(min(d_out, d_in) * k_frac)
    if k == 0:
        return w_pre
    return w_pre + s[:k].mean() * u[:, :k] @ vt[:k]  # Eqs. 18-19
