"""Sparsification and sign consensus with mergekit's semantics (helper, not a method).

The "generalized task arithmetic" of mergekit 0.1.5, written from its documented behaviour:
per task, sparsify the task vector of ONE tensor (keep a fraction ``density``), optionally
rescale it to its original L1 norm, multiply by the task's weight, then either sum, or
(TIES-style consensus) keep the entries whose sign agrees with the sign of the weighted sum
(a zero sum elects +). With ``normalize`` the result is divided by the sum of the weights
(of the agreeing tasks, under consensus), a zero divisor counting as 1.

Kept counts follow mergekit: int(density * n) (floored), at least 1 for ``magnitude``; ties
in magnitude are broken by a stable sort (so exactly that many entries are kept).
Random masks (DARE's Bernoulli, DELLA's rank-dependent Bernoulli) come from a
``torch.Generator`` the caller seeds, so a merge is reproducible; mergekit draws from
torch's global stream, so masks agree with it in distribution, not entry by entry.
"""

from __future__ import annotations

from typing import Literal

import torch

from acemerge.errors import AceMergeError

Tensor = torch.Tensor
Sparsification = Literal["none", "magnitude", "random", "magnitude_outliers", "della"]
#: Below this L1 norm (before or after masking) a masked tensor is not rescaled.
RESCALE_FLOOR = 1e-7


def rescale_l1(tensor: Tensor, masked: Tensor) -> Tensor:
    """``masked`` scaled to the L1 norm of ``tensor`` (unchanged when either is ~0)."""
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < RESCALE_FLOOR or after < RESCALE_FLOOR:
        return masked
    return masked * (before / after)


def _mask_from_order(order: Tensor, start: int, count: int, like: Tensor) -> Tensor:
    mask = torch.zeros(like.numel(), dtype=like.dtype, device=like.device)
    mask[order[start:start + count]] = 1
    return mask.reshape(like.shape)


def magnitude_mask(tensor: Tensor, density: float) -> Tensor:
    """Keep the int(density * n) (at least 1) largest |x| (TIES' trim, per tensor)."""
    n = tensor.numel()
    keep = max(1, int(density * n))
    order = torch.argsort(tensor.abs().reshape(-1).float(), descending=True, stable=True)
    return _mask_from_order(order, 0, keep, tensor)


def outlier_mask(tensor: Tensor, density: float, gamma: float) -> Tensor:
    """Model Breadcrumbs (arXiv 2312.06795): drop the int(gamma n) largest |x| and the
    smallest, keeping int(density n) entries (fewer outliers dropped if needed)."""
    n = tensor.numel()
    keep, top = int(density * n), int(gamma * n)
    bottom = max(0, n - keep - top)
    order = torch.argsort(tensor.abs().reshape(-1).float(), stable=True)
    return _mask_from_order(order, bottom, keep, tensor)


def bernoulli_mask(tensor: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE (arXiv 2311.03099): keep each entry with probability ``density``."""
    probs = torch.full(tensor.shape, density, dtype=torch.float32)
    return torch.bernoulli(probs, generator=generator).to(tensor.dtype).to(tensor.device)


def della_mask(tensor: Tensor, density: float, epsilon: float,
               generator: torch.Generator) -> Tensor:
    """DELLA's MagPrune (arXiv 2406.11617): within each row, keep probability rising
    linearly with the magnitude rank, from density - epsilon to density + epsilon."""
    if not (density - epsilon > 0 and density + epsilon < 1):
        raise AceMergeError(f"della: density - epsilon and density + epsilon must lie in "
                            f"(0, 1), got density {density:g}, epsilon {epsilon:g}")
    rows = tensor.reshape(1, -1) if tensor.dim() < 2 else tensor
    ranks = rows.abs().float().argsort(dim=1, stable=True).argsort(dim=1).float()
    span = ranks.max(dim=1, keepdim=True).values - ranks.min(dim=1, keepdim=True).values
    rank_norm = (ranks / span.clamp_min(1)).clamp(0, 1)
    probs = (density - epsilon) + rank_norm * 2 * epsilon
    mask = torch.bernoulli(probs.cpu(), generator=generator).to(tensor.dtype)
    return mask.to(tensor.device).reshape(tensor.shape)


def sparsify(tensor: Tensor, method: Sparsification, density: float, *, rescale: bool,
             gamma: float = 0.01, epsilon: float = 0.15,
             generator: torch.Generator | None = None) -> Tensor:
    """One task vector sparsified by ``method`` (``density`` >= 1 keeps it whole)."""
    if method == "none" or density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    if method == "magnitude":
        mask = magnitude_mask(tensor, density)
    elif method == "magnitude_outliers":
        mask = outlier_mask(tensor, density, gamma)
    else:
        assert generator is not None, "random masks need a seeded generator"
        mask = (bernoulli_mask(tensor, density, generator) if method == "random"
                else della_mask(tensor, density, epsilon, generator))
    masked = tensor * mask
    return rescale_l1(tensor, masked) if rescale else masked


def weighted_merge(deltas: list[Tensor], weights: list[float], *, consensus: bool,
                   normalize: bool) -> Tensor:
    """Sum of w_t D_t, or its sign-consensus (TIES election, zero sum elects +); with
    ``normalize`` divided by the sum of the (agreeing) weights, 0 counting as 1."""
    weighted = [d * w for d, w in zip(deltas, weights, strict=True)]
    total = torch.zeros_like(weighted[0])
    for w in weighted:
        total += w
    if not consensus:
        divisor = sum(weights)
        return total / (divisor if abs(divisor) >= 1e-8 else 1.0) if normalize else total
    majority = torch.where(total >= 0, 1.0, -1.0).to(total.dtype)
    merged = torch.zeros_like(total)
    divisor = torch.zeros_like(total)
    for w_t, vector in zip(weights, weighted, strict=True):
        agree = torch.sign(vector) == majority
        merged += torch.where(agree, vector, 0.0)
        divisor += agree.to(total.dtype) * w_t
    if not normalize:
        return merged
    return merged / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
