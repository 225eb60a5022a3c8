"""DELLA-Merging (Deep, Bhardwaj & Poria 2024, "DELLA-Merging: Reducing interference in
model merging through magnitude-based sampling", arXiv 2406.11617), with mergekit's
semantics.

MagPrune: within each row, entry i is kept with a probability rising linearly with its
magnitude rank, from density - epsilon (smallest) to density + epsilon (largest); kept
entries are rescaled to the task vector's L1 norm (mergekit's rescale; the paper divides
by the keep probability). Then TIES' sign consensus with normalized weights (``della``) or
the weighted sum (``della_linear``). Masks are seeded per (seed, tensor name, task).
"""

from __future__ import annotations

from acemerge.methods.gta import gta_method
from acemerge.methods.registry import register

PAPER = "Deep, Bhardwaj & Poria 2024, DELLA-Merging (arXiv 2406.11617)"
DELLA = register(gta_method(
    "della", "della", consensus=True, normalize=True, rescale=True, paper=PAPER,
    summary="magnitude-ranked random drop (MagPrune), then TIES' sign consensus"))
DELLA_LINEAR = register(gta_method(
    "della_linear", "della", consensus=False, normalize=False, rescale=True, paper=PAPER,
    summary="magnitude-ranked random drop (MagPrune), then the weighted sum"))
