"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of
Language Models", arXiv 2212.09849).

Each linear layer is merged by the closed-form minimiser of sum_t ||X_t W^T - X_t W_t^T||^2
over the layers' real inputs X_t (rows = tokens), with the Gram G_t = X_t^T X_t (d_in, d_in)
collected from task t's data (``acemerge.statistics.collect_statistics``). For a
(d_out, d_in) weight, input on the right:

    G~_t = a G_t + (1 - a) diag(G_t)                           (non-diagonal reduction)
    W    = (sum_t W_t G~_t) (sum_t G~_t)^-1                     (closed form)

In task-vector form, with D_t = W_t - W_0, the merged task vector is

    D    = (sum_t D_t G~_t) (sum_t G~_t)^-1,

identical to the full-weight form because W_0 (sum_t G~_t)(sum_t G~_t)^-1 = W_0. The two
forms differ only if sum_t G~_t is singular (a = 1 with fewer tokens than d_in): the
pseudo-inverse fallback then keeps the base weight along input directions no task's data
reached, where the full-weight form would set them to zero. A layer no data reached at
all (every Gram zero) gets the plain mean. Non-matrix parameters (biases, norms,
embeddings) get the plain mean, as in the paper.
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.errors import AceMergeError
from acemerge.methods.ace import solve_right
from acemerge.methods.registry import (
    Method,
    MethodParams,
    compute_dtype_of,
    mean_rule,
    register,
)

Tensor = torch.Tensor


class RegMeanParams(MethodParams):
    """RegMean's parameter: the non-diagonal reduction ratio a."""

    alpha: float = Field(
        default=0.9,
        ge=0,
        le=1,
        description="G~ = alpha G + (1 - alpha) diag(G); 1 is the exact least-squares merge, "
        "0 a per-input-feature weighted mean (the paper tunes 0.1..0.95)",
    )


def reduce_gram(gram: Tensor, alpha: float) -> Tensor:
    """G~ = a G + (1 - a) diag(G): off-diagonal entries scaled by a, diagonal kept."""
    reduced = alpha * gram
    reduced.diagonal().copy_(gram.diagonal())
    return reduced


def check_grams(task_vectors: list[Tensor], grams: list[Tensor]) -> None:
    """One (d_in, d_in) Gram per task vector."""
    if len(grams) != len(task_vectors):
        raise AceMergeError(
            f"method 'regmean': {len(grams)} Grams for {len(task_vectors)} task vectors"
        )
    d_out, d_in = task_vectors[0].shape
    for task, gram in enumerate(grams):
        if tuple(gram.shape) != (d_in, d_in):
            raise AceMergeError(
                f"method 'regmean': the Gram of task {task} has shape {tuple(gram.shape)}, "
                f"a ({d_out}, {d_in}) weight needs ({d_in}, {d_in}) (the input space)"
            )


def regmean_matrix(task_vectors: list[Tensor], params: RegMeanParams,
                   grams: list[Tensor]) -> Tensor:
    """RegMean for one (d_out, d_in) weight: the merged task vector."""
    check_grams(task_vectors, grams)
    dtype = compute_dtype_of(task_vectors[0])
    numerator = torch.zeros_like(task_vectors[0], dtype=dtype)
    system = torch.zeros_like(grams[0], dtype=dtype)
    for tv, gram in zip(task_vectors, grams, strict=True):
        reduced = reduce_gram(gram.to(dtype), params.alpha)  # G~_t
        numerator += tv.to(dtype) @ reduced  # sum_t D_t G~_t
        system += reduced  # sum_t G~_t
    if not system.any():  # no task's data reached this layer
        return mean_rule(task_vectors, params)
    return solve_right(numerator, system, "solve")  # (sum D_t G~_t)(sum G~_t)^-1


METHOD = register(
    Method(
        name="regmean",
        params=RegMeanParams,
        matrix_rule=regmean_matrix,
        paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language "
        "Models (RegMean, arXiv 2212.09849)",
        summary="least-squares merge of each linear layer under its inputs' Grams (needs data)",
        matrix_needs=("grams",),
    )
)
