"""ACE-Merging: agreement with the paper's equations, limiting cases, invariances."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from acemerge import AceMergeError
from acemerge.methods import get
from acemerge.methods.ace import ABLATIONS, EPS_PRESETS, heterogeneity
from tests.ace_reference import ace_reference, gamma_of

SHAPES = {"tall": (40, 12), "wide": (12, 40), "square": (24, 24)}
HOMOGENEOUS_SCALES = (1.0, 1.15, 0.9)  # energies alike: gamma far below 0.3
HETEROGENEOUS_SCALES = (0.05, 0.6, 4.0)  # energies over ~4 decades: gamma above 0.3


def task_vectors(shape: tuple[int, int], scales, seed: int = 0, dtype=torch.float64):
    """Low-rank-plus-noise task vectors with a nonzero row mean (so centering matters)."""
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    out = []
    for scale in scales:
        low = torch.randn(d_out, 3, generator=gen, dtype=torch.float64) @ torch.randn(
            3, d_in, generator=gen, dtype=torch.float64)
        noise = 0.3 * torch.randn(d_out, d_in, generator=gen, dtype=torch.float64)
        shift = torch.randn(1, d_in, generator=gen, dtype=torch.float64)
        out.append((scale * (low + noise + shift)).to(dtype))
    return out


def rel_err(actual: torch.Tensor, expected: np.ndarray) -> float:
    """max |diff| / max |ref|, the issue's agreement measure."""
    expected_t = torch.from_numpy(expected)
    return float((actual.double() - expected_t).abs().max() / expected_t.abs().max())


def numpy_list(tvs):
    return [t.double().numpy() for t in tvs]


@pytest.mark.parametrize("shape_name", SHAPES)
@pytest.mark.parametrize("scales", [HOMOGENEOUS_SCALES, HETEROGENEOUS_SCALES],
                         ids=["homogeneous", "heterogeneous"])
def test_matches_float64_reference(shape_name, scales):
    tvs = task_vectors(SHAPES[shape_name], scales)
    expect_het = scales is HETEROGENEOUS_SCALES
    assert (gamma_of(numpy_list(tvs)) > 0.3) == expect_het
    assert heterogeneity(tvs).heterogeneous == expect_het
    merged = get("ace")(tvs)
    assert merged.dtype == torch.float64 and merged.shape == tvs[0].shape
    assert rel_err(merged, ace_reference(numpy_list(tvs))) < 1e-6


@pytest.mark.parametrize("rung", sorted(ABLATIONS))
@pytest.mark.parametrize("shape_name", SHAPES)
def test_ablation_rungs_match_reference(rung, shape_name):
    tvs = task_vectors(SHAPES[shape_name], HETEROGENEOUS_SCALES, seed=3)
    flags = ABLATIONS[rung]
    expected = ace_reference(
        numpy_list(tvs), eps=2e-4, adaptive=flags["adaptive_normalization"],
        prior=flags["collective_prior"], refine=flags["spectral_refinement"])
    assert rel_err(get("ace")(tvs, eps=2e-4, **flags), expected) < 1e-6


@pytest.mark.parametrize("rung", sorted(ABLATIONS))
def test_ablation_preset_sets_the_switches(rung):
    tvs = task_vectors((16, 12), HETEROGENEOUS_SCALES, seed=4)
    assert torch.equal(get("ace")(tvs, ablation=rung), get("ace")(tvs, **ABLATIONS[rung]))


def test_ablation_preset_refuses_contradicting_switch():
    with pytest.raises(AceMergeError, match="ablation E1 sets"):
        get("ace")(task_vectors((4, 3), (1.0, 2.0)), ablation="E1", collective_prior=True)


def test_rungs_differ_from_each_other():
    tvs = task_vectors((30, 20), HETEROGENEOUS_SCALES, seed=5)
    results = [get("ace")(tvs, **ABLATIONS[r]) for r in sorted(ABLATIONS)]
    for a, b in itertools.combinations(results, 2):
        assert not torch.allclose(a, b, rtol=1e-3, atol=0)


