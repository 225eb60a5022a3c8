"""SLERP: spherical linear interpolation between the base and ONE other model (Shoemake
1985, "Animating rotation with quaternion curves"), as mergekit 0.1.5 applies it.

Per tensor, flattened: with a = W_0 / ||W_0||, b = W_1 / ||W_1|| and theta = arccos(a . b),
W = sin((1 - t) theta) / sin(theta) W_0 + sin(t theta) / sin(theta) W_1; where
|a . b| > 0.9995 (nearly collinear) the linear (1 - t) W_0 + t W_1. A norm below 1e-8
counts as 1. ``t`` may follow a per-layer gradient (see the mergekit schema). Returns
W - W_0 (the rule receives the base).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register

Tensor = torch.Tensor
DOT_THRESHOLD = 0.9995
NORM_FLOOR = 1e-8


class SlerpParams(MethodParams):
    """The interpolation factor: 0 gives the base, 1 the other model."""

    t: float = Field(default=0.5, ge=0, le=1, description="interpolation factor")


def slerp(t: float, v0: Tensor, v1: Tensor) -> Tensor:
    """SLERP of two tensors of one shape, flattened."""
    a, b = v0.reshape(-1), v1.reshape(-1)
    norm_a, norm_b = float(a.norm()), float(b.norm())
    norm_a = norm_a if norm_a > NORM_FLOOR else 1.0
    norm_b = norm_b if norm_b > NORM_FLOOR else 1.0
    dot = float(((a / norm_a) * (b / norm_b)).sum().clamp(-1, 1))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * v0 + t * v1
    theta = math.acos(dot)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def slerp_rule(task_vectors: list[Tensor], params: SlerpParams, base: Tensor) -> Tensor:
    """SLERP(t, W_0, W_0 + D_1) - W_0."""
    dtype = compute_dtype_of(task_vectors[0])
    base = base.to(dtype)
    return slerp(params.t, base, base + task_vectors[0].to(dtype)) - base


METHOD = register(
    Method(
        name="slerp",
        params=SlerpParams,
        matrix_rule=slerp_rule,
        other_rule=slerp_rule,
        other_rule_name="slerp",
        paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
        summary="spherical interpolation between the base and one model (mergekit's slerp)",
        needs_base=True,
        min_experts=1,
        max_experts=1,
    )
)
