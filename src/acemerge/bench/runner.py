"""The benchmark protocol: merge a built suite with each method and score every task.

Rows: the base encoder with each task's head (zero-shot), the individual experts, and
every method. Methods whose papers tune the scaling coefficient on validation data are
reported twice: at their default lambda, and with lambda chosen on a validation split held
out from each task's training data (never the test set). ACE and EigCov run at their fixed
defaults, as their papers intend. RegMean and Fisher use statistics collected from each
task's training data.

When the experts are LoRA adapters, every method with a low-rank rule is also merged with
``low_rank=False`` (materialized task vectors, the dense rule), interleaved with its
low-rank merge: the timings and the two merges' largest difference go in ``timings``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from acemerge import methods
from acemerge.api import merge_checkpoints
from acemerge.bench.suite import BuiltSuite
from acemerge.engine import Observer
from acemerge.io.adapters import is_adapter_folder, open_expert
from acemerge.io.readers import Checkpoint, StateDictCheckpoint, open_checkpoint

#: Methods whose papers tune lambda on validation data (reported default and tuned).
TUNED_METHODS = ("task_arithmetic", "ties", "dare", "consensus", "cart", "tsv", "iso_c",
                 "iso_cts")
#: The lambda grid searched on the validation split.
LAMBDA_GRID = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.2, 1.5, 2.0)
DATA_DEPENDENT = ("regmean", "fisher")
#: Interleaved low-rank/dense merges per method; the minimum of each is reported.
TIMING_REPEATS = 3


@dataclass
class Row:
    """One line of a result table."""

    label: str
    method: str | None
    params: dict[str, Any]
    scale: float | None
    accuracy: list[float]
    normalized: list[float]
    note: str = ""
    seconds: float = 0.0
    #: Test examples per task (for binomial standard errors; empty: unknown).
    n_test: list[int] = field(default_factory=list)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.accuracy) / len(self.accuracy)

    @property
    def mean_normalized(self) -> float:
        return sum(self.normalized) / len(self.normalized)

    def _task_errors(self) -> list[float]:
        """Binomial standard error of each task's accuracy, sqrt(a (1 - a) / n)."""
        return [math.sqrt(a * (1 - a) / n) if n else 0.0
                for a, n in zip(self.accuracy, self.n_test or [0] * len(self.accuracy),
                                strict=True)]

    @property
    def se_mean_accuracy(self) -> float:
        """Standard error of the mean accuracy: independent tasks, sqrt(sum SE_t^2) / T."""
        return math.sqrt(sum(e * e for e in self._task_errors())) / len(self.accuracy)

    @property
    def se_mean_normalized(self) -> float:
        """Same for the mean normalized accuracy; each task's error is divided by its
        expert's accuracy (the normalizer is taken as fixed)."""
        errors = [e * (n / a) if a > 0 else 0.0 for e, a, n in
                  zip(self._task_errors(), self.accuracy, self.normalized, strict=True)]
        return math.sqrt(sum(e * e for e in errors)) / len(errors)


@dataclass
class Timing:
    """One method merged with its low-rank rule and densely (``low_rank=False``)."""

    method: str
    low_rank_seconds: float  # the fastest of ``repeats`` merges
    dense_seconds: float
    repeats: int
    #: Largest relative difference of the two merges (:func:`max_relative_difference`),
    #: on the merged weights and on the merged updates (weights minus the base).
    max_rel_diff: float
    max_rel_diff_update: float

    @property
    def ratio(self) -> float:
        """Dense seconds over low-rank seconds (above 1: the low-rank rule is faster)."""
        return self.dense_seconds / max(self.low_rank_seconds, 1e-12)


@dataclass
class BenchResult:
    """A suite's table: task names, rows and (LoRA experts) low-rank vs dense timings."""

    suite: str
    tasks: list[str]
    rows: list[Row] = field(default_factory=list)
    timings: list[Timing] = field(default_factory=list)

    def to_json(self) -> str:
        rows = [asdict(r) | {"mean_accuracy": r.mean_accuracy,
                             "mean_normalized": r.mean_normalized,
                             "se_mean_accuracy": r.se_mean_accuracy,
                             "se_mean_normalized": r.se_mean_normalized} for r in self.rows]
        timings = [asdict(t) | {"ratio": t.ratio} for t in self.timings]
        return json.dumps({"suite": self.suite, "tasks": self.tasks, "rows": rows,
                           "timings": timings}, indent=2)


