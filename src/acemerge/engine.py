"""The streaming engine: parameter by parameter, read -> task vectors -> method -> write.

At any moment it holds one parameter of the base and of each expert, their task
vectors and the merged result: about (T + 2) copies of the largest parameter plus the
method's workspace, never whole models.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from acemerge.errors import AceMergeError
from acemerge.io.readers import Checkpoint
from acemerge.methods.registry import Factored, Method, MethodParams, sequential_pass
from acemerge.plan import Plan, PlanEntry, Treatment
from acemerge.statistics import ELEMENTWISE_KINDS, StatisticsProvider


@dataclass(frozen=True)
class MergeStep:
    """What happened to one parameter (passed to observers and returned in the report)."""

    entry: PlanEntry
    seconds: float


#: Called with the plan entry, the oriented task vectors, the merged task vector and seconds.
Observer = Callable[[PlanEntry, list[torch.Tensor], torch.Tensor, float], None]
#: A tensor name -> the method parameters and the scale for that tensor.
TensorParams = Callable[[str], tuple[MethodParams, float]]


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable device is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise AceMergeError(f"unknown device '{device}'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AceMergeError(f"device '{device}' is not available on this machine")
    return resolved


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


def output_dtype(entry: PlanEntry, dtype: torch.dtype | None) -> torch.dtype:
    """Floating tensors take the requested dtype (default: the base's); others keep theirs."""
    return dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype


def _finite(tensor: torch.Tensor, label: str, name: str) -> None:
    if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
        raise AceMergeError(f"{label}: parameter '{name}' contains NaN or Inf")


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
) -> list[MergeStep]:
    """Merge every parameter of ``plan`` and hand each result to ``emit`` in plan order.

    A method with a whole-model statistic (``prepare``) first runs map-reduce passes over
    the merged parameters' task vectors, streamed here; nothing is held beyond one parameter.
    ``tensor_params`` gives a parameter's own (params, scale) where they vary per tensor
    (mergekit's filters and gradients); otherwise ``params`` and ``scale`` apply to all.
    With ``emit_updates`` the engine hands over lam * D (the merged update, in the compute
    dtype, stored layout) instead of the merged weight, and skips kept parameters.
    ``low_rank`` lets LoRA experts stay factored where the method has a low-rank rule;
    False materializes their task vectors for the dense rule.
    """
    check_expert_count(method, len(experts))
    check_compatible(base, experts, plan)
    if method.needs and stats is None:
        raise AceMergeError(
            f"method '{method.name}' is data-dependent: it needs per-task statistics "
            f"({', '.join(method.needs)}), none were given"
        )
    device = torch.device(device)
    if method.prepare is not None:
        merged_entries = [e for e in plan.entries if e.treatment is not Treatment.KEEP]
        reader = TaskVectorReader(base, experts, compute_dtype, device)

        def passes() -> Iterator[list[torch.Tensor]]:
            shown = tqdm(merged_entries, unit="tensor", disable=not progress, leave=False,
                         desc=f"{method.name}: whole-model pass", dynamic_ncols=True)
            return (reader.read(entry) for entry in shown)

        params = method.prepare(sequential_pass(passes), params)
    steps = []
    with tqdm(total=plan.total_numel, unit="param", unit_scale=True, desc="merging",
              disable=not progress, dynamic_ncols=True) as bar:
        for entry in plan.entries:
            start = time.perf_counter()
            base_tensor = base.get(entry.name)
            _finite(base_tensor, base.label, entry.name)
            if entry.treatment is Treatment.KEEP:
                if not emit_updates:
                    emit(entry.name, base_tensor.to(output_dtype(entry, dtype)))
            else:
                reader = TaskVectorReader(base, experts, compute_dtype, device)
                entry_params, entry_scale = (tensor_params(entry.name) if tensor_params
                                             else (params, scale))
                base_c = reader.to_compute(base_tensor)
                update = entry_scale * _merge_one(entry, base_c, reader, method, entry_params,
                                                  observer, stats, start, low_rank)
                if emit_updates:
                    emit(entry.name, update.cpu())
                else:
                    emit(entry.name, (base_c + update).to(output_dtype(entry, dtype)).cpu())
            steps.append(MergeStep(entry, time.perf_counter() - start))
            bar.update(entry.numel)
    return steps


