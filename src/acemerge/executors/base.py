"""The executor contract: what the engine asks of whatever runs the per-parameter work.

The engine hands an executor the opened inputs, the merge settings and the plan entries;
the executor returns every entry's merged tensor in plan order (``merge``), and runs the
whole-model passes of methods that have one as map-reduce (``map_reduce``). Where and how
the work runs (threads, processes, machines) is the executor's business; the engine emits
the results in order through its writer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from acemerge.methods.registry import PassMap, PassReduce
from acemerge.plan import PlanEntry
from acemerge.work import MergeInputs, MergeSettings, MergeStep

#: Called after each entry of a whole-model pass (progress).
Done = Callable[[PlanEntry], None]


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

