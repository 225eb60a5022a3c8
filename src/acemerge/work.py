"""The per-parameter work of a merge, runnable anywhere the inputs can be opened.

``merge_parameter(inputs, entry, settings)`` reads the base tensor and every expert's task
vectors for one plan entry, runs the method and returns the merged tensor in the output
dtype. It is split in two halves, ``read_parameter`` and ``merge_read``, so that an executor
may read the next parameter while it merges this one. ``MergeSettings`` is plain data (it
travels to other processes); ``MergeInputs`` holds opened checkpoints (local to a process).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from acemerge.errors import AceMergeError
from acemerge.io.readers import Checkpoint
from acemerge.methods.registry import Factored, Method, MethodParams
from acemerge.plan import PlanEntry, Treatment
from acemerge.statistics import ELEMENTWISE_KINDS, StatisticsProvider

#: Called with the plan entry, the oriented task vectors, the merged task vector and seconds.
Observer = Callable[[PlanEntry, list[torch.Tensor], torch.Tensor, float], None]
#: A tensor name -> the method parameters and the scale for that tensor.
TensorParams = Callable[[str], tuple[MethodParams, float]]


@dataclass(frozen=True)
class MergeStep:
    """What happened to one parameter (passed to observers and returned in the report):
    ``seconds`` of reading and merging it, wherever that ran (writing not included)."""

    entry: PlanEntry
    seconds: float


@dataclass(frozen=True)
class MergeSettings:
    """How every parameter of one merge is merged (picklable: it travels to workers)."""

    method: Method
    params: MethodParams
    scale: float = 1.0
    compute_dtype: torch.dtype = torch.float32
    #: Where to compute: ``cpu``, ``cuda``, ``cuda:1`` or ``auto`` (resolved where it runs).
    device: str = "cpu"
    #: Output dtype of floating tensors (None: the base's).
    dtype: torch.dtype | None = None
    #: Return lam * D (compute dtype, stored layout) instead of the weight; skip kept ones.
    emit_updates: bool = False
    low_rank: bool = True


@dataclass
class MergeInputs:
    """The opened inputs of a merge in this process."""

    base: Checkpoint
    experts: list[Checkpoint]
    stats: StatisticsProvider | None = None
    #: Per-tensor (params, scale) where they vary per tensor (mergekit's schedules).
    tensor_params: TensorParams | None = None
    #: Sees every merged parameter's task vectors (only where the merge runs in-process).
    observer: Observer | None = None


@dataclass
class ParameterRead:
    """One parameter's inputs, read: the base as stored and, for a merged parameter, the
    base in the compute dtype with the experts' factored (LoRA) or dense task vectors."""

    entry: PlanEntry
    base: torch.Tensor
    base_c: torch.Tensor | None = None
    factors: list[Factored] | None = None
    task_vectors: list[torch.Tensor] | None = None
    seconds: float = 0.0


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto`` picks CUDA when available; an unavailable device is an error."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise AceMergeError(f"unknown device '{device}'") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise AceMergeError(f"device '{device}' is not available on this machine")
    return resolved


def output_dtype(entry: PlanEntry, dtype: torch.dtype | None) -> torch.dtype:
    """Floating tensors take the requested dtype (default: the base's); others keep theirs."""
    return dtype if dtype is not None and entry.dtype.is_floating_point else entry.dtype


def check_finite(tensor: torch.Tensor, label: str, name: str) -> None:
    """A one-line error naming the file and parameter where a tensor has NaN or Inf."""
    if tensor.dtype.is_floating_point and not torch.isfinite(tensor).all():
        raise AceMergeError(f"{label}: parameter '{name}' contains NaN or Inf")


def merge_parameter(inputs: MergeInputs, entry: PlanEntry, settings: MergeSettings,
                    device: torch.device) -> tuple[MergeStep, torch.Tensor | None]:
    """One parameter, read and merged: its step and the tensor to emit (None: nothing)."""
    read = read_parameter(inputs, entry, settings, device)
    return merge_read(inputs, read, settings)


