"""The streaming engine: checks, a method's whole-model passes, then every parameter's
merged tensor handed to ``emit`` in plan order.

The per-parameter work (read -> task vectors -> method, :mod:`acemerge.work`) runs in an
executor (:mod:`acemerge.executors`): by default the local one, which holds the inputs of
at most two parameters (the one merging and the one read ahead) and one result being
written, about 2 (T + 2) copies of the largest parameter plus the method's workspace, never
whole models.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import closing
from dataclasses import replace
from typing import Any

import torch
from tqdm.auto import tqdm

from acemerge.errors import AceMergeError
from acemerge.executors.base import Executor
from acemerge.executors.local import LocalExecutor
from acemerge.io.readers import Checkpoint
from acemerge.methods.registry import Method, MethodParams, PassMap, PassReduce
from acemerge.plan import Plan, Treatment
from acemerge.statistics import StatisticsProvider
from acemerge.work import (  # noqa: F401 - re-exported: the engine's public names
    MergeInputs,
    MergeSettings,
    MergeStep,
    Observer,
    TaskVectorReader,
    TensorParams,
    output_dtype,
    resolve_device,
)


def check_expert_count(method: Method, count: int) -> None:
    """The method's number of experts (two or more for most; SLERP takes one)."""
    if count < method.min_experts:
        needed = "one expert is" if method.min_experts == 1 else \
            f"at least {'two' if method.min_experts == 2 else method.min_experts} experts are"
        raise AceMergeError(f"{needed} needed, got {count}")
    if method.max_experts is not None and count > method.max_experts:
        raise AceMergeError(f"method '{method.name}' takes at most {method.max_experts} "
                            f"expert(s) besides the base, got {count}")


def check_compatible(base: Checkpoint, experts: list[Checkpoint], plan: Plan) -> None:
    """Every expert has exactly the base's parameters, with the base's shapes where merged."""
    base_specs = base.specs()
    for expert in experts:
        specs = expert.specs()
        missing = [name for name in base_specs if name not in specs]
        if missing:
            raise AceMergeError(f"{expert.label}: missing parameter '{missing[0]}'")
        extra = [name for name in specs if name not in base_specs]
        if extra:
            raise AceMergeError(f"{expert.label}: extra parameter '{extra[0]}' not in the base")
        for entry in plan.entries:
            shape = specs[entry.name][0]
            if entry.treatment is not Treatment.KEEP and shape != entry.shape:
                raise AceMergeError(
                    f"{expert.label}: parameter '{entry.name}' has shape {shape}, "
                    f"the base has {entry.shape}"
                )


def merge_stream(
    base: Checkpoint,
    experts: list[Checkpoint],
    method: Method,
    params: MethodParams,
    plan: Plan,
    emit: Callable[[str, torch.Tensor], None],
    *,
    scale: float = 1.0,
    compute_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
    progress: bool = False,
    observer: Observer | None = None,
    stats: StatisticsProvider | None = None,
    tensor_params: TensorParams | None = None,
    emit_updates: bool = False,
    low_rank: bool = True,
    executor: Executor | None = None,
) -> list[MergeStep]:
    """Merge every parameter of ``plan`` and hand each result to ``emit`` in plan order.

    A method with a whole-model statistic (``prepare``) first runs map-reduce passes over
    the merged parameters' task vectors through the executor; nothing is held beyond a
    parameter or two. ``tensor_params`` gives a parameter's own (params, scale) where they
    vary per tensor (mergekit's filters and gradients); otherwise ``params`` and ``scale``
    apply to all. With ``emit_updates`` the engine hands over lam * D (the merged update, in
    the compute dtype, stored layout) instead of the merged weight, and skips kept
    parameters. ``low_rank`` lets LoRA experts stay factored where the method has a
    low-rank rule; False materializes their task vectors for the dense rule. ``executor``
    runs the per-parameter work (default: a local one, closed at the end).
    """
    check_expert_count(method, len(experts))
    check_compatible(base, experts, plan)
    if method.needs and stats is None:
        raise AceMergeError(
            f"method '{method.name}' is data-dependent: it needs per-task statistics "
            f"({', '.join(method.needs)}), none were given"
        )
    inputs = MergeInputs(base, experts, stats, tensor_params, observer)
    settings = MergeSettings(method, params, scale, compute_dtype, str(device), dtype,
                             emit_updates, low_rank)
    owned = executor is None
    runner = executor or LocalExecutor()
    try:
        if method.prepare is not None:
            settings = replace(settings, params=_prepare(runner, inputs, settings, plan,
                                                         progress))
        return _merge_all(runner, inputs, settings, plan, emit, progress)
    finally:
        if owned:
            runner.close()


def _prepare(executor: Executor, inputs: MergeInputs, settings: MergeSettings, plan: Plan,
             progress: bool) -> MethodParams:
    """The method's whole-model statistic, from map-reduce passes run by the executor."""
    merged = [e for e in plan.entries if e.treatment is not Treatment.KEEP]
    method = settings.method
    assert method.prepare is not None

    def model_pass(map_fn: PassMap, reduce_fn: PassReduce) -> Any:
        with tqdm(total=len(merged), unit="tensor", disable=not progress, leave=False,
                  desc=f"{method.name}: whole-model pass", dynamic_ncols=True) as bar:
            return executor.map_reduce(inputs, settings, merged, map_fn, reduce_fn,
                                       done=lambda entry: bar.update())

    return method.prepare(model_pass, settings.params)


def _merge_all(executor: Executor, inputs: MergeInputs, settings: MergeSettings, plan: Plan,
               emit: Callable[[str, torch.Tensor], None], progress: bool) -> list[MergeStep]:
    """Every entry's result from the executor, emitted in plan order."""
    steps = []
    with tqdm(total=plan.total_numel, unit="param", unit_scale=True, desc="merging",
              disable=not progress, dynamic_ncols=True) as bar, \
            closing(executor.merge(inputs, settings, plan.entries)) as results:
        for entry, (step, tensor) in zip(plan.entries, results, strict=True):
            if step.entry.name != entry.name:
                raise AceMergeError(f"internal: executor returned '{step.entry.name}' in "
                                    f"place of '{entry.name}'")
            if tensor is not None:
                emit(entry.name, tensor)
            del tensor
            steps.append(step)
            bar.update(entry.numel)
    return steps