def test_float32_default_close_to_reference():
    tvs = task_vectors((40, 12), HETEROGENEOUS_SCALES, dtype=torch.float32)
    merged = get("ace")(tvs, eps="gpt2")
    assert merged.dtype == torch.float32
    assert rel_err(merged, ace_reference(numpy_list(tvs), eps=EPS_PRESETS["gpt2"])) < 1e-3


def test_inverse_solver_agrees_with_solve():
    tvs = task_vectors((24, 24), HETEROGENEOUS_SCALES)
    a, b = get("ace")(tvs), get("ace")(tvs, solver="inverse")
    assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def centered_copy(tvs):
    """Task vectors with zero column means: centering (Eq. 5) leaves them unchanged."""
    return [t - t.mean(dim=0, keepdim=True) for t in tvs]


def test_eps_to_infinity_gives_mean_in_homogeneous_branch():
    tvs = centered_copy(task_vectors((20, 10), HOMOGENEOUS_SCALES))
    merged = get("ace")(tvs, eps=1e10, tau=1e6)
    mean = torch.stack(tvs).mean(0)
    assert torch.allclose(merged, mean, rtol=0, atol=1e-6 * mean.abs().max())


def test_eps_to_infinity_gives_inverse_energy_mean_in_heterogeneous_branch():
    tvs = centered_copy(task_vectors((20, 10), HETEROGENEOUS_SCALES))
    merged = get("ace")(tvs, eps=1e10, tau=0.0, spectral_refinement=False)
    weights = torch.stack([1.0 / t.pow(2).sum() for t in tvs])  # 1 / e_t (App. B.1)
    expected = sum(w * t for w, t in zip(weights, tvs, strict=True)) / weights.sum()
    assert torch.allclose(merged, expected, rtol=0, atol=1e-6 * expected.abs().max())
    plain_mean = torch.stack(tvs).mean(0)
    assert not torch.allclose(merged, plain_mean, rtol=1e-2)


def test_eps_limit_uses_centered_task_vectors_in_general():
    """With a nonzero row mean, the limit is the mean of the CENTERED task vectors (Eq. 5)."""
    tvs = task_vectors((20, 10), HOMOGENEOUS_SCALES)
    merged = get("ace")(tvs, eps=1e10, tau=1e6)
    expected = torch.stack(centered_copy(tvs)).mean(0)
    assert torch.allclose(merged, expected, rtol=0, atol=1e-6 * expected.abs().max())


def test_k_frac_to_zero_gives_w_pre():
    tvs = task_vectors((40, 12), HETEROGENEOUS_SCALES)
    merged = get("ace")(tvs, k_frac=1e-6)  # k = int(12 * 1e-6) = 0
    w_pre = ace_reference(numpy_list(tvs), refine=False)
    assert rel_err(merged, w_pre) < 1e-6
    assert rel_err(get("ace")(tvs), w_pre) > 1e-2  # the refinement really changes things


@pytest.mark.parametrize("scales", [HOMOGENEOUS_SCALES, HETEROGENEOUS_SCALES])
def test_invariant_to_expert_order(scales):
    tvs = task_vectors((30, 18), scales + (2.0,))
    reference = get("ace")(tvs)
    for perm in itertools.permutations(range(len(tvs))):
        permuted = get("ace")([tvs[i] for i in perm])
        assert torch.allclose(permuted, reference, rtol=1e-9, atol=1e-12)


def test_identical_experts_without_prior_give_centered_task_vector():
    """T copies of D: (sum C S_reg)(sum S_reg)^-1 = C, the row-mean-free part of D."""
    (tv,) = task_vectors((20, 10), (1.0,))
    merged = get("ace")([tv, tv, tv], collective_prior=False)
    assert torch.allclose(merged, centered_copy([tv])[0], atol=1e-9)


