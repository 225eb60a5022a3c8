"""Model Stock (Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned
models", arXiv 2403.19522), Eq. 7, as mergekit 0.1.5 applies it per tensor.

cos = mean over pairs of the cosine between task vectors (flattened, or per row with
``filter_wise``; norms products clamped at 1e-6), t = N cos / (1 + (N - 1) cos), and
W = t mean_i W_i + (1 - t) W_0, i.e. the merged task vector t * mean_i D_i. Where the
denominator vanishes (|.| < 1e-6) t = 0: the base is kept.
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register, sum_of

Tensor = torch.Tensor
SINGULAR = 1e-6


class ModelStockParams(MethodParams):
    """Whether the angle is taken per row (filter) instead of over the whole tensor."""

    filter_wise: bool = Field(default=False, description="one ratio t per row of the tensor")


def interpolation_ratio(offsets: list[Tensor]) -> Tensor:
    """t = N cos / (1 + (N - 1) cos), cos the mean pairwise cosine over the last axis."""
    cosines = []
    for i, a in enumerate(offsets):
        for b in offsets[i + 1:]:
            norms = (a.norm(dim=-1) * b.norm(dim=-1)).clamp(min=SINGULAR)
            cosines.append(((a * b).sum(dim=-1) / norms).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    count = len(offsets)
    denominator = 1 + (count - 1) * cos
    singular = denominator.abs() < SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cos), count * cos / safe)


def model_stock_rule(task_vectors: list[Tensor], params: ModelStockParams) -> Tensor:
    """t * mean_i D_i, with t from the task vectors' angles."""
    dtype = compute_dtype_of(task_vectors[0])
    shape = task_vectors[0].shape
    if params.filter_wise:
        offsets = [tv.to(dtype).reshape(1, -1) if tv.dim() < 2 else tv.to(dtype)
                   for tv in task_vectors]
    else:
        offsets = [tv.to(dtype).reshape(-1) for tv in task_vectors]
    ratio = interpolation_ratio(offsets)
    mean = sum_of(offsets).div_(len(offsets))
    return (ratio * mean).reshape(shape)


METHOD = register(
    Method(
        low_rank_output=True,
        name="model_stock",
        params=ModelStockParams,
        matrix_rule=model_stock_rule,
        other_rule=model_stock_rule,
        other_rule_name="model_stock",
        paper="Jang, Yun & Han 2024, Model Stock (arXiv 2403.19522, ECCV 2024)",
        summary="the average pulled toward the base by the task vectors' angle",
    )
)
