"""The method registry: each method merges the task vectors of ONE parameter.

A method is a pure function of the T task vectors of one parameter. It knows nothing
about files, names or models. Matrices arrive as (d_out, d_in), input on the right.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from acemerge.errors import AceMergeError

Tensor = torch.Tensor
#: The map of a whole-model pass: one parameter's T task vectors (oriented, in the compute
#: dtype, on the merge device) -> a partial result that is small, on the CPU and picklable
#: (it may be computed in another process); a module-level function or functools.partial.
PassMap = Callable[[list[Tensor]], Any]
#: The reduce of a whole-model pass: combines two partial results; associative and
#: commutative (executors combine partials in any grouping and order).
PassReduce = Callable[[Any, Any], Any]
#: One pass over every merged parameter: ``run(map, reduce)`` returns the reduce of the map
#: of every parameter, or None when there is none. Executors provide it; methods never
#: see where the map runs.
ModelPass = Callable[[PassMap, PassReduce], Any]


@dataclass(frozen=True)
class Factored:
    """A (d_out, d_in) matrix given as left @ right: (d_out, k) and (k, d_in), e.g. a LoRA
    task vector s * B @ A (k = 0: the zero matrix)."""

    left: Tensor
    right: Tensor

    def dense(self) -> Tensor:
        return self.left @ self.right

    @property
    def shape(self) -> tuple[int, int]:
        return self.left.shape[0], self.right.shape[1]


class MethodParams(BaseModel):
    """Base of every method's parameter model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def compute_dtype_of(tensor: Tensor) -> torch.dtype:
    """Methods compute in float32 at least, float64 when given float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def sum_of(tensors: Iterable[Tensor]) -> Tensor:
    """sum_t X_t accumulated in place in float32 at least (no stacked copy of all T)."""
    iterator = iter(tensors)
    first = next(iterator)
    total = first.to(compute_dtype_of(first), copy=True)
    for tensor in iterator:
        total += tensor
    return total


def sequential_pass(make_iter: Callable[[], Iterable[Sequence[Tensor]]]) -> ModelPass:
    """A ``ModelPass`` over an iterator factory (each call a fresh iterator over the
    parameters' task vectors), mapped and reduced here, in order."""

    def run(map_fn: PassMap, reduce_fn: PassReduce) -> Any:
        result: Any = _NOTHING
        for task_vectors in make_iter():
            part = map_fn(list(task_vectors))
            result = part if result is _NOTHING else reduce_fn(result, part)
        return None if result is _NOTHING else result

    return run


_NOTHING = object()


def mean_rule(task_vectors: list[Tensor], params: MethodParams) -> Tensor:
    """Plain mean of the task vectors (the default for non-matrix parameters)."""
    return sum_of(task_vectors).div_(len(task_vectors))


@dataclass(frozen=True)
class Method:
    """A registered merge method, callable as ``f(task_vectors, **params)``."""

    name: str
    params: type[MethodParams]
    matrix_rule: Callable[[list[Tensor], Any], Tensor]
    paper: str
    summary: str
    other_rule: Callable[[list[Tensor], Any], Tensor] = mean_rule
    other_rule_name: str = "mean"
    default_scale: float = 1.0
    #: Whole-model statistic: called once before merging with a ``ModelPass`` (map-reduce
    #: passes over every merged parameter's task vectors, as many as it needs); returns
    #: the parameters to merge with.
    prepare: Callable[[ModelPass, Any], MethodParams] | None = None
    #: Per-parameter variation of the parameters (e.g. a random seed per tensor name).
    per_parameter: Callable[[Any, str], MethodParams] | None = None
    #: Statistics a data-dependent method needs, per task, for matrices / other parameters.
    matrix_needs: tuple[str, ...] = ()
    other_needs: tuple[str, ...] = ()
    #: Parameters that depend on the model (e.g. ACE's eps=paper), filled in from the base's
    #: config.json (None when there is none) before merging.
    resolve: Callable[[Any, dict | None], MethodParams] | None = None
    #: How tables and listings spell the method (default: its registry name).
    display_name: str = ""
    #: Parameters that take one value per task (a list), e.g. mergekit's per-model weight.
    per_task_params: tuple[str, ...] = ()
    #: The rule also receives ``base=`` (the base tensor, oriented like the task vectors):
    #: methods defined on weights rather than task vectors (SLERP, unnormalized linear).
    needs_base: bool = False
    #: The merged update of low-rank task vectors is low-rank (a linear combination, or a
    #: product with them): --out-format lora can then keep it exactly.
    low_rank_output: bool = False
    #: A rule on factored task vectors (all T given as Factored) that returns the merged
    #: matrix as Factored in O(d (T r)^2 + (T r)^3), or None where it does not apply (the
    #: engine then merges the dense task vectors). Must equal the dense rule.
    low_rank_rule: Callable[[list[Factored], Any], Factored | None] | None = None
    #: Where the low-rank rule declines (returns None), as ``acemerge methods`` says it.
    low_rank_except: str = ""
    #: How many task vectors the method takes (SLERP: exactly one).
    min_experts: int = 2
    max_experts: int | None = None

    @property
    def title(self) -> str:
        """The method's name as tables show it."""
        return self.display_name or self.name

    def validate(self, params: dict[str, Any] | None = None) -> MethodParams:
        """Check ``params`` against the method's parameter model (one-line error)."""
        try:
            return self.params(**(params or {}))
        except ValidationError as exc:
            raise AceMergeError(describe_validation_error(self.name, exc, self.params)) from None

    def for_model(self, params: MethodParams, model_config: dict | None) -> MethodParams:
        """``params`` with whatever depends on the model resolved (see ``resolve``)."""
        return self.resolve(params, model_config) if self.resolve is not None else params

    @property
    def needs(self) -> tuple[str, ...]:
        """Every statistic the method may ask for."""
        return tuple(dict.fromkeys(self.matrix_needs + self.other_needs))

    def apply(
        self,
        task_vectors: list[Tensor],
        params: MethodParams,
        *,
        matrix: bool,
        stats: dict[str, list[Tensor]] | None = None,
        base: Tensor | None = None,
    ) -> Tensor:
        """Merge already-validated task vectors with the matrix or the non-matrix rule.

        ``stats`` maps a statistic's name to its T per-task tensors (data-dependent methods);
        ``base`` is the base tensor, for methods that need it (``needs_base``).
        """
        check_task_vectors(task_vectors)
        rule = self.matrix_rule if matrix else self.other_rule
        needs = self.matrix_needs if matrix else self.other_needs
        missing = [kind for kind in needs if not stats or kind not in stats]
        if missing:
            raise AceMergeError(
                f"method '{self.name}' needs per-task statistics '{missing[0]}' from data "
                "(collect them with acemerge.statistics.collect_statistics)"
            )
        extra: dict[str, Any] = {kind: stats[kind] for kind in needs} if stats else {}
        if self.needs_base:
            if base is None:
                raise AceMergeError(f"method '{self.name}' needs the base tensor (base=...)")
            extra["base"] = base
        merged = rule(task_vectors, params, **extra)
        return merged.to(task_vectors[0].dtype)

    def __call__(self, task_vectors: list[Tensor], **params: Any) -> Tensor:
        """Merge one parameter: 2-D tensors get the matrix rule, others the non-matrix rule.

        Data-dependent methods take their statistics as keywords too (``grams=[...]``).
        """
        stats = {kind: params.pop(kind) for kind in self.needs if kind in params}
        base = params.pop("base", None)
        validated = self.for_model(self.validate(params), None)
        return self.apply(task_vectors, validated, matrix=task_vectors[0].dim() == 2,
                          stats=stats, base=base)

    def defaults(self) -> dict[str, Any]:
        """Each parameter's default value."""
        return {name: field.default for name, field in self.params.model_fields.items()}


def check_task_vectors(task_vectors: list[Tensor]) -> None:
    """At least one task vector, all of one shape and dtype."""
    if not task_vectors:
        raise AceMergeError("a method needs at least one task vector")
    first = task_vectors[0]
    for tv in task_vectors[1:]:
        if tv.shape != first.shape or tv.dtype != first.dtype:
            raise AceMergeError(
                f"task vectors differ: {tuple(first.shape)} {first.dtype} vs "
                f"{tuple(tv.shape)} {tv.dtype}"
            )


def describe_validation_error(
    method: str, exc: ValidationError, model: type[MethodParams]
) -> str:
    """Turn pydantic's report into one line naming the parameter."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "parameters"
    if err["type"] == "extra_forbidden":
        known = ", ".join(model.model_fields) or "none"
        return f"method '{method}': unknown parameter '{where}' (known: {known})"
    return f"method '{method}': parameter '{where}': {err['msg']} (got {err.get('input')!r})"


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method to the registry (names are unique)."""
    if method.name in _REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    _REGISTRY[method.name] = method
    return method


def get(name: str) -> Method:
    """The registered method called ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise AceMergeError(
            f"unknown method '{name}' (available: {', '.join(available())})"
        ) from None


def available() -> list[str]:
    """Names of every registered method, sorted."""
    return sorted(_REGISTRY)
