"""TIES-Merging (Yadav et al. 2023, "TIES-Merging: Resolving interference when merging
models", arXiv 2306.01708), Algorithm 1.

Three steps, elementwise, for every parameter:
1. Trim: per task keep the top-k fraction of entries by magnitude, zero the rest.
2. Elect: the merged sign of each entry is the sign of the sum of the trimmed values.
3. Disjoint merge: mean of the trimmed values whose sign agrees with the elected one
   (the number of agreeing tasks is clamped to at least 1).

The paper trims over the whole flattened model (``trim="model"``, the default); the common
per-tensor variant is ``trim="parameter"``. Whole-model trimming needs one magnitude
threshold per task computed over every merged parameter: ``model_thresholds`` computes them
exactly in map-reduce passes over the parameters (run by the executor, in this process or
on many workers), and the engine passes them in as ``thresholds``.

Kept count: n_keep = round(k * n) (half up), clamped to [1, n], for n entries (one tensor,
or the whole model). The threshold is the n_keep-th largest magnitude and entries with
|x| >= threshold are kept, so ties at the threshold are all kept. An entry whose trimmed
values sum to exactly 0 has no elected sign and merges to 0 (the paper's definition: no
nonzero value agrees with sign 0).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator

from acemerge.errors import AceMergeError
from acemerge.methods.gta import GtaParams, PerTask, gta_merge
from acemerge.methods.registry import (
    Method,
    MethodParams,
    ModelPass,
    compute_dtype_of,
    register,
    sum_of,
)

Tensor = torch.Tensor

#: Bits resolved per streaming pass of ``model_thresholds`` (histograms of 2**16 counters).
RADIX_BITS = 16
_BINS = 1 << RADIX_BITS
_INT_VIEW = {torch.float32: torch.int32, torch.float64: torch.int64}


class TiesParams(MethodParams):
    """TIES-Merging's parameters; defaults are the paper's (k = 20%, whole-model trim)."""

    k: float = Field(default=0.2, gt=0, le=1, description="fraction of entries kept per task")
    trim: Literal["model", "parameter"] = Field(
        default="model",
        description="top-k over the whole model (the paper) or per parameter tensor",
    )
    thresholds: tuple[float, ...] | None = Field(
        default=None,
        description="per-task magnitude thresholds for trim='model' (from model_thresholds)",
    )
    semantics: Literal["paper", "mergekit"] = Field(
        default="paper",
        description="mergekit: per-tensor int(density n) trim, weighted election (a zero "
        "sum elects +), divide by the agreeing weights (normalize); weight/density per task",
    )
    weight: PerTask = Field(default=1.0, description="semantics=mergekit: per-task weight")
    density: PerTask = Field(default=1.0, description="semantics=mergekit: fraction kept")
    normalize: bool = Field(default=True, description="semantics=mergekit: weighted mean")

    @field_validator("thresholds")
    @classmethod
    def _finite_nonnegative(cls, value: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if value is not None and not all(math.isfinite(v) and v >= 0 for v in value):
            raise ValueError("thresholds must be finite and >= 0")
        return value

    @model_validator(mode="after")
    def _thresholds_need_model_trim(self) -> TiesParams:
        if self.thresholds is not None and self.trim != "model":
            raise ValueError("thresholds apply only to trim='model'")
        return self

    @model_validator(mode="after")
    def _mergekit_options(self) -> TiesParams:
        given = {"weight", "density", "normalize"} & self.model_fields_set
        if given and self.semantics != "mergekit":
            raise ValueError(f"{sorted(given)[0]} applies only to semantics='mergekit'")
        return self


def keep_count(numel: int, k: float) -> int:
    """n_keep = round(k * numel), half up, clamped to [1, numel]."""
    return min(numel, max(1, math.floor(k * numel + 0.5)))


def magnitude_threshold(tv: Tensor, k: float) -> float:
    """The n_keep-th largest |tv| over one tensor (per-parameter trim)."""
    flat = tv.to(compute_dtype_of(tv)).abs().reshape(-1)
    n_keep = keep_count(flat.numel(), k)
    return float(flat.kthvalue(flat.numel() - n_keep + 1).values)


def at_least(magnitude: Tensor, threshold: float) -> Tensor:
    """magnitude >= threshold, exact even when threshold is not representable in its dtype."""
    if float(torch.tensor(threshold, dtype=magnitude.dtype)) != threshold:
        return magnitude.double() >= threshold
    return magnitude >= threshold


def trim(tv: Tensor, threshold: float) -> Tensor:
    """Step 1: zero the entries with |x| < threshold."""
    return torch.where(at_least(tv.abs(), threshold), tv, 0.0)


def elect_and_merge(trimmed: Sequence[Tensor] | Callable[[int], Tensor], n_tasks: int = 0
                    ) -> Tensor:
    """Steps 2-3: sign election, then disjoint mean, with running sums (no stacked copy).

    ``trimmed`` is the T trimmed vectors (a list, or a stacked (T, ...) tensor), or a
    function that produces task t's trimmed vector on demand (``n_tasks`` of them).
    """
    get = trimmed if callable(trimmed) else trimmed.__getitem__
    count_tasks = n_tasks if callable(trimmed) else len(trimmed)
    elected = torch.sign(sum_of(get(t) for t in range(count_tasks)))  # step 2: sgn(sum)
    merged = torch.zeros_like(elected)
    count = torch.zeros_like(elected)
    for t in range(count_tasks):
        vector = get(t)
        agree = (torch.sign(vector) == elected) & (elected != 0)  # step 3: the set A^p
        merged += torch.where(agree, vector, 0.0)
        count += agree
    return merged / count.clamp_min(1)


def ties_merge(
    task_vectors: Sequence[Tensor], k: float, thresholds: Sequence[float] | None = None
) -> Tensor:
    """TIES on one parameter: per-tensor top-k trim, or the given per-task thresholds."""
    dtype = compute_dtype_of(task_vectors[0])
    vectors = [tv.to(dtype) for tv in task_vectors]
    if vectors[0].numel() == 0:
        return vectors[0].clone()
    if thresholds is None and k < 1:
        thresholds = [magnitude_threshold(tv, k) for tv in vectors]
    if thresholds is not None:
        if len(thresholds) != len(vectors):
            raise AceMergeError(
                f"ties: {len(thresholds)} thresholds for {len(vectors)} task vectors"
            )
        return elect_and_merge(lambda t: trim(vectors[t], thresholds[t]), len(vectors))
    return elect_and_merge(vectors)


def ties_rule(task_vectors: list[Tensor], params: TiesParams) -> Tensor:
    """TIES for every parameter (the rule is elementwise, the paper applies it to all)."""
    if params.semantics == "mergekit":
        gta = GtaParams(weight=params.weight, density=params.density,
                        normalize=params.normalize)
        return gta_merge(task_vectors, gta, "magnitude", consensus=True)
    if params.trim == "parameter" or params.k >= 1:
        return ties_merge(task_vectors, params.k)
    if params.thresholds is None:
        raise AceMergeError(
            "method 'ties': trim='model' needs per-task thresholds over the whole model, "
            "which the engine computes in a first pass (ties.model_thresholds); "
            "pass thresholds or use trim='parameter'"
        )
    return ties_merge(task_vectors, params.k, params.thresholds)


# --- whole-model thresholds, streamed ------------------------------------------------------


def model_thresholds(model_pass: ModelPass, k: float) -> tuple[float, ...]:
    """Per task, the exact n_keep-th largest |x| over all parameters, n_keep = round(k * N).

    ``model_pass`` runs map-reduce passes over the merged parameters (each the list of its
    T task vectors; include every parameter TIES merges): the map counts one parameter's
    digits, the reduce sums the counts, so a pass may run anywhere in any grouping and the
    thresholds are the same. Nothing is concatenated: a radix select over the bit patterns
    of the magnitudes (non-negative floats order like their bits) resolves 16 bits per pass
    with T histograms of 2**16 counters, so the result is exact in 2 passes for float32
    magnitudes (bf16/fp16/fp32 inputs, represented exactly in float32). If a float64 task
    vector appears, the search restarts on float64 magnitudes (4 more passes), still exact.
    """
    if not 0 < k <= 1:
        raise AceMergeError(f"ties: k must be in (0, 1], got {k}")
    for key_dtype in (torch.float32, torch.float64):
        result = _radix_select(model_pass, k, key_dtype)
        if result is not None:
            return result
    raise AssertionError("unreachable: float64 keys hold every input")


def _radix_select(model_pass: ModelPass, k: float, key_dtype: torch.dtype
                  ) -> tuple[float, ...] | None:
    """Radix select of the n_keep-th largest magnitude per task; None if keys are too narrow."""
    width = torch.finfo(key_dtype).bits
    prefixes: list[int] = []
    ranks: list[int] = []
    for fixed in range(0, width, RADIX_BITS):
        hists = _pass_histograms(model_pass, key_dtype, prefixes, fixed)
        if hists is None:
            return None
        if not ranks:
            n_keep = keep_count(int(hists[0].sum()), k)
            ranks, prefixes = [n_keep] * len(hists), [0] * len(hists)
        for t, hist in enumerate(hists):
            digit, ranks[t] = _select_digit(hist, ranks[t])
            prefixes[t] = (prefixes[t] << RADIX_BITS) | digit
    int_dtype = _INT_VIEW[key_dtype]
    return tuple(float(torch.tensor(p, dtype=int_dtype).view(key_dtype)) for p in prefixes)


@dataclass(frozen=True)
class DigitCounts:
    """A pass's partial result: per task, counts of the next 16 bits of the magnitudes
    matching the prefix; ``hists`` None when a task vector needs wider keys (float64)."""

    hists: tuple[Tensor, ...] | None


def digit_counts(task_vectors: list[Tensor], *, key_dtype: torch.dtype,
                 prefixes: tuple[int, ...], fixed: int) -> DigitCounts:
    """The map of one radix pass over one parameter (CPU counts)."""
    shift = torch.finfo(key_dtype).bits - fixed - RADIX_BITS
    hists = []
    for t, tv in enumerate(task_vectors):
        if torch.promote_types(tv.dtype, key_dtype) != key_dtype:
            return DigitCounts(None)  # float64 input: restart on float64 keys
        keys = tv.detach().to(key_dtype).abs().reshape(-1).view(_INT_VIEW[key_dtype])
        if fixed:
            keys = keys[(keys >> (shift + RADIX_BITS)) == prefixes[t]]
        hist = torch.zeros(_BINS, dtype=torch.int64, device=tv.device)
        _count_into(hist, ((keys >> shift) & (_BINS - 1)).long())
        hists.append(hist.cpu())
    return DigitCounts(tuple(hists))


def add_counts(a: DigitCounts, b: DigitCounts) -> DigitCounts:
    """The reduce of a radix pass: counts summed per task (exact in any order)."""
    if a.hists is None or b.hists is None:
        return DigitCounts(None)
    if len(a.hists) != len(b.hists):
        raise AceMergeError("ties: every parameter needs the same number of task vectors")
    return DigitCounts(tuple(x + y for x, y in zip(a.hists, b.hists, strict=True)))


def _pass_histograms(model_pass: ModelPass, key_dtype: torch.dtype, prefixes: list[int],
                     fixed: int) -> list[Tensor] | None:
    """One pass: per task, counts of the next 16 bits among keys matching the prefix."""
    counts = model_pass(partial(digit_counts, key_dtype=key_dtype, prefixes=tuple(prefixes),
                                fixed=fixed), add_counts)
    if counts is None or (counts.hists is not None and fixed == 0
                          and int(counts.hists[0].sum()) == 0):
        raise AceMergeError("ties: the model has no entries to trim")
    return None if counts.hists is None else list(counts.hists)


def _count_into(hist: Tensor, digits: Tensor) -> None:
    """hist[d] += number of d in digits; a scatter for small inputs, bincount for large."""
    if digits.numel() < _BINS:
        hist.index_add_(0, digits, torch.ones_like(digits))
    else:
        hist += torch.bincount(digits, minlength=_BINS)


def _select_digit(hist: Tensor, rank: int) -> tuple[int, int]:
    """The bin holding the rank-th largest key, and the rank within that bin."""
    from_top = hist.flip(0).cumsum(0)
    index = int(torch.searchsorted(from_top, torch.tensor(rank, dtype=from_top.dtype)))
    digit = _BINS - 1 - index
    above = int(from_top[index]) - int(hist[digit])
    return digit, rank - above


def prepare_model_trim(model_pass: ModelPass, params: TiesParams) -> TiesParams:
    """The whole-model trim's per-task thresholds, from map-reduce passes over the model."""
    if params.semantics == "mergekit" or params.trim != "model" or params.thresholds is not None:
        return params
    return params.model_copy(update={"thresholds": model_thresholds(model_pass, params.k)})


METHOD = register(
    Method(
        name="ties",
        prepare=prepare_model_trim,
        params=TiesParams,
        matrix_rule=ties_rule,
        other_rule=ties_rule,
        other_rule_name="ties",
        paper="Yadav et al. 2023, TIES-Merging (arXiv 2306.01708, NeurIPS 2023)",
        summary="trim to the top-k magnitudes, elect signs, disjoint mean",
        default_scale=1.0,
        per_task_params=("weight", "density"),
    )
)
