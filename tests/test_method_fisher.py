"""Fisher merging: D = sum_t F_t D_t / sum_t F_t, elementwise, with a floor on F_t."""

from __future__ import annotations

import pytest
import torch
import transformers

import acemerge
import acemerge.methods.fisher  # noqa: F401  (registers the method)
from acemerge.errors import AceMergeError
from acemerge.methods.registry import get
from acemerge.statistics import collect_tensor_statistics

METHOD = get("fisher")


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64)


def fishers(shape: tuple[int, ...], count: int = 3) -> list[torch.Tensor]:
    return [randn(*shape, seed=100 + t).abs() + 0.1 for t in range(count)]


@pytest.mark.parametrize("shape", [(5, 4), (7,), (2, 3, 4), ()])
def test_equal_fishers_give_the_mean(shape: tuple[int, ...]) -> None:
    tvs = [randn(*shape, seed=t) for t in range(3)]
    same = fishers(shape, 1) * 3
    assert torch.allclose(METHOD(tvs, fishers=same), torch.stack(tvs).mean(0), atol=1e-12)


def test_hand_made_example() -> None:
    tvs = [torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0, 4.0]])]
    weights = [torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, 1.0]])]
    # (1*1 + 3*3) / 4 = 2.5 and (3*2 + 1*4) / 4 = 2.5
    merged = METHOD(tvs, fishers=weights, fisher_floor=0.0)
    assert torch.allclose(merged, torch.tensor([[2.5, 2.5]]))
    assert merged.dtype == torch.float32


def test_matches_the_formula_for_matrices_and_vectors() -> None:
    for shape in [(6, 5), (9,)]:
        tvs, fs = [randn(*shape, seed=t) for t in range(3)], fishers(shape)
        expected = sum(f * tv for f, tv in zip(fs, tvs, strict=True)) / sum(fs)
        assert torch.allclose(METHOD(tvs, fishers=fs), expected, atol=1e-12)


@pytest.mark.parametrize("floor", [0.0, 1e-6])
def test_zero_fishers_fall_back_to_the_mean(floor: float) -> None:
    tvs = [randn(2, 3, seed=t) for t in range(3)]
    fs = fishers((2, 3))
    for f in fs:
        f[0, 1] = 0.0  # no task's data moved this entry
    merged = METHOD(tvs, fishers=fs, fisher_floor=floor)
    assert torch.isfinite(merged).all()
    assert torch.allclose(merged[0, 1], torch.stack(tvs).mean(0)[0, 1], atol=1e-12)
    zeros = [torch.zeros(2, 3, dtype=torch.float64)] * 3
    assert torch.allclose(METHOD(tvs, fishers=zeros, fisher_floor=floor),
                          torch.stack(tvs).mean(0), atol=1e-12)


def test_the_floor_keeps_a_zero_fisher_task_in_play() -> None:
    tvs = [torch.tensor([0.0]), torch.tensor([1.0])]
    fs = [torch.tensor([0.0]), torch.tensor([1.0])]
    assert float(METHOD(tvs, fishers=fs, fisher_floor=0.0)) == 1.0
    assert float(METHOD(tvs, fishers=fs, fisher_floor=1.0)) == pytest.approx(0.5)
    assert float(METHOD(tvs, fishers=fs)) == pytest.approx(1.0 / (1.0 + 1e-6))


def test_one_task_returns_it() -> None:
    tv = randn(4, 3, seed=0)
    assert torch.allclose(METHOD([tv], fishers=fishers((4, 3), 1)), tv, atol=1e-12)


def test_shape_mismatch_is_an_error() -> None:
    tvs = [randn(4, 3, seed=t) for t in range(2)]
    with pytest.raises(AceMergeError, match=r"Fisher of task 0 has shape \(3, 4\)"):
        METHOD(tvs, fishers=fishers((3, 4), 2))


def test_defaults_and_validation() -> None:
    assert METHOD.defaults() == {"fisher_floor": 1e-6}
    with pytest.raises(AceMergeError, match="fisher_floor"):
        METHOD([randn(3, seed=0)], fishers=fishers((3,), 1), fisher_floor=-1.0)


@pytest.mark.parametrize("shape", [(4, 3), (4,)])
def test_missing_statistics_through_the_method(shape: tuple[int, ...]) -> None:
    with pytest.raises(AceMergeError, match="statistics 'fishers'"):
        METHOD([randn(*shape, seed=t) for t in range(2)])


def test_missing_statistics_through_merge_state_dicts() -> None:
    base = {"layer.weight": torch.zeros(4, 3), "layer.bias": torch.zeros(4)}
    experts = [{k: v + i for k, v in base.items()} for i in (1, 2)]
    with pytest.raises(AceMergeError, match="data-dependent.*statistics"):
        acemerge.merge_state_dicts(base, experts, method="fisher")


def test_gpt2_end_to_end_with_collected_fishers() -> None:
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16, pad_token_id=0)
    models = []
    for seed in range(3):
        torch.manual_seed(seed)
        models.append(transformers.GPT2ForSequenceClassification(config).eval())
    gen = torch.Generator().manual_seed(7)
    data = [[{"input_ids": torch.randint(1, 50, (3, 6), generator=gen)}] for _ in range(2)]
    provider = collect_tensor_statistics(zip(models[1:], data, strict=True), ("fishers",))
    base, sds = models[0].state_dict(), [m.state_dict() for m in models[1:]]
    merged = acemerge.merge_state_dicts(base, sds, method="fisher", statistics=provider,
                                        config=config.to_dict(), device="cpu")
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.0.ln_2.weight"):
        fs = [provider.get("fishers", name, t).clamp_min(1e-6) for t in range(2)]
        expected = sum(f * sd[name] for f, sd in zip(fs, sds, strict=True)) / sum(fs)
        assert torch.allclose(merged[name], expected, atol=1e-5), name
    assert torch.equal(merged["score.weight"], base["score.weight"])