def read_parameter(inputs: MergeInputs, entry: PlanEntry, settings: MergeSettings,
                   device: torch.device) -> ParameterRead:
    """The reading half: the base tensor and, for merged parameters, the task vectors
    (factored where the merge will use the method's low-rank rule)."""
    start = time.perf_counter()
    base = inputs.base.get(entry.name)
    check_finite(base, inputs.base.label, entry.name)
    read = ParameterRead(entry, base)
    if entry.treatment is not Treatment.KEEP:
        reader = TaskVectorReader(inputs.base, inputs.experts, settings.compute_dtype, device)
        read.base_c = reader.to_compute(base)
        if _wants_low_rank(entry, settings, inputs.observer):
            read.factors = reader.factors(entry, read.base_c)
        if read.factors is None:
            read.task_vectors = reader.read(entry, read.base_c)
    read.seconds = time.perf_counter() - start
    return read


def merge_read(inputs: MergeInputs, read: ParameterRead, settings: MergeSettings
               ) -> tuple[MergeStep, torch.Tensor | None]:
    """The merging half: the method on the read task vectors, the result in output dtype."""
    start = time.perf_counter()
    entry = read.entry
    if entry.treatment is Treatment.KEEP:
        out = None if settings.emit_updates else read.base.to(output_dtype(entry, settings.dtype))
    else:
        assert read.base_c is not None
        params, scale = (inputs.tensor_params(entry.name) if inputs.tensor_params
                         else (settings.params, settings.scale))
        update = scale * _merge_one(inputs, read, settings.method, params, settings,
                                    time.perf_counter() - read.seconds)
        out = update.cpu() if settings.emit_updates else \
            (read.base_c + update).to(output_dtype(entry, settings.dtype)).cpu()
    return MergeStep(entry, read.seconds + time.perf_counter() - start), out


def task_vectors_of(inputs: MergeInputs, entry: PlanEntry, settings: MergeSettings,
                    device: torch.device) -> list[torch.Tensor]:
    """The T oriented dense task vectors of one parameter (for whole-model passes)."""
    reader = TaskVectorReader(inputs.base, inputs.experts, settings.compute_dtype, device)
    return reader.read(entry)


def _wants_low_rank(entry: PlanEntry, settings: MergeSettings, observer: Observer | None
                    ) -> bool:
    return (entry.treatment is Treatment.MATRIX and settings.low_rank
            and settings.method.low_rank_rule is not None and observer is None)


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
            check_finite(tv, expert.label, entry.name)
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
            check_finite(left, expert.label, entry.name)
            check_finite(right, expert.label, entry.name)
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


def _merge_low_rank(entry: PlanEntry, base_c: torch.Tensor, factors: list[Factored],
                    method: Method, params: MethodParams) -> torch.Tensor | None:
    """The method's low-rank rule on the experts' factors, or None where it declines."""
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


def _merge_one(inputs: MergeInputs, read: ParameterRead, method: Method,
               params: MethodParams, settings: MergeSettings, start: float) -> torch.Tensor:
    """The merged task vector D of one parameter, in its stored layout (``start``: the
    perf_counter at which reading it began, for the observer)."""
    entry, base_c = read.entry, read.base_c
    assert base_c is not None
    matrix = entry.treatment is Treatment.MATRIX
    if method.per_parameter is not None:
        params = method.per_parameter(params, entry.name)
    reader = TaskVectorReader(inputs.base, inputs.experts, settings.compute_dtype,
                              base_c.device)
    if read.factors is not None:
        merged = _merge_low_rank(entry, base_c, read.factors, method, params)
        if merged is not None:
            return merged
    task_vectors = read.task_vectors if read.task_vectors is not None \
        else reader.read(entry, base_c)
    read.task_vectors = None  # the caller's reference would keep them alive
    needs = method.matrix_needs if matrix else method.other_needs
    oriented_base = base_c.T if entry.transpose else base_c
    merged = method.apply(task_vectors, params, matrix=matrix,
                          stats=reader.statistics(entry, needs, inputs.stats),
                          base=oriented_base if method.needs_base else None)
    if inputs.observer is not None:
        inputs.observer(entry, task_vectors, merged, time.perf_counter() - start)
    if entry.transpose:
        merged = merged.T
    if not torch.isfinite(merged).all():
        raise AceMergeError(
            f"method '{method.name}' produced NaN or Inf for parameter '{entry.name}'"
        )
    return merged
