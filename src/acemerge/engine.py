"""The streaming engine: parameter by parameter, read -> task vectors -> method -> write.

At any moment it holds one parameter of the base and of each expert, their task
vectors and the merged result: about (T + 2) copies of the largest parameter plus the
method's workspace, never whole models.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from acemerge.errors import AceMergeError
from acemerge.io.readers import Checkpoint
from acemerge.methods.registry import Method, MethodParams
from acemerge.plan import Plan, PlanEntry, Treatment


@dataclass(frozen=True)
class MergeStep:
    """What happened to one parameter (passed to observers and returned in the report)."""

    entry: PlanEntry
    seconds: float


#: Called with the plan entry, the oriented task vectors, the merged task vector and seconds.
Observer = Callable[[PlanEntry, list[torch.Tensor], torch.Tensor, float], None]


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


def check_compatible(base: Checkpoint, experts: list[Checkpoint], plan: Plan) -> None:
    """Every expert has exactly the base's parameters, with the base's shapes where merged."""
    if len(experts) < 2:
        raise AceMergeError(f"at least two experts are needed, got {len(experts)}")
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
) -> list[MergeStep]:
    """Merge every parameter of ``plan`` and hand each result to ``emit`` in plan order."""
    check_compatible(base, experts, plan)
    device = torch.device(device)
    steps = []
    with tqdm(total=plan.total_numel, unit="param", unit_scale=True, desc="merging",
              disable=not progress, dynamic_ncols=True) as bar:
        for entry in plan.entries:
            start = time.perf_counter()
            base_tensor = base.get(entry.name)
            _finite(base_tensor, base.label, entry.name)
            if entry.treatment is Treatment.KEEP:
                merged = base_tensor
            else:
                merged = _merge_one(entry, base_tensor, experts, method, params,
                                    scale, compute_dtype, device, observer, start)
            emit(entry.name, merged.to(output_dtype(entry, dtype)).cpu())
            steps.append(MergeStep(entry, time.perf_counter() - start))
            bar.update(entry.numel)
    return steps


def _merge_one(
    entry: PlanEntry,
    base_tensor: torch.Tensor,
    experts: list[Checkpoint],
    method: Method,
    params: MethodParams,
    scale: float,
    compute_dtype: torch.dtype,
    device: torch.device,
    observer: Observer | None,
    start: float,
) -> torch.Tensor:
    base_c = base_tensor.to(device=device, dtype=compute_dtype)
    task_vectors = []
    for expert in experts:
        weight = expert.get(entry.name)
        _finite(weight, expert.label, entry.name)
        task_vectors.append(weight.to(device=device, dtype=compute_dtype) - base_c)
        del weight
    if entry.transpose:
        task_vectors = [tv.T for tv in task_vectors]
    merged = method.apply(task_vectors, params, matrix=entry.treatment is Treatment.MATRIX)
    if observer is not None:
        observer(entry, task_vectors, merged, time.perf_counter() - start)
    if entry.transpose:
        merged = merged.T
    if not torch.isfinite(merged).all():
        raise AceMergeError(
            f"method '{method.name}' produced NaN or Inf for parameter '{entry.name}'"
        )
    return base_c + scale * merged
