"""TIES-Merging: top-k trim, sign election, disjoint mean; exact whole-model thresholds."""

from __future__ import annotations

import pytest
import torch

from acemerge.errors import AceMergeError
from acemerge.methods import registry, ties
from acemerge.methods.registry import sequential_pass


def _model(seed: int = 0, n_tasks: int = 3) -> list[list[torch.Tensor]]:
    """A small 'model': parameters of several shapes and scales, T task vectors each."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(12, 10), (10,), (3, 4, 5), (200,), (1,)]
    return [
        [torch.randn(shape, generator=gen) * (i + 1) for _ in range(n_tasks)]
        for i, shape in enumerate(shapes)
    ]


def _exact_thresholds(model: list[list[torch.Tensor]], k: float) -> list[float]:
    """Reference: concatenate every parameter of each task, take the n_keep-th largest |x|."""
    result = []
    for t in range(len(model[0])):
        flat = torch.cat([param[t].double().abs().reshape(-1) for param in model])
        n_keep = ties.keep_count(flat.numel(), k)
        result.append(float(flat.topk(n_keep).values[-1]))
    return result


def test_registered_with_paper_defaults() -> None:
    method = registry.get("ties")
    assert method is ties.METHOD
    assert method.defaults() == {"k": 0.2, "trim": "model", "thresholds": None,
                                 "semantics": "paper", "weight": 1.0, "density": 1.0,
                                 "normalize": True}
    assert method.default_scale == 1.0
    assert method.other_rule_name == "ties"


def test_sign_election_and_disjoint_mean_hand_made() -> None:
    tvs = [
        torch.tensor([1.0, -2.0, 3.0, 0.0, 1.0, -1.0]),
        torch.tensor([2.0, 1.0, -1.0, 0.0, -1.0, 2.0]),
        torch.tensor([-4.0, 3.0, -1.0, 5.0, 0.0, -1.0]),
    ]
    # sums -1, 2, 1, 5, 0, 0 -> signs -, +, +, +, none, none; zeros never count as agreeing
    expected = torch.tensor([-4.0, 2.0, 3.0, 5.0, 0.0, 0.0])
    merged = registry.get("ties")(tvs, k=1.0)  # k = 1: nothing trimmed, no thresholds needed
    assert torch.equal(merged, expected)
    assert torch.equal(registry.get("ties")(tvs, k=1.0, trim="parameter"), expected)


def test_trim_then_elect_hand_made() -> None:
    tvs = [
        torch.tensor([[4.0, -1.0], [2.0, -3.0]]),  # keeps 4, -3
        torch.tensor([[-1.0, 5.0], [-2.0, 1.0]]),  # keeps 5, -2
        torch.tensor([[-3.0, 2.0], [1.0, -6.0]]),  # keeps -3, -6
    ]
    # trimmed sums 1, 5, -2, -9: entry 0 is +4 (its untrimmed sum is 0)
    expected = torch.tensor([[4.0, 5.0], [-2.0, -4.5]])
    merged = registry.get("ties")(tvs, k=0.5, trim="parameter")
    assert torch.equal(merged, expected)


def test_per_parameter_trim_keeps_exactly_top_k() -> None:
    gen = torch.Generator().manual_seed(1)
    for tv in (torch.randn(10, 10, generator=gen), torch.randn(37, generator=gen)):
        n_keep = ties.keep_count(tv.numel(), 0.2)
        trimmed = ties.trim(tv, ties.magnitude_threshold(tv, 0.2))
        kept = trimmed != 0
        assert int(kept.sum()) == n_keep
        assert tv.abs()[kept].min() > tv.abs()[~kept].max()
        assert torch.equal(trimmed[kept], tv[kept])


@pytest.mark.parametrize(
    ("numel", "k", "expected"),
    [(100, 0.2, 20), (15, 0.2, 3), (3, 0.2, 1), (2, 0.2, 1), (7, 0.5, 4), (5, 1.0, 5)],
)
def test_keep_count_rounds_half_up_and_keeps_at_least_one(
    numel: int, k: float, expected: int
) -> None:
    assert ties.keep_count(numel, k) == expected


@pytest.mark.parametrize("k", [0.2, 0.01, 0.5, 1e-4, 1.0])
def test_model_thresholds_match_concatenation(k: float) -> None:
    model = _model()
    calls = []

    def make_iter():
        calls.append(1)
        return iter(model)

    thresholds = ties.model_thresholds(sequential_pass(make_iter), k)
    assert list(thresholds) == _exact_thresholds(model, k)
    assert len(calls) == 2  # float32 magnitudes: two 16-bit radix passes


def test_model_thresholds_exact_with_ties_and_low_precision() -> None:
    model = [[p.round().to(torch.bfloat16) for p in param] for param in _model(seed=2)]
    model.append([torch.zeros(50, dtype=torch.bfloat16) for _ in range(3)])
    for k in (0.2, 0.7, 0.9):
        thresholds = ties.model_thresholds(sequential_pass(lambda: iter(model)), k)
        assert list(thresholds) == _exact_thresholds(model, k)
        total = sum(param[0].numel() for param in model)
        kept = sum(int((param[0].float().abs() >= thresholds[0]).sum()) for param in model)
        assert kept >= ties.keep_count(total, k)  # ties at the threshold are all kept


def test_model_thresholds_float64_restart() -> None:
    model = _model(seed=3)
    model[2] = [p.double() / 3 for p in model[2]]  # float64 values not representable in fp32
    calls = []

    def make_iter():
        calls.append(1)
        return iter(model)

    thresholds = ties.model_thresholds(sequential_pass(make_iter), 0.2)
    assert list(thresholds) == _exact_thresholds(model, 0.2)
    assert len(calls) <= 5  # at most one aborted float32 pass, then four float64 passes


def test_float64_thresholds_trim_float32_parameters_exactly() -> None:
    model = _model(seed=6)
    model[0] = [p.double() / 3 for p in model[0]]
    thresholds = ties.model_thresholds(sequential_pass(lambda: iter(model)), 0.25)
    for t, threshold in enumerate(thresholds):
        kept = sum(int((ties.trim(param[t], threshold) != 0).sum()) for param in model)
        assert kept == ties.keep_count(sum(param[t].numel() for param in model), 0.25)


def test_model_thresholds_rejects_bad_input() -> None:
    with pytest.raises(AceMergeError, match="k must be"):
        ties.model_thresholds(sequential_pass(lambda: iter(_model())), 0.0)
    with pytest.raises(AceMergeError, match="no entries"):
        ties.model_thresholds(sequential_pass(lambda: iter([])), 0.2)


def test_model_trim_equals_trimming_the_concatenated_model() -> None:
    model = _model(seed=4)
    thresholds = ties.model_thresholds(sequential_pass(lambda: iter(model)), 0.2)
    method = registry.get("ties")
    per_param = [method(param, thresholds=thresholds).reshape(-1) for param in model]
    flat_tasks = [torch.cat([param[t].reshape(-1) for param in model]) for t in range(3)]
    whole = method(flat_tasks, trim="parameter")  # per-"parameter" on the whole flat model
    assert torch.equal(torch.cat(per_param), whole)


def test_model_trim_needs_thresholds() -> None:
    tvs = _model()[0]
    with pytest.raises(AceMergeError, match="first pass"):
        registry.get("ties")(tvs)
    with pytest.raises(AceMergeError, match="2 thresholds for 3"):
        registry.get("ties")(tvs, thresholds=(0.1, 0.2))
    with pytest.raises(AceMergeError, match="only to trim='model'"):
        registry.get("ties")(tvs, trim="parameter", thresholds=(0.1, 0.2, 0.3))
    with pytest.raises(AceMergeError, match="thresholds"):
        registry.get("ties")(tvs, thresholds=(0.1, -0.2, 0.3))
    with pytest.raises(AceMergeError, match="parameter 'k'"):
        registry.get("ties")(tvs, k=1.5)


def test_task_order_invariant() -> None:
    model = _model(seed=5, n_tasks=4)
    thresholds = ties.model_thresholds(sequential_pass(lambda: iter(model)), 0.3)
    order = [2, 0, 3, 1]
    method = registry.get("ties")
    for param in model:
        permuted = [param[i] for i in order]
        torch.testing.assert_close(
            method(param, thresholds=thresholds),
            method(permuted, thresholds=tuple(thresholds[i] for i in order)),
        )
        torch.testing.assert_close(
            method(param, trim="parameter"), method(permuted, trim="parameter")
        )


def test_low_precision_output_dtype() -> None:
    tvs = [t.to(torch.bfloat16) for t in _model()[0]]
    merged = registry.get("ties")(tvs, trim="parameter")
    assert merged.dtype == torch.bfloat16
    reference = registry.get("ties")([t.float() for t in tvs], trim="parameter")
    torch.testing.assert_close(merged, reference.to(torch.bfloat16))


def test_model_thresholds_are_the_same_in_any_grouping() -> None:
    """The passes are map-reduce: partial counts combined in any grouping and order (as
    executors on many workers combine them) give the same thresholds."""
    model = _model(seed=7) + _model(seed=8)

    def shuffled_tree_pass(map_fn, reduce_fn):
        parts = [map_fn(param) for param in model]
        order = torch.randperm(len(parts), generator=torch.Generator().manual_seed(0))
        parts = [parts[i] for i in order]
        while len(parts) > 1:  # pairwise, like partials coming back from workers
            parts = [reduce_fn(*parts[i:i + 2]) if i + 1 < len(parts) else parts[i]
                     for i in range(0, len(parts), 2)]
        return parts[0]

    for k in (0.2, 0.05):
        grouped = ties.model_thresholds(shuffled_tree_pass, k)
        assert grouped == ties.model_thresholds(sequential_pass(lambda: iter(model)), k)
        assert list(grouped) == _exact_thresholds(model, k)
