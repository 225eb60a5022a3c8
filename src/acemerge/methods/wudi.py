"""WUDI-Merging (Cheng et al., ICML 2025, "Whoever Started the Interference Should End It:
Guiding Data-Free Model Merging via Task Vectors", arXiv 2503.08099).

Per 2-D weight (d_out, d_in), input on the right, minimize the interference loss

    L(D) = sum_t ||(D - D_t) D_t^T||_F^2 / ||D_t||_F^2

with Adam (torch's defaults: betas 0.9/0.999, eps 1e-8, no weight decay) from
D = sum_t D_t, for ``iterations`` steps at learning rate ``lr`` (the authors: 300 steps,
1e-5 for ViT, 2e-5 for RoBERTa). Non-matrix parameters get the plain mean, as in the
authors' code (which also averages ``text_projection``: the plan decides that).

Gradient: analytic and exact, dL/dD = 2 sum_t w_t (D - D_t) D_t^T D_t with
w_t = 1 / ||D_t||_F^2, evaluated as 2 (D S - N) with S = sum_t w_t G_t and
N = sum_t w_t D_t G_t precomputed once (one d_out x d_in x d_in product per step), or task
by task when the weight is so wide (d_in > 2 T d_out) that this is cheaper. A zero task
vector has a zero loss term and gets w_t = 0 (the authors' code would divide 0 by 0).

Closed form: L depends on D only through D S, and its minimizers are the D with D S = N.
EigCov with energy weighting, N S^+, is the one with no component in null(S). The start
sum_t D_t has none either (each D_t's rows lie in range(G_t), inside range(S)), so plain
gradient descent would converge to N S^+ exactly. Adam's per-entry scaling is not
rotation-invariant: when S is singular (e.g. wide weights with T d_out < d_in) its steps
can leak into null(S), where the loss does not pull back, so on range(S) WUDI tends to
N S^+, while its null-space part is a drift of the order of lr per step. With the
authors' settings each entry moves by about iterations * lr (3e-3) at most, so WUDI is a
truncated descent from sum_t D_t, generally short of its minimizer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from pydantic import Field, field_validator

from acemerge.methods.eigcov import accumulate
from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register

Tensor = torch.Tensor

BETAS = (0.9, 0.999)  # torch.optim.Adam defaults, used by the authors
ADAM_EPS = 1e-8

#: The authors' learning rates per model family.
LR_PRESETS: dict[str, float] = {"vit": 1e-5, "roberta": 2e-5}


class WudiParams(MethodParams):
    """WUDI-Merging's parameters; defaults are the authors' ViT settings."""

    lr: float = Field(
        default=1e-5,
        gt=0,
        description="Adam learning rate; a number or a preset: "
        + ", ".join(f"{k}={v:g}" for k, v in LR_PRESETS.items()),
    )
    iterations: int = Field(default=300, ge=0, description="Adam steps per weight")

    @field_validator("lr", mode="before")
    @classmethod
    def _lr_preset(cls, value: object) -> object:
        if isinstance(value, str) and value in LR_PRESETS:
            return LR_PRESETS[value]
        return value


def energy_weights(task_vectors: list[Tensor]) -> list[float]:
    """w_t = 1 / ||D_t||_F^2 (float64 norms), 0 for a zero task vector."""
    energies = [float(tv.double().pow(2).sum()) for tv in task_vectors]
    return [1.0 / e if e > 0 else 0.0 for e in energies]


def wudi_loss(merged: Tensor, task_vectors: list[Tensor]) -> float:
    """L(D) = sum_t ||(D - D_t) D_t^T||_F^2 / ||D_t||_F^2, in float64 (for diagnostics)."""
    merged = merged.double()
    total = 0.0
    for tv, weight in zip(task_vectors, energy_weights(task_vectors), strict=True):
        delta = tv.double()
        total += weight * float(((merged - delta) @ delta.T).pow(2).sum())
    return total


def gram_gradient(task_vectors: list[Tensor]) -> Callable[[Tensor], Tensor]:
    """dL/dD = 2 (D S - N) with S and N precomputed (cheap unless the weight is very wide)."""
    numerator, system = accumulate(task_vectors, "energy")
    return lambda merged: 2.0 * (merged @ system - numerator)


def task_gradient(task_vectors: list[Tensor], dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    """dL/dD = 2 sum_t w_t ((D - D_t) D_t^T) D_t, never forming a d_in x d_in matrix."""
    pairs = [
        (tv.to(dtype), w)
        for tv, w in zip(task_vectors, energy_weights(task_vectors), strict=True)
        if w > 0
    ]

    def gradient(merged: Tensor) -> Tensor:
        grad = torch.zeros_like(merged)
        for delta, weight in pairs:
            grad += (2.0 * weight) * (((merged - delta) @ delta.T) @ delta)
        return grad

    return gradient


def adam(start: Tensor, gradient: Callable[[Tensor], Tensor], lr: float, steps: int) -> Tensor:
    """``steps`` Adam updates from ``start``, the same arithmetic as torch.optim.Adam."""
    beta1, beta2 = BETAS
    point = start.clone()
    first = torch.zeros_like(point)
    second = torch.zeros_like(point)
    for step in range(1, steps + 1):
        grad = gradient(point)
        first.mul_(beta1).add_(grad, alpha=1 - beta1)
        second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (second.sqrt() / (1 - beta2**step) ** 0.5).add_(ADAM_EPS)
        point.addcdiv_(first, denom, value=-lr / (1 - beta1**step))
    return point


def wudi_matrix(task_vectors: list[Tensor], params: WudiParams) -> Tensor:
    """WUDI-Merging for one (d_out, d_in) weight: the merged task vector."""
    dtype = compute_dtype_of(task_vectors[0])
    d_out, d_in = task_vectors[0].shape
    start = torch.zeros(d_out, d_in, dtype=dtype, device=task_vectors[0].device)
    for tv in task_vectors:
        start += tv.to(dtype)  # D = sum_t D_t
    if params.iterations == 0:
        return start
    if d_in > 2 * len(task_vectors) * d_out:
        gradient = task_gradient(task_vectors, dtype)
    else:
        gradient = gram_gradient(task_vectors)
    return adam(start, gradient, params.lr, params.iterations)


METHOD = register(
    Method(
        name="wudi",
        params=WudiParams,
        matrix_rule=wudi_matrix,
        paper="WUDI-Merging, Cheng et al., ICML 2025 (arXiv 2503.08099)",
        summary="Adam on the task-vector-guided interference loss, from the task sum",
    )
)
