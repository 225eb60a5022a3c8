"""DARE (Yu et al. 2024, "Language models are super mario: absorbing abilities from
homologous models as a free lunch", arXiv 2311.03099, ICML 2024).

Drop And REscale, per task and elementwise: keep each entry of tau_t with probability 1 - p
(drop it with probability p), and rescale the kept entries by 1 / (1 - p), so that
E[tau^_t] = tau_t. The sparsified task vectors are then merged with Task Arithmetic (sum)
or TIES (its own trim, elect and disjoint mean; trimmed per parameter here, ``ties_k``).
Applied to every parameter, as in the paper.

Randomness: task t's drop mask comes from a CPU ``torch.Generator`` seeded with a 63-bit
BLAKE2b digest of (seed, t), so the same seed gives the same merge on any device. In a
merge of whole checkpoints the engine derives each parameter's seed from (seed, parameter
name) (``seed_per_parameter``), so masks are independent across tensors, reproducible,
and independent of the order in which parameters stream.

Default scale 1.0 (the paper tunes lam per combination; the lead may revisit for TA).
With the defaults p = 0.9 and ties_k = 0.2, TIES's trim keeps all of the ~10% survivors,
so its trim acts only when ties_k < 1 - p.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator

from acemerge.methods.gta import PerTask, gta_method, per_task
from acemerge.methods.registry import Method, MethodParams, compute_dtype_of, register
from acemerge.methods.seeding import derived_seed
from acemerge.methods.task_arithmetic import task_sum
from acemerge.methods.ties import ties_merge

Tensor = torch.Tensor


class DareParams(MethodParams):
    """DARE's parameters; p = 0.9 as in the paper's experiments."""

    p: float = Field(default=0.9, ge=0, lt=1, description="drop probability")
    combine: Literal["task_arithmetic", "ties"] = Field(
        default="task_arithmetic", description="how the sparsified task vectors are merged"
    )
    seed: int = Field(default=0, description="random seed (same seed, same merge)")
    ties_k: float = Field(
        default=0.2, gt=0, le=1, description="TIES top-k fraction (combine='ties' only)"
    )
    weight: PerTask = Field(
        default=1.0, description="per-task weight applied after drop and rescale"
    )

    @model_validator(mode="after")
    def _ties_k_needs_ties(self) -> DareParams:
        if "ties_k" in self.model_fields_set and self.combine != "ties":
            raise ValueError("ties_k applies only to combine='ties'")
        return self


def task_seed(seed: int, task_index: int) -> int:
    """A 63-bit generator seed derived from (seed, task index), stable across runs."""
    return derived_seed("acemerge-dare", seed, task_index)


def seed_per_parameter(params: DareParams, name: str) -> DareParams:
    """The parameters for tensor ``name``: its own seed, derived from (seed, name)."""
    return params.model_copy(update={"seed": derived_seed("acemerge-dare-param", params.seed,
                                                          name)})


def drop_and_rescale(tv: Tensor, p: float, seed: int, task_index: int) -> Tensor:
    """Drop: m ~ Bernoulli(1 - p) keeps; rescale: tau^ = m * tau / (1 - p), in float32 at least."""
    generator = torch.Generator(device="cpu").manual_seed(task_seed(seed, task_index))
    keep = torch.rand(tv.shape, generator=generator) >= p  # P(keep) = 1 - p
    delta = tv.to(compute_dtype_of(tv))
    return torch.where(keep.to(delta.device), delta / (1.0 - p), 0.0)


def dare_rule(task_vectors: list[Tensor], params: DareParams) -> Tensor:
    """Drop and rescale each task vector, then Task Arithmetic or TIES."""
    sparse = [drop_and_rescale(tv, params.p, params.seed, t) for t, tv in enumerate(task_vectors)]
    if params.weight != 1.0:
        weights = per_task(params.weight, len(sparse), "weight")
        sparse = [w * tv for w, tv in zip(weights, sparse, strict=True)]
    if params.combine == "ties":
        return ties_merge(sparse, params.ties_k)
    return task_sum(sparse)


METHOD = register(
    Method(
        name="dare",
        per_parameter=seed_per_parameter,
        params=DareParams,
        matrix_rule=dare_rule,
        other_rule=dare_rule,
        other_rule_name="dare",
        paper="Yu et al. 2024, Language models are super mario (arXiv 2311.03099, ICML 2024)",
        summary="random drop (p) and rescale of each task vector, then TA or TIES",
        default_scale=1.0,
        per_task_params=("weight",),
    )
)

# mergekit's DARE variants: keep with probability ``density``, kept entries rescaled to the
# task vector's L1 norm (mergekit's rescale, not the paper's 1 / density), per-model weights.
DARE_TIES = register(gta_method(
    "dare_ties", "random", consensus=True, normalize=False, rescale=True,
    paper=METHOD.paper, summary="mergekit's DARE: random keep, L1 rescale, TIES consensus"))
DARE_LINEAR = register(gta_method(
    "dare_linear", "random", consensus=False, normalize=False, rescale=True,
    paper=METHOD.paper, summary="mergekit's DARE: random keep, L1 rescale, weighted sum"))
