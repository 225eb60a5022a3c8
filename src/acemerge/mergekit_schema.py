"""mergekit's YAML schema, read as mergekit 0.1.5 defines it, into an acemerge MergeConfig.

A config in mergekit's schema gives mergekit's result: everything is merged (embeddings and
``lm_head`` too), tensors are merged as stored (no GPT-2 Conv1D transpose), ``dtype`` is the
compute dtype and ``out_dtype`` the output's, per-model ``parameters`` and the top-level
``parameters`` (with gradients over layers and ``[{filter, value}]`` lists) resolve per
tensor (:mod:`acemerge.schedule`), ``lambda`` scales the merged task vector, and a base
listed under ``models`` is the base, not an expert (except for ``linear``, where every
listed model is an input with its weight). Configs in acemerge's own schema keep their
behaviour (:mod:`acemerge.config`); :func:`is_mergekit_document` tells the two apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from acemerge.config import (
    MergeConfig,
    absolute_path,
    build_config,
    config_from_mapping,
    describe_config_error,
)
from acemerge.errors import AceMergeError
from acemerge.io.model_folder import chat_template_text
from acemerge.schedule import ParameterSchedule, layer_count

#: mergekit's method names acemerge implements with mergekit's semantics.
MERGEKIT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                    "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "slerp",
                    "model_stock")
#: Methods whose per-model ``weight`` mergekit requires.
WEIGHT_REQUIRED = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear",
                   "breadcrumbs", "breadcrumbs_ties", "della", "della_linear")
#: Fields only mergekit's schema has.
MERGEKIT_FIELDS = ("tokenizer_source", "tokenizer", "out_dtype", "chat_template", "name",
                   "slices", "modules")
#: Parameter names only mergekit's methods use.
MERGEKIT_PARAMETERS = ("weight", "density", "normalize", "lambda", "rescale", "int8_mask",
                       "filter_wise", "t", "gamma", "epsilon")
UNSUPPORTED = {"slices": "layer slices", "modules": "per-module definitions"}


class MergekitModel(BaseModel):
    """One entry of ``models``."""

    model_config = ConfigDict(extra="forbid")
    model: str
    parameters: dict[str, Any] | None = None


class MergekitTokenizer(BaseModel):
    """``tokenizer``: only its ``source`` is supported."""

    model_config = ConfigDict(extra="forbid")
    source: str | None = None
    tokens: dict[str, Any] | None = None
    pad_to_multiple_of: int | None = None


class MergekitDocument(BaseModel):
    """mergekit 0.1.5's ``MergeConfiguration`` (the fields acemerge reads)."""

    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[MergekitModel] | None = None
    slices: Any = None
    modules: Any = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: MergekitTokenizer | None = None
    chat_template: str | None = None
    name: str | None = None


def is_mergekit_document(data: dict[str, Any]) -> bool:
    """Whether a YAML mapping is in mergekit's schema rather than acemerge's."""
    if any(key in data for key in MERGEKIT_FIELDS):
        return True
    if str(data.get("merge_method", "")).lower() in set(MERGEKIT_METHODS) - {
            "task_arithmetic", "ties"}:
        return True
    models = data.get("models") or []
    if any(isinstance(m, dict) and "parameters" in m for m in models):
        return True
    if data.get("base_model") and any(
            (m.get("model") if isinstance(m, dict) else m) == data["base_model"]
            for m in models):
        return True
    parameters = data.get("parameters") or {}
    return isinstance(parameters, dict) and (
        any(key in MERGEKIT_PARAMETERS for key in parameters)
        or any(isinstance(v, list | dict) for v in parameters.values()))


def load_any_config(path: str | Path) -> MergeConfig:
    """A YAML merge config in acemerge's or mergekit's schema."""
    path = Path(path)
    if not path.is_file():
        raise AceMergeError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise AceMergeError(f"{path}: invalid YAML ({' '.join(str(exc).split())})") from None
    if not isinstance(data, dict):
        raise AceMergeError(f"{path}: expected a mapping with merge_method, base_model, models")
    if is_mergekit_document(data):
        try:
            return from_mergekit(data)
        except AceMergeError as exc:
            raise AceMergeError(f"{path}: {exc}") from None
    return config_from_mapping(data, path)


