"""The Ray executor: the per-parameter work as Ray tasks on many workers.

Each task merges one unit of work (a large parameter, or consecutive small ones): the worker
opens the checkpoints itself from the config (paths visible to every node, or hub ids),
keeps them open for the next tasks of the same merge, reads only its unit's tensors, runs
the method and returns the merged tensors. The driver keeps at most ``max_in_flight`` units
submitted and not yet written, and hands results on in plan order as soon as they are next,
so the output is written by the same writer in the same order as a local merge.

``workers`` tasks run at once, each in a slot of a placement group (1 CPU, and 1 GPU with
``--device cuda``). A task whose worker process dies is retried (``MAX_RETRIES``). Tasks
compute with the driver's torch thread count: BLAS and LAPACK group their sums by thread,
so this keeps the results bitwise those of a local merge on the same hardware.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from acemerge.errors import AceMergeError
from acemerge.executors.base import (
    BATCH_NUMEL,
    Done,
    Executor,
    submitted_in_order,
    units_for,
)
from acemerge.inputs import InputSource
from acemerge.io.readers import one_line
from acemerge.methods.registry import PassMap, PassReduce
from acemerge.plan import PlanEntry
from acemerge.work import (
    MergeInputs,
    MergeSettings,
    MergeStep,
    merge_parameter,
    resolve_device,
    task_vectors_of,
)

#: Retries of a task whose worker process died (Ray's max_retries).
MAX_RETRIES = 3
#: Seconds to wait for the cluster to reserve the workers' slots.
RESERVE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RemoteJob:
    """What every task of one merge receives: how to open the inputs, how to merge."""

    token: str
    source: InputSource
    settings: MergeSettings
    threads: int
    #: The in-memory statistics as a Ray object (fetched once per worker), if any.
    statistics: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Failure:
    """A task's one-line error (bad input found by a worker)."""

    message: str


_OPENED: dict[str, MergeInputs] = {}
_NOTHING = object()


def _inputs(job: RemoteJob) -> MergeInputs:
    """The job's inputs, opened once per worker process (the latest merge's only)."""
    if job.token not in _OPENED:
        _OPENED.clear()
        stats = ray.get(job.statistics[0]) if job.statistics else None
        source = replace(job.source, statistics=stats) if stats is not None else job.source
        try:
            _OPENED[job.token] = source.open()
        except AceMergeError as exc:
            node = ray.util.get_node_ip_address()
            raise AceMergeError(f"Ray worker on {node}: {exc} (inputs must be readable at "
                                "the same path on every node)") from None
    return _OPENED[job.token]


def _device(job: RemoteJob) -> torch.device:
    torch.set_num_threads(job.threads)
    return resolve_device(job.settings.device)


def _merge_unit(job: RemoteJob, entries: list[PlanEntry]
                ) -> list[tuple[MergeStep, torch.Tensor | None]] | Failure:
    """The task: every entry of one unit, merged."""
    try:
        inputs, device = _inputs(job), _device(job)
        return [merge_parameter(inputs, entry, job.settings, device) for entry in entries]
    except AceMergeError as exc:
        return Failure(str(exc))


def _map_unit(job: RemoteJob, entries: list[PlanEntry], map_fn: PassMap,
              reduce_fn: PassReduce) -> Any:
    """The task of a whole-model pass: the map of every entry of one unit, reduced."""
    try:
        inputs, device = _inputs(job), _device(job)
        parts = (map_fn(task_vectors_of(inputs, e, job.settings, device)) for e in entries)
        result = next(parts)
        for part in parts:
            result = reduce_fn(result, part)
        return result
    except AceMergeError as exc:
        return Failure(str(exc))


_merge_task = ray.remote(max_retries=MAX_RETRIES)(_merge_unit)
_map_task = ray.remote(max_retries=MAX_RETRIES)(_map_unit)


