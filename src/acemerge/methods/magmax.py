"""MagMax (Marczak et al. 2024, "MagMax: Leveraging model merging for seamless continual
learning", arXiv 2407.06322, ECCV 2024): per entry, the task vector value of largest
magnitude ("maximum magnitude selection"); ties go to the first task.
"""

from __future__ import annotations

import torch

from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register

Tensor = torch.Tensor


class MagMaxParams(MethodParams):
    """MagMax has no parameters besides the scale lam."""


def magmax_rule(task_vectors: list[Tensor], params: MagMaxParams) -> Tensor:
    """D[i] = D_t[i] with t = argmax_t |D_t[i]| (running selection, no stacked copy)."""
    dtype = compute_dtype_of(task_vectors[0])
    merged = task_vectors[0].to(dtype, copy=True)
    for tv in task_vectors[1:]:
        tv = tv.to(dtype)
        merged = torch.where(tv.abs() > merged.abs(), tv, merged)
    return merged


METHOD = register(
    Method(
        name="magmax",
        params=MagMaxParams,
        matrix_rule=magmax_rule,
        other_rule=magmax_rule,
        other_rule_name="magmax",
        paper="Marczak et al. 2024, MagMax (arXiv 2407.06322, ECCV 2024)",
        summary="per entry, the task vector value of largest magnitude",
        display_name="MagMax",
    )
)