class TaskVectorReader:
    """Reads one parameter of every expert and returns its oriented task vectors."""

    def __init__(self, base: Checkpoint, experts: list[Checkpoint],
                 compute_dtype: torch.dtype, device: torch.device) -> None:
        self.base, self.experts = base, experts
        self.compute_dtype, self.device = compute_dtype, device

    def to_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(device=self.device, dtype=self.compute_dtype)

    def read(self, entry: PlanEntry, base_c: torch.Tensor | None = None
             ) -> list[torch.Tensor]:
        """T task vectors of ``entry``, (d_out, d_in) for matrices; ``base_c`` is the base
        parameter already in the compute dtype (read when not given)."""
        if base_c is None:
            base_c = self.to_compute(self.base.get(entry.name))
        task_vectors = []
        for expert in self.experts:
            tv = expert.task_vector(entry.name, base_c)
            _finite(tv, expert.label, entry.name)
            task_vectors.append(tv)
        return [tv.T for tv in task_vectors] if entry.transpose else task_vectors

    def factors(self, entry: PlanEntry, base_c: torch.Tensor) -> list[Factored] | None:
        """Every expert's task vector of ``entry`` in factored, oriented form, or None when
        one of them has no low-rank form (a full checkpoint)."""
        out = []
        for expert in self.experts:
            pair = expert.factored_update(entry.name, base_c)
            if pair is None:
                return None
            left, right = pair
            _finite(left, expert.label, entry.name)
            _finite(right, expert.label, entry.name)
            out.append(Factored(right.T, left.T) if entry.transpose else Factored(left, right))
        return out

    def statistics(self, entry: PlanEntry, needs: tuple[str, ...],
                   stats: StatisticsProvider | None) -> dict[str, list[torch.Tensor]] | None:
        """Each needed statistic for every task, oriented like the task vectors."""
        if not needs or stats is None:
            return None
        out = {}
        for kind in needs:
            tensors = [self.to_compute(stats.get(kind, entry.name, t))
                       for t in range(len(self.experts))]
            if entry.transpose and kind in ELEMENTWISE_KINDS:
                tensors = [t.T for t in tensors]
            out[kind] = tensors
        return out


def _merge_low_rank(entry: PlanEntry, base_c: torch.Tensor, reader: TaskVectorReader,
                    method: Method, params: MethodParams) -> torch.Tensor | None:
    """The method's low-rank rule when every expert is low-rank here (LoRA), else None."""
    factors = reader.factors(entry, base_c)
    if factors is None:
        return None
    assert method.low_rank_rule is not None
    result = method.low_rank_rule(factors, params)
    if result is None:
        return None
    merged = result.dense().to(base_c.dtype)
    if not torch.isfinite(merged).all():
        raise AceMergeError(
            f"method '{method.name}' produced NaN or Inf for parameter '{entry.name}'"
        )
    return merged.T if entry.transpose else merged


def _merge_one(
    entry: PlanEntry,
    base_c: torch.Tensor,
    reader: TaskVectorReader,
    method: Method,
    params: MethodParams,
    observer: Observer | None,
    stats: StatisticsProvider | None,
    start: float,
    low_rank: bool = True,
) -> torch.Tensor:
    """The merged task vector D of one parameter (``base_c``: the base in the compute dtype),
    in its stored layout."""
    matrix = entry.treatment is Treatment.MATRIX
    if method.per_parameter is not None:
        params = method.per_parameter(params, entry.name)
    if matrix and low_rank and method.low_rank_rule is not None and observer is None:
        merged = _merge_low_rank(entry, base_c, reader, method, params)
        if merged is not None:
            return merged
    task_vectors = reader.read(entry, base_c)
    needs = method.matrix_needs if matrix else method.other_needs
    oriented_base = base_c.T if entry.transpose else base_c
    merged = method.apply(task_vectors, params, matrix=matrix,
                          stats=reader.statistics(entry, needs, stats),
                          base=oriented_base if method.needs_base else None)
    if observer is not None:
        observer(entry, task_vectors, merged, time.perf_counter() - start)
    if entry.transpose:
        merged = merged.T
    if not torch.isfinite(merged).all():
        raise AceMergeError(
            f"method '{method.name}' produced NaN or Inf for parameter '{entry.name}'"
        )
    return merged
