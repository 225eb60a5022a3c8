"""Weight averaging (Wortsman et al., 2022, "Model soups", arXiv 2203.05482).

The merged task vector is the plain mean of the task vectors, for every parameter.
"""

from __future__ import annotations

from acemerge.methods.registry import Method, MethodParams, mean_rule, register


class AverageParams(MethodParams):
    """Weight averaging has no parameters."""


METHOD = register(
    Method(
        low_rank_output=True,
        name="average",
        params=AverageParams,
        matrix_rule=mean_rule,
        paper="Wortsman et al. 2022, Model soups (arXiv 2203.05482)",
        summary="mean of the task vectors",
    )
)
