"""Merge methods, one module each, under a registry.

``get(name)`` returns a function ``f(task_vectors: list[Tensor], **params) -> Tensor`` that
merges the task vectors of one parameter; ``available()`` lists the names.
"""

from acemerge.methods import (  # noqa: F401  (importing a module registers its method)
    ace,
    average,
    breadcrumbs,
    cart,
    consensus,
    dare,
    della,
    eigcov,
    fisher,
    fro_m,
    iso_c,
    iso_cts,
    linear,
    magmax,
    model_stock,
    regmean,
    slerp,
    task_arithmetic,
    ties,
    tsv,
    wudi,
)
from acemerge.methods.registry import Method, MethodParams, available, get, register

__all__ = ["Method", "MethodParams", "available", "get", "register"]
