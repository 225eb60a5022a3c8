"""Generalized task arithmetic with mergekit's semantics: parameters and rule (helper).

Shared by the methods mergekit users know (dare_ties, dare_linear, breadcrumbs,
breadcrumbs_ties, della, della_linear, and ``ties`` with ``semantics=mergekit``); each of
those modules registers its variant with :func:`gta_method`. The steps are in
:mod:`acemerge.methods.sparsify`. Per-task values (``weight``, ``density``, ``gamma``,
``epsilon``) are one number for every task or a list with one per task.
"""

from __future__ import annotations

import torch
from pydantic import Field

from acemerge.errors import AceMergeError
from acemerge.methods.registry import Method, MethodParams, compute_dtype_of
from acemerge.methods.seeding import derived_seed
from acemerge.methods.sparsify import Sparsification, sparsify, weighted_merge

Tensor = torch.Tensor
PerTask = float | list[float]
#: Parameters given per task (one number, or one per task).
PER_TASK_PARAMS = ("weight", "density", "gamma", "epsilon")


class GtaParams(MethodParams):
    """mergekit's parameters of the generalized task arithmetic family."""

    weight: PerTask = Field(default=1.0, description="per-task weight (a number or a list)")
    density: PerTask = Field(default=1.0, description="fraction of entries kept, per task")
    normalize: bool = Field(default=False, description="divide by the sum of the weights")
    rescale: bool = Field(default=False, description="rescale kept entries to the L1 norm")
    gamma: PerTask = Field(default=0.01, description="breadcrumbs: fraction of outliers cut")
    epsilon: PerTask = Field(default=0.15, description="della: half-width of keep rates")
    int8_mask: bool = Field(default=False, description="accepted for mergekit (no effect)")
    seed: int = Field(default=0, description="random masks: seed (with the tensor name)")


def per_task(value: PerTask, count: int, name: str) -> list[float]:
    """One value per task from a number or a list."""
    if isinstance(value, list):
        if len(value) != count:
            raise AceMergeError(f"parameter '{name}' has {len(value)} values for {count} "
                                "task vectors")
        return [float(v) for v in value]
    return [float(value)] * count


def mask_generator(params: GtaParams, task: int) -> torch.Generator:
    """Task ``task``'s mask generator, seeded by (seed, task); in a merge of checkpoints
    the engine first derives each tensor's seed from its name (:func:`seed_per_tensor`)."""
    return torch.Generator().manual_seed(derived_seed("acemerge-gta", params.seed, task))


def gta_merge(task_vectors: list[Tensor], params: GtaParams, sparsification: Sparsification,
              consensus: bool) -> Tensor:
    """Sparsify each task vector, weight, then sum or sign-consensus (see sparsify.py)."""
    count = len(task_vectors)
    dtype = compute_dtype_of(task_vectors[0])
    weights = per_task(params.weight, count, "weight")
    densities = per_task(params.density, count, "density")
    gammas = per_task(params.gamma, count, "gamma")
    epsilons = per_task(params.epsilon, count, "epsilon")
    deltas = [
        sparsify(tv.to(dtype), sparsification, densities[t], rescale=params.rescale,
                 gamma=gammas[t], epsilon=epsilons[t],
                 generator=mask_generator(params, t)
                 if sparsification in ("random", "della") else None)
        for t, tv in enumerate(task_vectors)
    ]
    return weighted_merge(deltas, weights, consensus=consensus, normalize=params.normalize)


def seed_per_tensor(params: GtaParams, name: str) -> GtaParams:
    """The engine's per-parameter hook: tensor ``name`` gets a seed derived from its name."""
    return params.model_copy(update={"seed": derived_seed("acemerge-gta-tensor", params.seed,
                                                          name)})


def gta_method(name: str, sparsification: Sparsification, consensus: bool, *,
               normalize: bool, rescale: bool, paper: str, summary: str) -> Method:
    """A registered-ready Method of the family with mergekit's defaults for ``name``."""
    params_model = type(f"{name.title().replace('_', '')}Params", (GtaParams,), {
        "__annotations__": {"normalize": bool, "rescale": bool},
        "normalize": Field(default=normalize, description="divide by the sum of the weights"),
        "rescale": Field(default=rescale, description="rescale kept entries to the L1 norm"),
        "__doc__": f"{name}'s parameters (mergekit's defaults).",
    })

    def rule(task_vectors: list[Tensor], params: GtaParams) -> Tensor:
        return gta_merge(task_vectors, params, sparsification, consensus)

    rule.__doc__ = f"{name}: {summary}"
    return Method(name=name, params=params_model, matrix_rule=rule, other_rule=rule,
                  other_rule_name=name, paper=paper, summary=summary,
                  per_parameter=seed_per_tensor, per_task_params=PER_TASK_PARAMS)