@pytest.mark.parametrize("tau", [0.0, 1e6], ids=["heterogeneous", "homogeneous"])
def test_zero_task_vector_gives_finite_result(tau):
    tvs = task_vectors((16, 8), HOMOGENEOUS_SCALES, dtype=torch.float32)
    tvs[1] = torch.zeros_like(tvs[1])
    assert torch.isfinite(get("ace")(tvs, tau=tau)).all()
    zeros = [torch.zeros(16, 8) for _ in range(3)]
    assert torch.equal(get("ace")(zeros, tau=tau), torch.zeros(16, 8))


def test_singular_system_falls_back_to_pseudo_inverse():
    zeros = [torch.zeros(6, 4, dtype=torch.float64) for _ in range(2)]
    assert torch.equal(get("ace")(zeros, eps=0.0, collective_prior=False), zeros[0])


def test_non_matrix_parameters_get_the_mean():
    vectors = [torch.randn(7) for _ in range(3)]
    assert torch.allclose(get("ace")(vectors), torch.stack(vectors).mean(0))


@pytest.mark.parametrize(
    ("params", "fragment"),
    [({"k_frac": 0.0}, "k_frac"), ({"k_frac": 1.5}, "k_frac"), ({"eps": -1.0}, "eps"),
     ({"tau": -0.1}, "tau"), ({"eps": "bert"}, "eps"), ({"rank": 3}, "unknown parameter 'rank'")],
)
def test_invalid_parameters_are_rejected(params, fragment):
    with pytest.raises(AceMergeError, match=fragment):
        get("ace")(task_vectors((4, 3), (1.0, 2.0)), **params)


def test_eps_presets_are_the_papers():
    assert EPS_PRESETS["gpt2"] == 4e-2 and EPS_PRESETS["roberta-base"] == 2e-4
    tvs = task_vectors((12, 6), HETEROGENEOUS_SCALES)
    assert torch.equal(get("ace")(tvs, eps="gpt2"), get("ace")(tvs, eps=4e-2))


def low_rank_experts(seed: int = 0) -> list[torch.Tensor]:
    """Three rank-2..8 task vectors on a 64 x 128 layer (LoRA-like)."""
    gen = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(64, r, generator=gen, dtype=torch.float64)
            @ torch.randn(r, 128, generator=gen, dtype=torch.float64)
            for r, scale in ((2, 0.002), (5, 0.02), (8, 0.1))]


def test_refinement_rank_is_capped_at_the_numerical_rank_of_w_fused():
    """With low-rank experts, k = int(0.3 * 64) = 19 exceeds W_fused's rank; the paper's
    rule then adds directions of zero singular values, chosen by rounding noise."""
    ace = get("ace")
    exact = [tv.float() for tv in low_rank_experts()]  # float32, as the engine computes
    base = torch.randn(64, 128, generator=torch.Generator().manual_seed(9))
    stored = [(base + tv) - base for tv in exact]  # the experts stored as float32 models
    assert heterogeneity(exact).heterogeneous

    def rel(a, b):
        return float((a - b).abs().max() / b.abs().max())

    capped = [ace(tvs, eps=1e-3) for tvs in (exact, stored)]
    paper = [ace(tvs, eps=1e-3, refine_rank="paper") for tvs in (exact, stored)]
    truth = ace(low_rank_experts(), eps=1e-3)  # float64
    # float32 rounding in this ill-conditioned solve alone leaves both ~1e-5 from float64
    assert all(rel(c.double(), truth) < 3e-5 for c in capped)
    assert rel(paper[1], paper[0]) > 1e-2  # noise directions differ


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_refinement_rank_cap_never_changes_a_full_rank_result(shape):
    tvs = task_vectors(shape, HETEROGENEOUS_SCALES)
    ace = get("ace")
    assert torch.equal(ace(tvs), ace(tvs, refine_rank="paper"))
