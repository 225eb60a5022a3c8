"""Model Breadcrumbs (Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling multi-task
model merging with sparse masks", arXiv 2312.06795), with mergekit's semantics.

Per task and tensor, drop the largest ``gamma`` fraction of |D_t| (outliers) and then the
smallest, keeping ``density`` of the entries; then the weighted sum (``breadcrumbs``) or
TIES' sign consensus (``breadcrumbs_ties``). See :mod:`acemerge.methods.gta`.
"""

from __future__ import annotations

from acemerge.methods.gta import gta_method
from acemerge.methods.registry import register

PAPER = "Davari & Belilovsky 2024, Model Breadcrumbs (arXiv 2312.06795, ECCV 2024)"
BREADCRUMBS = register(gta_method(
    "breadcrumbs", "magnitude_outliers", consensus=False, normalize=False, rescale=False,
    paper=PAPER, summary="drop outliers and small entries, then the weighted sum"))
BREADCRUMBS_TIES = register(gta_method(
    "breadcrumbs_ties", "magnitude_outliers", consensus=True, normalize=False, rescale=False,
    paper=PAPER, summary="drop outliers and small entries, then TIES' sign consensus"))
