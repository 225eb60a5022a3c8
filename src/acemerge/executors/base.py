"""The executor contract: what the engine asks of whatever runs the per-parameter work.

The engine hands an executor the opened inputs, the merge settings and the plan entries;
the executor returns every entry's merged tensor in plan order (``merge``), and runs the
whole-model passes of methods that have one as map-reduce (``map_reduce``). Where and how
the work runs (threads, processes, machines) is the executor's business; the engine emits
the results in order through its writer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

import torch

from acemerge.methods.registry import PassMap, PassReduce
from acemerge.plan import PlanEntry
from acemerge.work import MergeInputs, MergeSettings, MergeStep

#: Called after each entry of a whole-model pass (progress).
Done = Callable[[PlanEntry], None]
Unit = TypeVar("Unit")
Handle = TypeVar("Handle")


class Executor(ABC):
    """Runs the per-parameter work of one merge (``with`` closes it)."""

    name: str = "executor"

    @abstractmethod
    def merge(self, inputs: MergeInputs, settings: MergeSettings,
              entries: Sequence[PlanEntry]) -> Iterator[tuple[MergeStep, torch.Tensor | None]]:
        """Each entry's step and tensor to emit (None: nothing), in the order given."""

    @abstractmethod
    def map_reduce(self, inputs: MergeInputs, settings: MergeSettings,
                   entries: Sequence[PlanEntry], map_fn: PassMap, reduce_fn: PassReduce,
                   done: Done | None = None) -> Any:
        """The reduce of ``map_fn`` over every entry's dense task vectors (None for none)."""

    def close(self) -> None:  # noqa: B027 - most executors hold nothing
        """Release what the executor holds (threads, a cluster's reservation)."""

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Small consecutive parameters are batched into units of about this many values.
BATCH_NUMEL = 1 << 20


def units_for(entries: Sequence[PlanEntry], workers: int, batch_numel: int = BATCH_NUMEL
              ) -> list[list[PlanEntry]]:
    """The units of work for ``workers``: a large parameter alone, small consecutive ones
    batched up to ``batch_numel`` values, smaller batches where that leaves fewer than about
    four units per worker."""
    total = sum(entry.numel for entry in entries)
    return work_units(entries, min(batch_numel, max(1, total // (4 * workers))))


def work_units(entries: Sequence[PlanEntry], batch_numel: int) -> list[list[PlanEntry]]:
    """Consecutive entries grouped, in order, into units of at least ``batch_numel`` values
    (a parameter that large is a unit of its own; the last unit may be smaller)."""
    units: list[list[PlanEntry]] = []
    size = 0
    for entry in entries:
        if not units or size >= batch_numel or entry.numel >= batch_numel:
            units.append([])
            size = 0
        units[-1].append(entry)
        size += entry.numel
    return units


def submitted_in_order(units: Iterable[Unit], submit: Callable[[Unit], Handle], limit: int,
                       cancel: Callable[[Handle], None]) -> Iterator[Handle]:
    """``submit(unit)`` for every unit, in order, with at most ``limit`` submitted and not
    yet done with; yields the handles in order. The consumer is done with a handle when it
    asks for the next one: the next unit is submitted then. Closing the iterator early
    cancels what is still outstanding."""
    pending: deque[Handle] = deque()
    remaining = iter(units)
    try:
        while True:
            for unit in remaining:
                pending.append(submit(unit))
                if len(pending) >= limit:
                    break
            if not pending:
                return
            yield pending.popleft()
    finally:
        for handle in pending:
            cancel(handle)
