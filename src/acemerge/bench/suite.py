"""What a benchmark suite provides: a base encoder, T experts, per-task heads and data.

A suite is built once (training is cached on disk, keyed by suite, seed, size and recipe
version) and then evaluated many times: each merge produces an encoder state dict, and the
suite scores it on every task with that task's own head.

Only the encoder is merged. Encoders are saved as Hugging Face model folders (config.json
+ model.safetensors), or experts as PEFT LoRA adapter folders on the base, so the real
readers, plan and engine are used; heads are per task and never merged.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch


def cache_root() -> Path:
    """``$ACEMERGE_CACHE`` or ``$XDG_CACHE_HOME/acemerge`` (default ~/.cache/acemerge)."""
    if os.environ.get("ACEMERGE_CACHE"):
        return Path(os.environ["ACEMERGE_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "acemerge"


def cache_key(suite: str, seed: int, tiny: bool, recipe_version: int, extra: dict | None = None
              ) -> str:
    """Folder name for a built suite: changing the recipe invalidates the cache."""
    payload = json.dumps({"suite": suite, "seed": seed, "tiny": tiny,
                          "recipe": recipe_version, **(extra or {})}, sort_keys=True)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:10]
    return f"{suite}-{'tiny-' if tiny else ''}s{seed}-r{recipe_version}-{digest}"


@dataclass(frozen=True)
class Task:
    """One expert task."""

    name: str
    description: str
    n_classes: int


@dataclass
class BuiltSuite(ABC):
    """A trained suite on disk: base and expert encoders, heads, and evaluation data."""

    name: str
    folder: Path
    tasks: list[Task]
    base_dir: Path
    #: Expert encoders: HF model folders, or PEFT LoRA adapter folders on ``base_dir``.
    expert_dirs: list[Path]
    #: Regexes of encoder parameters kept at the base value (in addition to the profile's).
    exclude: list[str] = field(default_factory=list)

    @abstractmethod
    def evaluate(self, encoder: dict[str, torch.Tensor], task: int, split: str = "test"
                 ) -> float:
        """Accuracy in [0, 1] of ``encoder`` with task ``task``'s head on ``split``
        (``"val"``: held out from the task's training data; ``"test"``)."""

    @abstractmethod
    def n_examples(self, task: int, split: str = "test") -> int:
        """How many examples task ``task``'s ``split`` scores (for standard errors)."""

    def evaluate_all(self, encoder: dict[str, torch.Tensor], split: str = "test"
                     ) -> list[float]:
        """:meth:`evaluate` on every task, in task order."""
        return [self.evaluate(encoder, t, split) for t in range(len(self.tasks))]

    @abstractmethod
    def statistics(self, kinds: Iterable[str]) -> object:
        """A StatisticsProvider with per-task ``grams``/``fishers`` of the experts' encoders,
        collected on each task's training data (for RegMean and Fisher merging)."""


class Suite(ABC):
    """A recipe that builds (or loads from the cache) a :class:`BuiltSuite`."""

    name: str
    recipe_version: int = 1

    @abstractmethod
    def build(self, cache_dir: Path, *, seed: int = 0, tiny: bool = False,
              progress: bool = True) -> BuiltSuite:
        """Train the base and experts (or reuse the cache under ``cache_dir``)."""


class Progress:
    """Timestamped progress lines on stderr (silent when disabled)."""

    def __init__(self, name: str, enabled: bool) -> None:
        self.name, self.enabled, self.start = name, enabled, time.perf_counter()

    def __call__(self, message: str) -> None:
        if self.enabled:
            elapsed = time.perf_counter() - self.start
            print(f"[{self.name} {elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
