"""Per-tensor method parameters: mergekit's filters and per-layer gradients.

A setting is a scalar; a list of numbers (a gradient: interpolated linearly over the
layers, t = layer / (layers - 1), t = 0 outside the layers; non-numeric lists pick an
entry); ``{filter, value}`` or a list of those (the first whose filter is a substring of
the tensor name, ``*`` or missing matching everything, gives the value). Parameters that
a method takes per task (``Method.per_task_params``) are resolved for each task from its
own settings first and the shared ones second, and passed as a list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from acemerge.errors import AceMergeError

#: A tensor's layer index: ``...layers.3.``, ``...h.3.``, ``...layer.3.``, ``...blocks.3.``.
_LAYER = re.compile(r"(?:^|\.)(?:layers|h|layer|blocks)\.(\d+)\.")
_LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_count(model_config: dict | None) -> int | None:
    """The number of layers named in a ``config.json`` (None when it names none)."""
    for key in _LAYER_COUNT_KEYS:
        value = (model_config or {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    return None


def layer_fraction(tensor_name: str, layers: int | None) -> float:
    """mergekit's t: layer / (layers - 1) inside the layers (1 for a single layer), else 0."""
    match = _LAYER.search(tensor_name)
    if match is None or not layers:
        return 0.0
    return int(match.group(1)) / (layers - 1) if layers > 1 else 1.0


def _is_scalar(value: Any) -> bool:
    return isinstance(value, bool | int | float | str)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def evaluate_setting(setting: Any, tensor_name: str, t: float) -> Any:
    """A setting's value for one tensor (None when no filter matches)."""
    if isinstance(setting, dict):
        setting = [setting]
    if _is_scalar(setting):
        return setting
    if not isinstance(setting, list) or not setting:
        return None
    if all(_is_scalar(v) for v in setting):
        if not all(_is_number(v) for v in setting):
            return setting[int(t * (len(setting) - 1))]
        scaled = t * (len(setting) - 1)
        low = int(scaled)
        high = min(len(setting) - 1, low + 1)
        frac = scaled - low
        return (1 - frac) * setting[low] + frac * setting[high]
    for condition in setting:
        pattern = condition.get("filter")
        if pattern in (None, "*") or pattern in tensor_name:
            return evaluate_setting(condition.get("value"), tensor_name, t)
    return None


@dataclass(frozen=True)
class ParameterSchedule:
    """Shared and per-task settings, resolved per tensor into method parameters."""

    shared: dict[str, Any] = field(default_factory=dict)
    per_task: list[dict[str, Any]] = field(default_factory=list)
    per_task_names: tuple[str, ...] = ()
    layers: int | None = None
    #: Values for tasks that set nothing (a name missing here is required).
    defaults: dict[str, Any] = field(default_factory=dict)
    #: How errors name each task (e.g. its model path).
    task_labels: tuple[str, ...] = ()

    def for_tensor(self, tensor_name: str) -> dict[str, Any]:
        """Every parameter that resolves for ``tensor_name`` (unresolved ones are left to
        the method's defaults)."""
        t = layer_fraction(tensor_name, self.layers)
        out: dict[str, Any] = {}
        for name, setting in self.shared.items():
            if name in self.per_task_names:
                continue
            value = evaluate_setting(setting, tensor_name, t)
            if value is not None:
                out[name] = value
        for name in self.per_task_names:
            values = [self._task_value(name, task, tensor_name, t)
                      for task in range(len(self.per_task))]
            if all(v is None for v in values) and name in self.defaults:
                continue
            out[name] = [self._default(name, task, tensor_name) if v is None else v
                         for task, v in enumerate(values)]
        return out

    def _default(self, name: str, task: int, tensor_name: str) -> Any:
        if name not in self.defaults:
            label = self.task_labels[task] if task < len(self.task_labels) else f"#{task}"
            raise AceMergeError(f"parameter '{name}' is required for model {label} "
                                f"(tensor {tensor_name})")
        return self.defaults[name]

    def _task_value(self, name: str, task: int, tensor_name: str, t: float) -> Any:
        for scope in (self.per_task[task], self.shared):
            if name in scope:
                value = evaluate_setting(scope[name], tensor_name, t)
                if value is not None:
                    return value
        return None
