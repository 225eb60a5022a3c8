"""Weight averaging (Wortsman et al., 2022, "Model soups", arXiv 2203.05482).

The merged task vector is the plain mean of the task vectors, for every parameter.
"""

from __future__ import annotations

import torch

from acemerge.methods.registry import Factored, Method, MethodParams, mean_rule, register


class AverageParams(MethodParams):
    """Weight averaging has no parameters."""


def average_low_rank(factors: list[Factored], params: AverageParams) -> Factored:
    """mean_t L_t R_t = [L_t / T] [R_t]: the factors side by side."""
    count = len(factors)
    return Factored(torch.cat([f.left / count for f in factors], dim=1),
                    torch.cat([f.right for f in factors]))


METHOD = register(
    Method(
        low_rank_output=True,
        low_rank_rule=average_low_rank,
        name="average",
        params=AverageParams,
        matrix_rule=mean_rule,
        paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
        summary="mean of the task vectors",
    )
)
