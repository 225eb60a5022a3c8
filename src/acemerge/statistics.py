"""Per-task statistics for data-dependent methods (RegMean's Grams, Fisher's diagonals).

A provider answers ``get(kind, name, task)`` for a parameter name as stored in the
checkpoint. Kinds:

- ``grams``: the (d_in, d_in) Gram X^T X of the inputs of a linear layer (already in the
  layer's input space, so orientation does not change it);
- ``fishers``: the diagonal Fisher, shaped like the stored parameter (the engine
  transposes it together with a Conv1D weight).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
from safetensors.torch import load_file, save_file

from acemerge.errors import AceMergeError

ELEMENTWISE_KINDS = frozenset({"fishers"})
_SEPARATOR = "::"


class StatisticsProvider(Protocol):
    """Where the engine takes per-task statistics from."""

    def get(self, kind: str, name: str, task: int) -> torch.Tensor:
        """The statistic ``kind`` of parameter ``name`` for task ``task``."""
        ...


class TensorStatistics:
    """Statistics held as tensors: one ``{kind: {name: tensor}}`` per task."""

    def __init__(self, per_task: list[dict[str, dict[str, torch.Tensor]]]) -> None:
        self.per_task = per_task

    def get(self, kind: str, name: str, task: int) -> torch.Tensor:
        try:
            return self.per_task[task][kind][name]
        except (IndexError, KeyError):
            message = f"no '{kind}' statistic for parameter '{name}' of task {task}"
            raise AceMergeError(message) from None

    def save(self, folder: str | Path) -> list[Path]:
        """One safetensors file per task (keys ``kind::name``)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for task, kinds in enumerate(self.per_task):
            flat = {f"{kind}{_SEPARATOR}{name}": t.contiguous()
                    for kind, tensors in kinds.items() for name, t in tensors.items()}
            paths.append(folder / f"task{task}.safetensors")
            save_file(flat, paths[-1])
        return paths

    @classmethod
    def load(cls, paths: list[str | Path]) -> TensorStatistics:
        """Read files written by :meth:`save`, in task order."""
        per_task = []
        for path in paths:
            kinds: dict[str, dict[str, torch.Tensor]] = {}
            for key, tensor in load_file(str(path)).items():
                kind, _, name = key.partition(_SEPARATOR)
                kinds.setdefault(kind, {})[name] = tensor
            per_task.append(kinds)
        return cls(per_task)
