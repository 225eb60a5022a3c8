"""Weighted linear merge ("model soups", Wortsman et al. 2022, arXiv 2203.05482), with
mergekit's per-model weights and ``normalize``.

W = sum_i w_i W_i / sum_i w_i (``normalize``, the default), or sum_i w_i W_i. Defined on
weights, so the rule receives the base tensor too: with W_i = W_0 + D_i it returns
W - W_0. A model listed as an input with D = 0 (the base itself) takes part with its weight.
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.methods.gta import PerTask, per_task
from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register

Tensor = torch.Tensor


class LinearParams(MethodParams):
    """Per-model weights (default 1 each) and whether they are normalized."""

    weight: PerTask = Field(default=1.0, description="per-model weight (a number or a list)")
    normalize: bool = Field(default=True, description="divide by the sum of the weights")


def linear_rule(task_vectors: list[Tensor], params: LinearParams, base: Tensor) -> Tensor:
    """sum_i w_i W_i (/ sum_i w_i) - W_0, computed on the full weights."""
    dtype = compute_dtype_of(task_vectors[0])
    weights = per_task(params.weight, len(task_vectors), "weight")
    base = base.to(dtype)
    result = torch.zeros_like(base)
    for w, tv in zip(weights, task_vectors, strict=True):
        result.add_(base + tv.to(dtype), alpha=w)
    if params.normalize:
        result /= sum(weights)
    return result - base


METHOD = register(
    Method(
        low_rank_output=True,
        name="linear",
        params=LinearParams,
        matrix_rule=linear_rule,
        other_rule=linear_rule,
        other_rule_name="linear",
        paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
        summary="weighted average of the models' weights (mergekit's linear)",
        per_task_params=("weight",),
        needs_base=True,
    )
)
