"""WUDI-Merging: Adam on sum_t ||(D - D_t) D_t^T||_F^2 / ||D_t||_F^2 from sum_t D_t."""

from __future__ import annotations

import pytest
import torch

from acemerge.errors import AceMergeError
from acemerge.methods import eigcov, wudi  # noqa: F401  (registers both methods)
from acemerge.methods.registry import get

METHOD = get("wudi")
EIGCOV = get("eigcov")

#: Shapes whose sum of Grams has full rank (T = 3): tall, square, and wide with T d_out >= d_in.
FULL_RANK = {"tall": (8, 5), "square": (6, 6), "wide": (5, 9)}


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def experts(shape: tuple[int, int], count: int = 3, seed: int = 0) -> list[torch.Tensor]:
    return [randn(*shape, seed=seed + t) * (1.0 + 0.5 * t) for t in range(count)]


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def range_projector(tvs: list[torch.Tensor]) -> torch.Tensor:
    """Orthogonal projector onto range(sum_t G_t), the span of all task-vector rows."""
    u, s, _ = torch.linalg.svd(torch.cat(tvs).T, full_matrices=False)
    basis = u[:, s > s.max() * 1e-10]
    return basis @ basis.T


def authors_procedure(tvs: list[torch.Tensor], lr: float, steps: int) -> torch.Tensor:
    """The loss written out, differentiated by autograd and stepped by torch.optim.Adam."""
    vectors = torch.stack(tvs)
    merged = torch.nn.Parameter(vectors.sum(dim=0).clone())
    optimizer = torch.optim.Adam([merged], lr=lr)
    energies = vectors.pow(2).sum(dim=(1, 2))
    for _ in range(steps):
        inner = (merged.unsqueeze(0) - vectors) @ vectors.transpose(1, 2)
        loss = (inner.pow(2).sum(dim=(1, 2)) / energies).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return merged.detach()


@pytest.mark.parametrize("shape", [(8, 5), (4, 30)], ids=["gram-gradient", "task-gradient"])
def test_matches_autograd_and_torch_adam(shape: tuple[int, int]) -> None:
    tvs = experts(shape, count=2)
    ours = METHOD(tvs, lr=1e-2, iterations=50)
    theirs = authors_procedure(tvs, lr=1e-2, steps=50)
    assert rel_err(ours, theirs) < 1e-10
    assert rel_err(ours, sum(tvs)) > 1e-3  # it moved


def test_both_gradient_forms_agree_with_autograd() -> None:
    tvs = experts((4, 7), count=3)
    point = randn(4, 7, seed=9)
    probe = point.clone().requires_grad_(True)
    loss = sum(((probe - tv) @ tv.T).pow(2).sum() / tv.pow(2).sum() for tv in tvs)
    (expected,) = torch.autograd.grad(loss, probe)
    assert rel_err(wudi.gram_gradient(tvs)(point), expected) < 1e-12
    assert rel_err(wudi.task_gradient(tvs, torch.float64)(point), expected) < 1e-12
    loss = float(loss.detach())
    assert abs(wudi.wudi_loss(point, tvs) - loss) < 1e-10 * loss


@pytest.mark.parametrize("kind", FULL_RANK)
def test_loss_decreases(kind: str) -> None:
    tvs = experts(FULL_RANK[kind])
    losses = [wudi.wudi_loss(METHOD(tvs, lr=1e-2, iterations=n), tvs) for n in (0, 5, 50, 500)]
    assert all(a > b for a, b in zip(losses, losses[1:], strict=False))


def test_loss_decreases_at_the_authors_settings() -> None:
    tvs = [1e-3 * tv for tv in experts((24, 16), count=4)]  # task-vector-like scale
    merged = METHOD(tvs)  # lr 1e-5, 300 steps
    assert wudi.wudi_loss(merged, tvs) < 0.9 * wudi.wudi_loss(sum(tvs), tvs)


