"""RegMean: D = (sum_t D_t G~_t)(sum_t G~_t)^-1, G~ = a G + (1 - a) diag(G)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import acemerge
import acemerge.methods.regmean  # noqa: F401  (registers the method)
from acemerge.errors import AceMergeError
from acemerge.methods.registry import get
from acemerge.statistics import TensorStatistics, collect_tensor_statistics

METHOD = get("regmean")
SHAPES = {"tall": (9, 5), "square": (6, 6), "wide": (3, 10)}


def randn(*shape: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def gram(d_in: int, rows: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    x = randn(rows, d_in, seed=seed, dtype=dtype) * (1.0 + torch.arange(d_in, dtype=dtype))
    return x.T @ x


def problem(shape: tuple[int, int], count: int = 3, seed: int = 0
            ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    tvs = [randn(*shape, seed=seed + t) * (1.0 + t) for t in range(count)]
    grams = [gram(shape[1], rows=2 * shape[1] + 3, seed=seed + 50 + t) for t in range(count)]
    return tvs, grams


def numpy_regmean(tvs: list[torch.Tensor], grams: list[torch.Tensor],
                  alpha: float) -> np.ndarray:
    """The closed form written directly in numpy float64."""
    numerator = np.zeros(tuple(tvs[0].shape))
    system = np.zeros(tuple(grams[0].shape))
    for tv, g in zip(tvs, grams, strict=True):
        g = g.double().numpy()
        reduced = alpha * g + (1 - alpha) * np.diag(np.diag(g))
        numerator += tv.double().numpy() @ reduced
        system += reduced
    return np.linalg.solve(system.T, numerator.T).T


def rel_err(actual: torch.Tensor, expected: np.ndarray | torch.Tensor) -> float:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    return float((actual.double() - expected).norm() / expected.norm().clamp_min(1e-300))


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 1.0])
def test_identical_grams_give_the_mean(kind: str, alpha: float) -> None:
    tvs, grams = problem(SHAPES[kind])
    merged = METHOD(tvs, grams=[grams[0]] * 3, alpha=alpha)
    assert rel_err(merged, torch.stack(tvs).mean(0)) < 1e-10


@pytest.mark.parametrize("kind", SHAPES)
@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3])
def test_matches_numpy_float64(kind: str, alpha: float) -> None:
    tvs, grams = problem(SHAPES[kind])
    assert rel_err(METHOD(tvs, grams=grams, alpha=alpha), numpy_regmean(tvs, grams, alpha)) < 1e-9


def test_float32_inputs() -> None:
    tvs, grams = problem((12, 8))
    merged = METHOD([t.float() for t in tvs], grams=[g.float() for g in grams], alpha=1.0)
    assert merged.dtype == torch.float32
    assert rel_err(merged, numpy_regmean(tvs, grams, 1.0)) < 1e-4


def test_default_alpha_is_0_9() -> None:
    tvs, grams = problem((7, 4))
    assert METHOD.defaults() == {"alpha": 0.9}
    assert rel_err(METHOD(tvs, grams=grams), numpy_regmean(tvs, grams, 0.9)) < 1e-9


@pytest.mark.parametrize("kind", SHAPES)
def test_one_task_returns_it(kind: str) -> None:
    tvs, grams = problem(SHAPES[kind], count=1)
    assert rel_err(METHOD(tvs, grams=grams), tvs[0]) < 1e-10


def test_alpha_zero_is_a_per_input_weighted_mean() -> None:
    tvs, grams = problem((5, 4))
    weights = torch.stack([g.diagonal() for g in grams])  # (T, d_in)
    expected = sum(tv * w for tv, w in zip(tvs, weights, strict=True)) / weights.sum(0)
    assert rel_err(METHOD(tvs, grams=grams, alpha=0.0), expected) < 1e-12


def test_no_data_reached_the_layer_gives_the_mean() -> None:
    tvs, _ = problem((4, 3))
    merged = METHOD(tvs, grams=[torch.zeros(3, 3, dtype=torch.float64)] * 3)
    assert rel_err(merged, torch.stack(tvs).mean(0)) < 1e-12


def test_non_matrix_parameters_get_the_mean_without_statistics() -> None:
    vectors = [randn(6, seed=s) for s in range(3)]
    assert torch.allclose(METHOD(vectors), torch.stack(vectors).mean(0))


def test_gram_in_the_wrong_space_is_an_error() -> None:
    tvs, _ = problem((5, 3))
    with pytest.raises(AceMergeError, match=r"Gram of task 0 has shape \(5, 5\).*\(3, 3\)"):
        METHOD(tvs, grams=[gram(5, 9, seed=t) for t in range(3)])


def test_alpha_out_of_range() -> None:
    tvs, grams = problem((4, 3))
    with pytest.raises(AceMergeError, match="alpha"):
        METHOD(tvs, grams=grams, alpha=1.5)


def test_missing_statistics_through_the_method() -> None:
    tvs, _ = problem((4, 3))
    with pytest.raises(AceMergeError, match="statistics 'grams'"):
        METHOD(tvs)


def test_missing_statistics_through_merge_state_dicts() -> None:
    base = {"layer.weight": torch.zeros(4, 3), "layer.bias": torch.zeros(4)}
    experts = [{k: v + i for k, v in base.items()} for i in (1, 2)]
    with pytest.raises(AceMergeError, match="data-dependent.*statistics"):
        acemerge.merge_state_dicts(base, experts, method="regmean")


# ------------------------------------------------------------------ end to end, GPT-2


def tiny_gpt2(seed: int) -> transformers.GPT2ForSequenceClassification:
    torch.manual_seed(seed)
    config = transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50,
                                     n_positions=16, pad_token_id=0)
    return transformers.GPT2ForSequenceClassification(config).eval()


def token_batches(seed: int, count: int = 3) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, 50, (4, 8), generator=gen)} for _ in range(count)]


@pytest.fixture(scope="module")
def gpt2_merge() -> dict:
    base, experts = tiny_gpt2(0), [tiny_gpt2(1), tiny_gpt2(2)]
    provider = collect_tensor_statistics(
        [(expert, token_batches(10 + i)) for i, expert in enumerate(experts)]
    )
    sds = [e.state_dict() for e in experts]
    merged = acemerge.merge_state_dicts(
        base.state_dict(), sds, method="regmean", statistics=provider,
        config=base.config.to_dict(), device="cpu",
    )
    return {"base": base.state_dict(), "experts": sds, "provider": provider,
            "merged": merged, "config": base.config}


def regmean_stored(ctx: dict, name: str, transpose: bool, alpha: float = 0.9) -> np.ndarray:
    """Independent RegMean of a stored weight; Conv1D weights are W^T = (d_out, d_in)."""
    base = ctx["base"][name].double()
    tvs = [(sd[name].double() - base) for sd in ctx["experts"]]
    if transpose:
        tvs = [tv.T for tv in tvs]
    grams = [ctx["provider"].get("grams", name, t) for t in range(2)]
    delta = torch.as_tensor(numpy_regmean(tvs, grams, alpha))
    return (base + (delta.T if transpose else delta)).numpy()


@pytest.mark.parametrize("name", ["transformer.h.0.attn.c_attn.weight",
                                  "transformer.h.0.attn.c_proj.weight",
                                  "transformer.h.0.mlp.c_fc.weight",
                                  "transformer.h.0.mlp.c_proj.weight"])
def test_gpt2_conv1d_is_merged_on_its_transpose(gpt2_merge: dict, name: str) -> None:
    merged = gpt2_merge["merged"][name]
    assert merged.shape == gpt2_merge["base"][name].shape
    assert rel_err(merged, regmean_stored(gpt2_merge, name, transpose=True)) < 1e-5


def test_gpt2_square_conv1d_orientation_matters(gpt2_merge: dict) -> None:
    name = "transformer.h.0.attn.c_proj.weight"  # (16, 16): both orientations fit
    as_stored = regmean_stored(gpt2_merge, name, transpose=False)
    assert rel_err(gpt2_merge["merged"][name], as_stored) > 1e-2


def test_gpt2_other_parameters(gpt2_merge: dict) -> None:
    merged, base, experts = gpt2_merge["merged"], gpt2_merge["base"], gpt2_merge["experts"]
    for name in ("transformer.wte.weight", "transformer.h.0.ln_1.bias",
                 "transformer.h.0.attn.c_attn.bias"):
        assert torch.allclose(merged[name], (experts[0][name] + experts[1][name]) / 2,
                              atol=1e-6)
    assert torch.equal(merged["score.weight"], base["score.weight"])  # gpt2 profile keeps it


def test_statistics_saved_and_loaded_merge_the_same(gpt2_merge: dict, tmp_path) -> None:
    paths = gpt2_merge["provider"].save(tmp_path)
    merged = acemerge.merge_state_dicts(
        gpt2_merge["base"], gpt2_merge["experts"], method="regmean",
        statistics=TensorStatistics.load(paths), config=gpt2_merge["config"].to_dict(),
        device="cpu",
    )
    for name, tensor in merged.items():
        assert torch.equal(tensor, gpt2_merge["merged"][name]), name


def test_merge_on_disk_with_statistics(gpt2_merge: dict, tmp_path) -> None:
    folders = []
    for i, sd in enumerate([gpt2_merge["base"], *gpt2_merge["experts"]]):
        model = transformers.GPT2ForSequenceClassification(gpt2_merge["config"])
        model.load_state_dict(sd)
        model.save_pretrained(tmp_path / f"m{i}")
        folders.append(tmp_path / f"m{i}")
    acemerge.merge(folders[0], folders[1:], tmp_path / "out", method="regmean",
                   statistics=gpt2_merge["provider"], device="cpu")
    merged = transformers.GPT2ForSequenceClassification.from_pretrained(tmp_path / "out")
    for name, tensor in merged.state_dict().items():
        assert torch.allclose(tensor, gpt2_merge["merged"][name], atol=1e-6), name
