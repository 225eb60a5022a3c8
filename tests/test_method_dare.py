"""DARE: random drop with probability p, rescale by 1/(1-p), then Task Arithmetic or TIES."""

from __future__ import annotations

import math

import pytest
import torch

from acemerge.errors import AceMergeError
from acemerge.methods import dare, registry, ties


def _vectors(shape: tuple[int, ...], n: int = 3, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(n)]


def test_registered_with_paper_defaults() -> None:
    method = registry.get("dare")
    assert method is dare.METHOD
    assert method.defaults() == {"p": 0.9, "combine": "task_arithmetic", "seed": 0, "ties_k": 0.2,
                                 "weight": 1.0}
    assert method.default_scale == 1.0


def test_same_seed_same_output_other_seed_other_output() -> None:
    tvs = _vectors((16, 8))
    method = registry.get("dare")
    for combine in ("task_arithmetic", "ties"):
        first = method(tvs, seed=7, combine=combine)
        assert torch.equal(first, method(tvs, seed=7, combine=combine))
        assert not torch.equal(first, method(tvs, seed=8, combine=combine))


def test_each_task_draws_its_own_mask() -> None:
    tv = torch.ones(64, 64)
    first, second = (dare.drop_and_rescale(tv, 0.5, seed=0, task_index=t) for t in (0, 1))
    assert not torch.equal(first != 0, second != 0)


def test_drop_rate_and_rescale() -> None:
    tv = torch.randn(200, 500, generator=torch.Generator().manual_seed(1))
    p = 0.9
    sparse = dare.drop_and_rescale(tv, p, seed=3, task_index=0)
    kept = sparse != 0
    fraction = float(kept.double().mean())
    # Binomial(n, 1 - p): 5 standard deviations of the kept fraction
    assert abs(fraction - (1 - p)) < 5 * math.sqrt(p * (1 - p) / tv.numel())
    torch.testing.assert_close(sparse[kept], tv[kept] / (1 - p))


@pytest.mark.parametrize("p", [0.9, 0.5])
def test_unbiased_in_expectation(p: float) -> None:
    """The mean over seeds approaches the Task Arithmetic sum.

    Per entry, sum_t tau^_t has mean sum_t tau_t and variance p/(1-p) * sum_t tau_t^2
    (independent Bernoulli masks across tasks), so the mean of N seeds has standard error
    sqrt(p/(1-p) * sum_t tau_t^2 / N). All seeds are fixed, so the test is deterministic;
    5 standard errors is a bound a correct implementation meets for each of the 20 entries
    with overwhelming probability, while dropping the rescale (bias -p * tau) or
    rescaling by 1/p fails it by many standard errors.
    """
    tvs = _vectors((4, 5))
    n_seeds = 1000
    method = registry.get("dare")
    mean = sum(method(tvs, p=p, seed=s) for s in range(n_seeds)) / n_seeds
    target = tvs[0] + tvs[1] + tvs[2]
    energy = sum(tv**2 for tv in tvs)
    standard_error = torch.sqrt(p / (1 - p) * energy / n_seeds)
    assert ((mean - target).abs() < 5 * standard_error).all()


def test_no_drop_reduces_to_task_arithmetic_and_ties() -> None:
    tvs = _vectors((6, 7))
    method = registry.get("dare")
    torch.testing.assert_close(method(tvs, p=0.0), tvs[0] + tvs[1] + tvs[2])
    expected = registry.get("ties")(tvs, trim="parameter", k=0.3)
    torch.testing.assert_close(method(tvs, p=0.0, combine="ties", ties_k=0.3), expected)


def test_ties_combination_is_ties_on_the_sparsified_vectors() -> None:
    tvs = _vectors((10, 12))
    sparse = [dare.drop_and_rescale(tv, 0.5, seed=4, task_index=t) for t, tv in enumerate(tvs)]
    merged = registry.get("dare")(tvs, p=0.5, seed=4, combine="ties", ties_k=0.1)
    assert torch.equal(merged, ties.ties_merge(sparse, 0.1))


def test_non_matrix_parameters_use_the_same_rule() -> None:
    tvs = _vectors((30,))
    sparse = [dare.drop_and_rescale(tv, 0.9, seed=0, task_index=t) for t, tv in enumerate(tvs)]
    assert torch.equal(registry.get("dare")(tvs), sparse[0] + sparse[1] + sparse[2])


def test_low_precision_inputs() -> None:
    tvs = [tv.to(torch.bfloat16) for tv in _vectors((8, 8))]
    merged = registry.get("dare")(tvs, p=0.5)
    assert merged.dtype == torch.bfloat16
    reference = registry.get("dare")([tv.float() for tv in tvs], p=0.5)
    torch.testing.assert_close(merged, reference.to(torch.bfloat16))


def test_parameter_validation() -> None:
    tvs = _vectors((2, 2))
    with pytest.raises(AceMergeError, match="only to combine='ties'"):
        registry.get("dare")(tvs, ties_k=0.5)
    with pytest.raises(AceMergeError, match="parameter 'p'"):
        registry.get("dare")(tvs, p=1.0)
    with pytest.raises(AceMergeError, match="parameter 'combine'"):
        registry.get("dare")(tvs, combine="mean")
