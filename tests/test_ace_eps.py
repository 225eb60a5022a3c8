"""ACE's eps options: relative (scale-free), auto (shrinkage rules), paper (per model), and
the scale-free heterogeneity statistic. The paper's behaviour stays the default."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from sklearn.covariance import ledoit_wolf, ledoit_wolf_shrinkage, oas

from acemerge import AceMergeError
from acemerge.api import merge_state_dicts
from acemerge.methods import get
from acemerge.methods.ace import AceParams, heterogeneity, paper_eps, resolve_for_model
from acemerge.methods.shrinkage import (
    auto_ridge_ratio,
    ledoit_wolf_intensity,
    mp_edge_ratio,
    oas_intensity,
    ridge_ratio,
)
from tests.ace_reference import ace_reference
from tests.test_ace import HETEROGENEOUS_SCALES, HOMOGENEOUS_SCALES, SHAPES, task_vectors

ace = get("ace")


def centered_and_gram(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centered = delta - delta.mean(dim=0, keepdim=True)
    return centered, centered.T @ centered


def mean_eigenvalue(delta: torch.Tensor) -> float:
    _, gram = centered_and_gram(delta)
    return float(torch.trace(gram)) / gram.shape[0]


@pytest.mark.parametrize("shape", [(40, 12), (12, 40), (24, 24), (300, 7), (3, 50)])
@pytest.mark.parametrize("seed", [0, 1])
def test_shrinkage_intensities_equal_scikit_learn(shape, seed):
    delta = task_vectors(shape, [1.0], seed=seed)[0]
    centered, gram = centered_and_gram(delta)
    rows = delta.numpy()
    lw = ledoit_wolf_intensity(centered, gram)
    assert lw == pytest.approx(ledoit_wolf_shrinkage(centered.numpy(), assume_centered=True),
                               rel=1e-10, abs=1e-12)
    assert lw == pytest.approx(ledoit_wolf(rows)[1], rel=1e-10, abs=1e-12)  # sklearn centers
    assert oas_intensity(centered, gram) == pytest.approx(oas(rows)[1], rel=1e-10, abs=1e-12)


def test_intensity_is_undefined_without_variance():
    zero = torch.zeros(8, 5, dtype=torch.float64)
    for rule in ("ledoit_wolf", "oas", "mp_edge"):
        assert auto_ridge_ratio(rule, *centered_and_gram(zero)) is None
    one_row = torch.randn(1, 5, dtype=torch.float64)
    assert auto_ridge_ratio("ledoit_wolf", *centered_and_gram(one_row)) is None
    assert ridge_ratio(0.5) == pytest.approx(1.0) and ridge_ratio(1.0) < float("inf")
    assert mp_edge_ratio(100, 100) == pytest.approx(4.0)


@pytest.mark.parametrize("branch", ["homogeneous", "heterogeneous"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_relative_eps_is_a_per_task_ridge_of_rho_times_the_mean_eigenvalue(branch, shape):
    scales = HOMOGENEOUS_SCALES if branch == "homogeneous" else HETEROGENEOUS_SCALES
    tvs = task_vectors(shape, scales)
    rho = 0.05
    expected = ace_reference([t.numpy() for t in tvs], eps=[rho * mean_eigenvalue(t)
                                                             for t in tvs])
    merged = ace(tvs, eps=rho, eps_mode="relative")
    np.testing.assert_allclose(merged.numpy(), expected, rtol=0, atol=1e-9 * abs(expected).max())


@pytest.mark.parametrize("rule", ["ledoit_wolf", "oas", "mp_edge"])
@pytest.mark.parametrize("branch", ["homogeneous", "heterogeneous"])
def test_auto_eps_uses_each_tasks_own_estimate(rule, branch):
    scales = HOMOGENEOUS_SCALES if branch == "homogeneous" else HETEROGENEOUS_SCALES
    tvs = task_vectors((30, 20), scales, seed=3)
    ridges = []
    for t in tvs:  # the oracle: scikit-learn's intensities on the same rows
        rows = t.numpy()
        if rule == "mp_edge":
            rho = (1 + np.sqrt(20 / 30)) ** 2
        else:
            delta = (ledoit_wolf(rows) if rule == "ledoit_wolf" else oas(rows))[1]
            rho = delta / (1 - delta)
        ridges.append(rho * mean_eigenvalue(t))
    expected = ace_reference([t.numpy() for t in tvs], eps=ridges)
    merged = ace(tvs, eps="auto", auto_rule=rule)
    np.testing.assert_allclose(merged.numpy(), expected, rtol=0, atol=1e-9 * abs(expected).max())


@pytest.mark.parametrize("eps", [{"eps": "auto"}, {"eps": 0.1, "eps_mode": "relative"}])
def test_scale_free_options_make_the_merge_scale_equivariant(eps):
    """Multiplying every task vector by c multiplies the merge by c (homogeneous branch, and
    the heterogeneous one without the prior, whose Eq. 13 divides by the energies)."""
    for scales, extra in ((HOMOGENEOUS_SCALES, {}),
                          (HETEROGENEOUS_SCALES, {"collective_prior": False})):
        tvs = task_vectors((30, 20), scales, seed=5)
        params = {**eps, **extra, "heterogeneity": "log_std"}
        merged = ace(tvs, **params)
        for c in (0.1, 50.0):
            scaled = ace([c * t for t in tvs], **params)  # (1e-12 floors aside)
            assert (scaled - c * merged).abs().max() <= 1e-8 * scaled.abs().max()


def test_the_papers_absolute_eps_is_not_scale_equivariant():
    tvs = task_vectors((30, 20), HOMOGENEOUS_SCALES, seed=5)
    merged, scaled = ace(tvs, eps=1e-2), ace([1e-2 * t for t in tvs], eps=1e-2)
    assert (scaled - 1e-2 * merged).abs().max() > 1e-3 * scaled.abs().max()


def test_huge_relative_eps_gives_the_trace_weighted_mean():
    """rho -> inf: R_t ~ rho mu_t I, so W -> sum_t mu_t C_t / sum_t mu_t (App. B.1 analogue)."""
    tvs = task_vectors((30, 20), HOMOGENEOUS_SCALES, seed=2)
    mus = [mean_eigenvalue(t) for t in tvs]
    centered = [centered_and_gram(t)[0] for t in tvs]
    expected = sum(m * c for m, c in zip(mus, centered, strict=True)) / sum(mus)
    merged = ace(tvs, eps=1e9, eps_mode="relative", collective_prior=False)
    torch.testing.assert_close(merged, expected, rtol=1e-6, atol=1e-9)


def test_auto_falls_back_on_a_zero_task_vector_and_says_so_once(caplog):
    from acemerge.methods import ace as ace_module

    ace_module._WARNED.clear()
    tvs = task_vectors((16, 8), HOMOGENEOUS_SCALES)
    tvs[1] = torch.zeros_like(tvs[1])
    with caplog.at_level(logging.WARNING, logger="acemerge"):
        first = ace(tvs, eps="auto")
        ace(tvs, eps="auto")
    assert torch.isfinite(first).all()
    messages = [r.getMessage() for r in caplog.records if "eps=auto" in r.getMessage()]
    assert len(messages) == 1 and "eps 1e-05 used" in messages[0]
    # the fallback is the paper's eps: the zero task gets ridge 1e-5, the others their own
    ridges = [ridge_ratio(ledoit_wolf(t.numpy())[1]) * mean_eigenvalue(t) if i != 1 else 1e-5
              for i, t in enumerate(tvs)]
    np.testing.assert_allclose(first.numpy(), ace_reference([t.numpy() for t in tvs],
                                                            eps=ridges), atol=1e-10)


def test_auto_on_a_single_output_row_is_finite():
    tvs = [torch.randn(1, 12, dtype=torch.float64) * s for s in (1.0, 2.0, 0.5)]
    assert torch.isfinite(ace(tvs, eps="auto")).all()


@pytest.mark.parametrize(
    ("config", "eps"),
    [({"model_type": "gpt2", "n_layer": 12}, 4e-2),
     ({"model_type": "roberta", "num_hidden_layers": 12, "hidden_size": 768}, 2e-4),
     ({"model_type": "roberta", "num_hidden_layers": 24, "hidden_size": 1024}, 1e-5),
     ({"model_type": "llama"}, 1e-5), (None, 1e-5)],
)
def test_paper_eps_is_resolved_from_the_model_config(config, eps):
    assert paper_eps(config) == eps
    resolved = resolve_for_model(AceParams(eps="paper"), config)
    assert resolved.eps == eps
    assert resolve_for_model(AceParams(eps="auto"), config).eps_fallback == eps


def test_paper_eps_through_merge_state_dicts_equals_the_number():
    gen = torch.Generator().manual_seed(0)
    base = {"h.0.weight": torch.randn(6, 4, generator=gen)}
    experts = [{"h.0.weight": base["h.0.weight"] + torch.randn(6, 4, generator=gen) * s}
               for s in (0.1, 0.2, 0.3)]
    config = {"model_type": "roberta", "num_hidden_layers": 12, "hidden_size": 768}
    by_name = merge_state_dicts(base, experts, eps="paper", config=config)
    by_value = merge_state_dicts(base, experts, eps=2e-4, config=config)
    assert torch.equal(by_name["h.0.weight"], by_value["h.0.weight"])


def test_paper_eps_without_resolution_is_a_clear_error():
    from acemerge.methods.ace import ace_matrix

    with pytest.raises(AceMergeError, match="eps=paper"):
        ace_matrix(task_vectors((6, 4), HOMOGENEOUS_SCALES), AceParams(eps="paper"))


def test_log_std_is_scale_free_while_gamma_explodes_near_unit_energies():
    tvs = task_vectors((20, 10), (1.0, 1.1, 0.9))
    norm = sum(t.pow(2).sum() for t in tvs) / 3
    near_one = [t / norm.sqrt() for t in tvs]  # energies ~1: ln e ~ 0
    paper, free = heterogeneity(near_one), heterogeneity(near_one, statistic="log_std")
    assert paper.gamma > 10 and paper.heterogeneous  # the paper's statistic flips
    assert not free.heterogeneous and free.log_std < 0.3
    for c in (1e-3, 1e3):
        again = heterogeneity([c * t for t in near_one], statistic="log_std")
        assert again.log_std == pytest.approx(free.log_std, rel=1e-5)  # 1e-12 log floor


@pytest.mark.parametrize("bad", [-1, "-1", "nope", "Auto"])
def test_bad_eps_values_are_refused(bad):
    with pytest.raises(AceMergeError, match="'eps'"):
        ace.validate({"eps": bad})


def test_model_card_records_resolved_eps(gpt2_family, tmp_path):
    from acemerge.cli import main

    base, experts = gpt2_family
    runs = {"paper": ["--set", "eps=paper"],
            "auto": ["--set", "eps=auto", "--set", "auto_rule=oas"]}
    for name, flags in runs.items():
        out = tmp_path / name
        args = ["merge", "--base", str(base), "--out", str(out), "-q", *flags]
        assert main(args + [a for e in experts for a in ("--expert", str(e))]) == 0
        card = (out / "README.md").read_text()
        assert "- eps_fallback: 0.04" in card if name == "auto" else "- eps: 0.04" in card
        if name == "auto":
            assert "- eps: auto" in card and "- auto_rule: oas" in card