class RayExecutor(Executor):
    """Runs the work as Ray tasks; joins ``address`` or starts a local Ray."""

    name = "ray"

    def __init__(self, source: InputSource, *, address: str | None = None,
                 workers: int | None = None, max_in_flight: int | None = None,
                 device: str = "cpu", batch_numel: int = BATCH_NUMEL) -> None:
        self.source, self.address, self.batch_numel = source, address, batch_numel
        self.gpu = device.startswith("cuda")
        if self.gpu and device != "cuda":
            raise AceMergeError(f"executor 'ray': give --device cuda (Ray assigns each task "
                                f"its GPU), not {device}")
        self.device = "cuda" if self.gpu else "cpu"  # auto: CPU tasks
        self._workers, self._max_in_flight = workers, max_in_flight
        self._started = False
        self._group: PlacementGroup | None = None
        self._token = uuid.uuid4().hex
        self._statistics: tuple[Any, ...] | None = None

    # -- the cluster

    def _start(self) -> None:
        """Join or start Ray and reserve the workers' slots (once)."""
        if self._group is not None:
            return
        if not ray.is_initialized():
            local = self.address is None
            ray.init(address="local" if local else self.address,
                     num_cpus=(self._workers or os.cpu_count()) if local else None,
                     include_dashboard=False, log_to_driver=False,
                     logging_level=logging.ERROR)
            self._started = True
        self.workers = self._workers or self._capacity()
        self.max_in_flight = self._max_in_flight or 2 * self.workers
        self._check_capacity()
        slot = {"CPU": 1.0, **({"GPU": 1.0} if self.gpu else {})}
        self._group = placement_group([slot] * self.workers, strategy="SPREAD")
        ready, _ = ray.wait([self._group.ready()], timeout=RESERVE_TIMEOUT_S)
        if not ready:
            raise AceMergeError(f"Ray could not reserve {self.workers} worker slots in "
                                f"{RESERVE_TIMEOUT_S:g} s (is the cluster busy?)")

    def _capacity(self) -> int:
        """Workers the cluster holds: its CPUs, or its GPUs for CUDA tasks."""
        total = ray.cluster_resources()
        return max(1, int(total.get("GPU" if self.gpu else "CPU", 0)))

    def _check_capacity(self) -> None:
        total = ray.cluster_resources()
        for kind in ("CPU", "GPU") if self.gpu else ("CPU",):
            have = int(total.get(kind, 0))
            if have < self.workers:
                each = "one GPU per worker (--device cuda)" if kind == "GPU" else "one CPU each"
                raise AceMergeError(f"the Ray cluster has {have} {kind}(s); {self.workers} "
                                    f"worker(s) need {each}")

    def _options(self) -> dict[str, Any]:
        return {"num_cpus": 1, "num_gpus": 1 if self.gpu else 0,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(self._group)}

    def _job(self, inputs: MergeInputs, settings: MergeSettings) -> Any:
        """The job as a Ray object (in-memory statistics put once per merge)."""
        if inputs.observer is not None:
            raise AceMergeError("an observer sees tensors in this process: use the local "
                                "executor")
        if self._statistics is None:
            stats = self.source.statistics
            self._statistics = (ray.put(stats),) if stats is not None else ()
        source = replace(self.source, statistics=None)
        settings = replace(settings, device=self.device)
        return ray.put(RemoteJob(self._token, source, settings, torch.get_num_threads(),
                                 self._statistics))

    # -- the executor contract

    def merge(self, inputs: MergeInputs, settings: MergeSettings,
              entries: Sequence[PlanEntry]) -> Iterator[tuple[MergeStep, torch.Tensor | None]]:
        self._start()
        job = self._job(inputs, settings)
        task = _merge_task.options(**self._options())
        units = units_for(entries, self.workers, self.batch_numel)
        handles = submitted_in_order(units, lambda unit: task.remote(job, unit),
                                     self.max_in_flight, ray.cancel)
        with closing(handles):
            for handle in handles:
                yield from _result(handle)

    def map_reduce(self, inputs: MergeInputs, settings: MergeSettings,
                   entries: Sequence[PlanEntry], map_fn: PassMap, reduce_fn: PassReduce,
                   done: Done | None = None) -> Any:
        if not entries:
            return None
        self._start()
        job = self._job(inputs, settings)
        units = iter(units_for(entries, self.workers, self.batch_numel))
        pending: dict[Any, list[PlanEntry]] = {}
        result: Any = _NOTHING
        try:
            while True:
                for unit in units:
                    task = _map_task.options(**self._options())
                    pending[task.remote(job, unit, map_fn, reduce_fn)] = unit
                    if len(pending) >= self.max_in_flight:
                        break
                if not pending:
                    return result
                [ready], _ = ray.wait(list(pending), num_returns=1)
                unit, part = pending.pop(ready), _result(ready)
                result = part if result is _NOTHING else reduce_fn(result, part)
                for entry in unit if done is not None else ():
                    done(entry)
        finally:
            for handle in pending:
                ray.cancel(handle)

    def close(self) -> None:
        """Release the slots; stop Ray if this executor started it."""
        if self._group is not None:
            remove_placement_group(self._group)
            self._group = None
        if self._started:
            ray.shutdown()
            self._started = False


def _result(ref: Any) -> Any:
    """A task's value; its failure as a one-line error."""
    try:
        value = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        raise cause if isinstance(cause, Exception) else exc from None
    except ray.exceptions.RayError as exc:
        raise AceMergeError(f"Ray: {one_line(exc)}") from None
    if isinstance(value, Failure):
        raise AceMergeError(value.message)
    return value