def load_state_dict(folder: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder."""
    return open_checkpoint(folder).state_dict()


def max_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor],
                            base: dict[str, torch.Tensor] | None = None) -> float:
    """max over floating tensors of max|a - b| / max(|a|, |b|) (of ``a - base`` and
    ``b - base`` when ``base`` is given); 0 where both are 0."""
    worst = 0.0
    for name, right in b.items():
        if not right.is_floating_point() or right.numel() == 0:
            continue
        left, right = a[name].double(), right.double()
        if base is not None:
            left, right = left - base[name].double(), right - base[name].double()
        scale = float(torch.maximum(left.abs().max(), right.abs().max()))
        if scale > 0:
            worst = max(worst, float((left - right).abs().max()) / scale)
    return worst


class Benchmark:
    """Holds a built suite's base and experts in memory and scores merges.

    Merges go through the engine with the experts as checkpoints: a model folder's
    tensors, or a LoRA adapter read on the base (factored where a method's low-rank rule
    applies). ``experts`` holds their dense encoders, for the expert rows.
    """

    def __init__(self, built: BuiltSuite) -> None:
        self.built = built
        self.base = load_state_dict(built.base_dir)
        config_path = built.base_dir / "config.json"
        self.config = json.loads(config_path.read_text()) if config_path.is_file() else None
        self.base_checkpoint = StateDictCheckpoint(self.base, str(built.base_dir))
        self.base_checkpoint.config = self.config
        self.expert_checkpoints = [self._open_expert(d) for d in built.expert_dirs]
        self.experts = [e.state_dict() for e in self.expert_checkpoints]
        self.lora_experts = all(is_adapter_folder(d) for d in built.expert_dirs)
        self.n_tasks = len(built.tasks)
        self.expert_accuracy = [built.evaluate(self.experts[t], t) for t in range(self.n_tasks)]
        self.n_test = [built.n_examples(t) for t in range(self.n_tasks)]
        self._stats: object | None = None

    def score(self, encoder: dict[str, torch.Tensor], split: str = "test") -> list[float]:
        """Accuracy of ``encoder`` on every task."""
        return self.built.evaluate_all(encoder, split)

    def normalized(self, accuracy: list[float]) -> list[float]:
        """Merged accuracy over expert accuracy, per task (1.0 = the expert's)."""
        return [a / max(e, 1e-12) for a, e in zip(accuracy, self.expert_accuracy, strict=True)]

    def row(self, label: str, encoder: dict[str, torch.Tensor], **info: Any) -> Row:
        accuracy = self.score(encoder)
        return Row(label=label, accuracy=accuracy, normalized=self.normalized(accuracy),
                   n_test=self.n_test, **{"method": None, "params": {}, "scale": None} | info)

    def reference_rows(self) -> list[Row]:
        """Zero-shot base (each task's head on the base encoder) and the experts."""
        base = self.row("base (zero-shot)", self.base)
        experts = Row(label="individual experts", method=None, params={}, scale=None,
                      accuracy=list(self.expert_accuracy),
                      normalized=[1.0] * self.n_tasks, n_test=self.n_test)
        return [base, experts]

    def _open_expert(self, folder: Path) -> Checkpoint:
        """An adapter folder as LoRA factors on the base; a model folder held in memory
        (it is merged many times)."""
        if is_adapter_folder(folder):
            return open_expert(str(folder), self.base_checkpoint)
        return StateDictCheckpoint(load_state_dict(folder), str(folder))

    def merge(self, method: str, params: dict[str, Any], scale: float | None = None,
              observer: Observer | None = None, low_rank: bool = True
              ) -> tuple[dict[str, torch.Tensor], float]:
        """Merged encoder and the seconds the merge took; ``low_rank=False`` runs the
        dense rule on LoRA experts."""
        extra = {}
        if methods.get(method).needs:
            extra["statistics"] = self.statistics()
        start = time.perf_counter()
        merged = merge_checkpoints(self.base_checkpoint, self.expert_checkpoints,
                                   method=method, scale=scale,
                                   exclude=tuple(self.built.exclude), device="cpu",
                                   low_rank=low_rank, observer=observer, **extra, **params)
        return merged, time.perf_counter() - start

    def time_low_rank(self, method: str, params: dict[str, Any],
                      repeats: int = TIMING_REPEATS) -> Timing:
        """Low-rank and dense merges, interleaved ``repeats`` times: the fastest of each,
        and how far the two merged state dicts differ."""
        seconds: dict[bool, list[float]] = {True: [], False: []}
        merged: dict[bool, dict[str, torch.Tensor]] = {}
        for _ in range(repeats):
            for low_rank in (True, False):
                merged[low_rank], took = self.merge(method, params, low_rank=low_rank)
                seconds[low_rank].append(took)
        return Timing(method, min(seconds[True]), min(seconds[False]), repeats,
                      max_relative_difference(merged[True], merged[False]),
                      max_relative_difference(merged[True], merged[False], self.base))

    def statistics(self) -> object:
        if self._stats is None:
            self._stats = self.built.statistics(("grams", "fishers"))
        return self._stats

    def method_rows(self, method: str, params: dict[str, Any], tune: bool) -> list[Row]:
        """The default row, and the validation-tuned row for methods that tune lambda."""
        merged, seconds = self.merge(method, params)
        scale = methods.get(method).default_scale
        note = "fixed defaults" if method in ("ace", "eigcov") else "default lambda"
        if method in DATA_DEPENDENT:
            note = "data-dependent reference (training-data statistics)"
        rows = [self.row(methods.get(method).title, merged, method=method, params=params,
                         scale=scale, note=note, seconds=seconds)]
        if tune and method in TUNED_METHODS:
            rows.append(self.tuned_row(method, params, merged, scale, seconds))
        return rows

    def tuned_row(self, method: str, params: dict[str, Any], merged: dict[str, torch.Tensor],
                  scale: float, seconds: float) -> Row:
        """Lambda chosen by mean validation accuracy over the grid, scored on test."""
        direction = {k: (merged[k].double() - self.base[k].double()) / scale
                     for k in merged if merged[k].is_floating_point()}

        def at(lam: float) -> dict[str, torch.Tensor]:
            return {k: (self.base[k].double() + lam * direction[k]).to(v.dtype)
                    if k in direction else v for k, v in merged.items()}

        val = {lam: sum(self.score(at(lam), "val")) / self.n_tasks for lam in LAMBDA_GRID}
        best = max(LAMBDA_GRID, key=lambda lam: (val[lam], -abs(lam - scale)))
        return self.row(f"{methods.get(method).title} (tuned)", at(best), method=method,
                        params=params, scale=best, note=f"lambda tuned on validation: {best:g}",
                        seconds=seconds)


def run_benchmark(
    built: BuiltSuite,
    method_names: list[str],
    overrides: dict[str, dict[str, Any]] | None = None,
    *,
    tune: bool = True,
    log: Callable[[str], None] | None = None,
) -> BenchResult:
    """The full table for ``method_names`` (parameters from ``overrides``); ``log``
    receives a line per scored method."""
    bench = Benchmark(built)
    result = BenchResult(built.name, [t.name for t in built.tasks], bench.reference_rows())
    for index, name in enumerate(method_names, 1):
        params = (overrides or {}).get(name, {})
        rows = bench.method_rows(name, params, tune)
        result.rows += rows
        timing = None
        if bench.lora_experts and methods.get(name).low_rank_rule is not None:
            timing = bench.time_low_rank(name, params)
            result.timings.append(timing)
        if log is not None:
            scores = ", ".join(f"{r.label} {100 * r.mean_normalized:.1f}" for r in rows)
            ratio = f"; dense/low-rank {timing.ratio:.1f}x" if timing else ""
            log(f"[{index}/{len(method_names)}] avg norm {scores}{ratio}")
    return result



def run_sweep(
    built: BuiltSuite,
    method: str,
    key: str,
    values: list[Any],
    base_params: dict[str, Any] | None = None,
) -> BenchResult:
    """One parameter of one method (``scale`` sweeps lambda), a row per value."""
    bench = Benchmark(built)
    result = BenchResult(built.name, [t.name for t in built.tasks], bench.reference_rows())
    for value in values:
        params = dict(base_params or {})
        scale = None
        if key == "scale":
            scale = float(value)
        else:
            params[key] = value
        merged, seconds = bench.merge(method, params, scale)
        result.rows.append(bench.row(f"{method} {key}={value}", merged, method=method,
                                     params=params, scale=scale, seconds=seconds))
    return result
