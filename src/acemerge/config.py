"""The merge configuration: one schema for CLI flags, YAML files and the Python API.

The YAML is close to mergekit's::

    merge_method: ace
    base_model: gpt2
    models:
      - model: ./expert-a
      - model: ./expert-b
    parameters: {eps: gpt2}
    dtype: float32
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from acemerge.errors import AceMergeError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "fp64": "float64",
                  "half": "float16", "float": "float32", "double": "float64"}


def dtype_name(value: str | None) -> str | None:
    """Canonical dtype name, accepting common aliases."""
    if value is None:
        return None
    name = _DTYPE_ALIASES.get(value, value)
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {value!r} (use one of {', '.join(DTYPES)})")
    return name


def absolute_path(text: str) -> str:
    """An existing local path made absolute; anything else (a hub id) unchanged."""
    path = Path(text).expanduser()
    return str(path.resolve()) if path.exists() else text


#: Fields of the Ray executor, and every field that only says how a merge runs.
RAY_FIELDS = ("ray_address", "workers", "max_in_flight")
EXECUTION_FIELDS = ("executor", "overlap", *RAY_FIELDS)


class ModelEntry(BaseModel):
    """One expert."""

    model_config = ConfigDict(extra="forbid")
    model: str


class MergeConfig(BaseModel):
    """Everything that defines a merge."""

    model_config = ConfigDict(extra="forbid")

    merge_method: str = "ace"
    base_model: str
    models: list[ModelEntry]
    parameters: dict[str, Any] = Field(default_factory=dict)
    scale: float | None = None  # None: the method's default scaling coefficient
    dtype: str | None = None
    compute_dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"
    exclude: list[str] = Field(default_factory=list)
    default_excludes: bool = True
    conv1d_as_stored: bool = False
    #: Per-expert statistics files (TensorStatistics.save) for RegMean / Fisher.
    statistics: list[str] = Field(default_factory=list)
    #: The mergekit document this config was read from (mergekit's semantics apply:
    #: per-tensor parameters, see acemerge.mergekit_schema); None for acemerge's schema.
    mergekit: dict[str, Any] | None = None
    #: Merge LoRA adapters whose config names another base model.
    allow_base_mismatch: bool = False
    #: Output: a full model folder, or a PEFT LoRA adapter of rank out_rank (or "exact").
    out_format: Literal["full", "lora"] = "full"
    out_rank: int | Literal["exact"] | None = None
    #: Keep LoRA experts factored where the method has a low-rank rule (exact, faster);
    #: False materializes every task vector and runs the dense rule (for comparison).
    low_rank: bool = True
    #: Where the per-parameter work runs: this process (``local``: reading, merging and
    #: writing overlapped) or a Ray cluster (``ray``). How a merge runs, not what it
    #: computes: the output is the same, and these fields are left out of the saved YAML.
    executor: Literal["local", "ray"] = "local"
    #: ``local``: overlap reading, merging and writing (on, off, or auto: where a CPU core
    #: is left free by torch's threads, or on CUDA).
    overlap: Literal["auto", "on", "off"] = "auto"
    #: ``ray``: the cluster to join (None: start a local Ray).
    ray_address: str | None = None
    #: ``ray``: concurrent worker tasks (None: every CPU, or GPU with device cuda).
    workers: int | None = Field(default=None, ge=1)
    #: ``ray``: work units submitted and not yet written (None: twice the workers).
    max_in_flight: int | None = Field(default=None, ge=1)

    @field_validator("overlap", mode="before")
    @classmethod
    def _yaml_switch(cls, value: object) -> object:
        """YAML reads on/off as booleans."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _ray_options(self) -> MergeConfig:
        """The Ray options need the Ray executor."""
        if self.executor != "ray":
            given = [f for f in RAY_FIELDS if getattr(self, f) is not None]
            if given:
                raise AceMergeError(f"{given[0]} applies only to executor 'ray' "
                                    f"(--executor ray)")
        elif self.overlap != "auto":
            raise AceMergeError("overlap applies only to executor 'local'")
        return self

    @model_validator(mode="after")
    def _adapter_output(self) -> MergeConfig:
        """--out-format lora needs a rank, unless the method's output is low-rank (then the
        default is the exact rank)."""
        from acemerge import methods

        if self.out_format != "lora" or self.out_rank is not None:
            return self
        if self.merge_method in methods.available() and \
                not methods.get(self.merge_method).low_rank_output:
            raise AceMergeError(f"--out-format lora: method '{self.merge_method}' gives no "
                                "low-rank update; give --out-rank R")
        return self

    def load_statistics(self) -> object | None:
        """The statistics files as a provider (None when there are none)."""
        if not self.statistics:
            return None
        from acemerge.statistics import TensorStatistics

        if len(self.statistics) != len(self.models):
            raise AceMergeError(f"{len(self.statistics)} statistics files for "
                                f"{len(self.models)} experts (give one per expert, in order)")
        missing = [p for p in self.statistics if not Path(p).is_file()]
        if missing:
            raise AceMergeError(f"{missing[0]}: no such statistics file")
        return TensorStatistics.load(self.statistics)

    @model_validator(mode="after")
    def _expert_count(self) -> MergeConfig:
        """As many experts as the method takes (an unknown method is reported later)."""
        from acemerge import methods
        from acemerge.engine import check_expert_count

        if self.merge_method in methods.available():
            check_expert_count(methods.get(self.merge_method), len(self.models))
        return self

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: str | None) -> str | None:
        return dtype_name(value)

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, value: Any) -> Any:
        if isinstance(value, list):  # accept bare strings as well as {model: ...}
            return [{"model": v} if isinstance(v, str) else v for v in value]
        return value

    @property
    def resolved_scale(self) -> float:
        """The scaling coefficient: as set, else the method's default."""
        if self.scale is not None:
            return self.scale
        from acemerge import methods

        return methods.get(self.merge_method).default_scale

    @property
    def expert_paths(self) -> list[str]:
        return [entry.model for entry in self.models]

    def with_absolute_paths(self) -> MergeConfig:
        """The config with every existing local path made absolute (hub ids unchanged), so
        that its YAML reruns from any folder."""
        return self.model_copy(update={
            "base_model": absolute_path(self.base_model),
            "models": [entry.model_copy(update={"model": absolute_path(entry.model)})
                       for entry in self.models],
            "statistics": [absolute_path(p) for p in self.statistics],
        })

    def to_yaml(self) -> str:
        """The config as YAML, in the same schema it is read from, without the fields that
        only say how the merge ran (executor, workers: the result is the same)."""
        return yaml.safe_dump(self.model_dump(mode="json", exclude=set(EXECUTION_FIELDS)),
                              sort_keys=False)


def build_config(**fields: Any) -> MergeConfig:
    """Validate a merge config; errors become one line naming the field."""
    try:
        return MergeConfig(**fields)
    except ValidationError as exc:
        raise AceMergeError(describe_config_error(exc)) from None


def config_from_mapping(data: dict[str, Any], path: str | Path) -> MergeConfig:
    """A MergeConfig from a YAML mapping in acemerge's schema read from ``path``."""
    try:
        return MergeConfig(**data)
    except ValidationError as exc:
        raise AceMergeError(f"{path}: {describe_config_error(exc)}") from None


def describe_config_error(exc: ValidationError) -> str:
    """First validation error as one line naming the field."""
    err = exc.errors()[0]
    where = ".".join(str(part) for part in err["loc"]) or "config"
    if err["type"] == "extra_forbidden":
        return f"unknown config field '{where}'"
    if err["type"] == "missing":
        return f"missing config field '{where}'"
    return f"config field '{where}': {err['msg']}"