@pytest.mark.parametrize("kind", FULL_RANK)
def test_converges_to_eigcov_energy_on_full_rank(kind: str) -> None:
    tvs = experts(FULL_RANK[kind])
    assert torch.linalg.matrix_rank(range_projector(tvs)) == FULL_RANK[kind][1]
    closed = EIGCOV(tvs, weighting="energy")
    merged = METHOD(tvs, lr=1e-2, iterations=4000)
    assert rel_err(merged, closed) < 1e-8
    assert rel_err(sum(tvs), closed) > 0.1  # the start was far away
    assert rel_err(merged, EIGCOV(tvs)) > 1e-3  # and it is the energy weighting


def test_float32_converges_to_eigcov_energy() -> None:
    tvs = [tv.float() for tv in experts((8, 5))]
    merged = METHOD(tvs, lr=1e-2, iterations=3000)
    assert merged.dtype == torch.float32
    assert rel_err(merged, EIGCOV(tvs, weighting="energy")) < 1e-4


def test_singular_sum_of_grams_converges_on_its_range() -> None:
    tvs = experts((4, 30), count=2)  # T d_out = 8 < d_in = 30: null(S) has dimension 22
    projector = range_projector(tvs)
    closed = EIGCOV(tvs, weighting="energy")
    merged = METHOD(tvs, lr=1e-2, iterations=3000)
    assert rel_err(merged @ projector, closed) < 1e-6
    assert wudi.wudi_loss(merged, tvs) < 1e-12 * wudi.wudi_loss(sum(tvs), tvs)
    assert rel_err(sum(tvs) @ projector, sum(tvs)) < 1e-12  # the start has no null part


def test_zero_iterations_is_task_arithmetic() -> None:
    tvs = experts((5, 4))
    assert torch.allclose(METHOD(tvs, iterations=0), sum(tvs), rtol=0, atol=1e-14)


def test_deterministic() -> None:
    tvs = [tv.float() for tv in experts((12, 9))]
    first = METHOD(tvs, lr=1e-3, iterations=200)
    assert torch.equal(first, METHOD(tvs, lr=1e-3, iterations=200))


def test_zero_task_vector_is_safe() -> None:
    tvs = experts((6, 5), count=2)
    zero = torch.zeros(6, 5, dtype=torch.float64)
    with_zero = METHOD([tvs[0], zero, tvs[1]], lr=1e-2, iterations=100)
    assert torch.isfinite(with_zero).all()
    assert rel_err(with_zero, METHOD(tvs, lr=1e-2, iterations=100)) < 1e-12
    assert torch.equal(METHOD([zero, zero.clone()]), zero)


def test_invariant_to_expert_order() -> None:
    tvs = experts((7, 6), count=3)
    ref = METHOD(tvs, lr=1e-2, iterations=100)
    assert rel_err(METHOD(tvs[::-1], lr=1e-2, iterations=100), ref) < 1e-10


def test_non_matrix_parameters_get_the_mean() -> None:
    vecs = [randn(7, seed=t) for t in range(3)]
    assert torch.equal(METHOD(vecs), torch.stack(vecs).mean(dim=0))


def test_low_precision_input() -> None:
    tvs = [tv.bfloat16() for tv in experts((8, 6))]
    out = METHOD(tvs, lr=1e-2, iterations=300)
    assert out.dtype == torch.bfloat16
    assert torch.isfinite(out).all()


def test_params_and_defaults() -> None:
    assert METHOD.defaults() == {"lr": 1e-5, "iterations": 300}
    assert METHOD.default_scale == 1.0
    assert METHOD.validate({"lr": "roberta"}).lr == 2e-5
    assert METHOD.validate({"lr": "vit"}).lr == 1e-5
    for bad in ({"lr": 0.0}, {"lr": "bert"}, {"iterations": -1}, {"initial": "sum"}):
        with pytest.raises(AceMergeError):
            METHOD.validate(bad)
