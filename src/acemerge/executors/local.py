"""The local executor: the per-parameter work in this process, in three overlapped stages.

A reader thread reads the next parameter's base tensor and task vectors while a merge
thread merges the current one and the caller writes the previous result: the inputs of at
most two parameters (the one merging, the one read ahead) and one result being written are
held at a time. ``overlap=False`` runs the same work one parameter after the other.

``overlap=None`` (auto, the default) overlaps when the merge runs on CUDA or when the CPU
has a core that torch's threads leave free for reading and writing; otherwise the reader
competes with the compute threads for the same cores, which stalls every parallel
product: GPT-2-small x7 with ACE on 2 cores and 2 torch threads took 28-30 s overlapped and
22 s serial (docs/benchmarks.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from acemerge.executors.base import Done, Executor
from acemerge.executors.pipeline import Ahead
from acemerge.methods.registry import PassMap, PassReduce, sequential_pass
from acemerge.plan import PlanEntry
from acemerge.work import (
    MergeInputs,
    MergeSettings,
    MergeStep,
    ParameterRead,
    merge_parameter,
    merge_read,
    read_parameter,
    resolve_device,
    task_vectors_of,
)


class LocalExecutor(Executor):
    """Merges in this process; reading, merging and writing overlap (``overlap``; None:
    where a core is free for it or the merge runs on CUDA)."""

    name = "local"

    def __init__(self, overlap: bool | None = None) -> None:
        self.overlap = overlap

    def overlaps(self, device: torch.device) -> bool:
        """Whether this merge overlaps its stages (``overlap``, or the auto rule)."""
        if self.overlap is not None:
            return self.overlap
        return device.type == "cuda" or available_cores() > torch.get_num_threads()

    def merge(self, inputs: MergeInputs, settings: MergeSettings,
              entries: Sequence[PlanEntry]) -> Iterator[tuple[MergeStep, torch.Tensor | None]]:
        device = resolve_device(settings.device)
        if not self.overlaps(device):
            for entry in entries:
                yield merge_parameter(inputs, entry, settings, device)
            return

        def read(entry: PlanEntry) -> ParameterRead:
            return read_parameter(inputs, entry, settings, device)

        def merge(read: ParameterRead) -> tuple[MergeStep, torch.Tensor | None]:
            return merge_read(inputs, read, settings)

        reads = Ahead(read, entries, "acemerge-read")
        merges = Ahead(merge, reads, "acemerge-merge")
        try:
            yield from merges
        finally:
            reads.close()
            merges.close()

    def map_reduce(self, inputs: MergeInputs, settings: MergeSettings,
                   entries: Sequence[PlanEntry], map_fn: PassMap, reduce_fn: PassReduce,
                   done: Done | None = None) -> Any:
        device = resolve_device(settings.device)

        def read(entry: PlanEntry) -> list[torch.Tensor]:
            task_vectors = task_vectors_of(inputs, entry, settings, device)
            if done is not None:
                done(entry)
            return task_vectors

        if not self.overlaps(device):
            return sequential_pass(lambda: map(read, entries))(map_fn, reduce_fn)
        reads = Ahead(read, entries, "acemerge-pass-read")
        try:
            return sequential_pass(lambda: reads)(map_fn, reduce_fn)
        finally:
            reads.close()


def available_cores() -> int:
    """The CPU cores this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
