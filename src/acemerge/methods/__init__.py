"""Merge methods, one module each, under a registry.

``get(name)`` returns a function ``f(task_vectors: list[Tensor], **params) -> Tensor`` that
merges the task vectors of one parameter; ``available()`` lists the names.
"""

from acemerge.methods import ace, average  # noqa: F401  (registers the methods)
from acemerge.methods.registry import Method, MethodParams, available, get, register

__all__ = ["Method", "MethodParams", "available", "get", "register"]