def _document(data: dict[str, Any]) -> MergekitDocument:
    for key, what in UNSUPPORTED.items():
        if data.get(key):
            raise AceMergeError(f"mergekit field '{key}' ({what}) is not supported: acemerge "
                                "merges whole models; list them under 'models'")
    try:
        return MergekitDocument(**data)
    except ValidationError as exc:
        raise AceMergeError(describe_config_error(exc)) from None


def _tokenizer_source(doc: MergekitDocument) -> str | None:
    source = doc.tokenizer.source if doc.tokenizer else doc.tokenizer_source
    if doc.tokenizer and (doc.tokenizer.tokens or doc.tokenizer.pad_to_multiple_of):
        raise AceMergeError("mergekit field 'tokenizer.tokens'/'pad_to_multiple_of' is not "
                            "supported (acemerge copies one tokenizer as it is)")
    if source == "union":
        raise AceMergeError("tokenizer_source 'union' is not supported: use 'base' or a "
                            "model's path")
    return source


def from_mergekit(data: dict[str, Any]) -> MergeConfig:
    """The MergeConfig that runs a mergekit document with mergekit's semantics."""
    doc = _document(data)
    method = doc.merge_method.lower()
    models = [entry.model for entry in doc.models or []]
    _tokenizer_source(doc)
    if doc.chat_template:
        chat_template_text(doc.chat_template)
    if method == "linear":
        base = doc.base_model or (models[0] if models else "")
        experts = models
    else:
        if not doc.base_model:
            raise AceMergeError(f"merge method '{method}' needs base_model")
        base, experts = doc.base_model, [m for m in models if m != doc.base_model]
    if not models:
        raise AceMergeError("mergekit config lists no models")
    # bfloat16/float16 compute dtypes run in float32 here (at least mergekit's precision)
    compute = "float64" if doc.dtype in ("float64", "fp64") else "float32"
    return build_config(
        merge_method=method, base_model=base, models=experts, scale=1.0,
        dtype=doc.out_dtype or doc.dtype, compute_dtype=compute, default_excludes=False,
        conv1d_as_stored=True, mergekit=doc.model_dump(mode="json", exclude_none=True))


def schedule_of(cfg: MergeConfig, model_config: dict | None) -> ParameterSchedule:
    """Per-tensor parameters of a config read from mergekit's schema."""
    from acemerge import methods

    doc = MergekitDocument(**(cfg.mergekit or {}))
    method = methods.get(cfg.merge_method)
    settings = {entry.model: entry.parameters or {} for entry in doc.models or []}
    shared = dict(doc.parameters or {})
    if cfg.merge_method == "ties":
        shared["semantics"] = "mergekit"
    defaults = {name: value for name, value in method.defaults().items()
                if name in method.per_task_params
                and not (name == "weight" and cfg.merge_method in WEIGHT_REQUIRED)}
    return ParameterSchedule(
        shared=shared, per_task=[settings.get(path, {}) for path in cfg.expert_paths],
        per_task_names=method.per_task_params, layers=layer_count(model_config),
        defaults=defaults, task_labels=tuple(cfg.expert_paths))


def absolute_document(document: dict[str, Any]) -> dict[str, Any]:
    """A mergekit document with every existing local path made absolute."""
    doc = dict(document)
    if doc.get("base_model"):
        doc["base_model"] = absolute_path(doc["base_model"])
    doc["models"] = [{**m, "model": absolute_path(m["model"])} for m in doc.get("models", [])]
    if doc.get("tokenizer_source") not in (None, "base", "union"):
        doc["tokenizer_source"] = absolute_path(doc["tokenizer_source"])
    return doc


def mergekit_yaml(cfg: MergeConfig) -> str:
    """The mergekit document with every existing local path made absolute."""
    return yaml.safe_dump(absolute_document(cfg.mergekit or {}), sort_keys=False)


__all__ = ["absolute_document", "from_mergekit", "is_mergekit_document", "load_any_config",
           "mergekit_yaml", "schedule_of"]
