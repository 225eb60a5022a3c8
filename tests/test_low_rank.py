"""Low-rank rules on factored (LoRA) task vectors equal the dense rules on their products."""

from __future__ import annotations

import pytest
import torch

from acemerge.methods import get
from acemerge.methods.registry import Factored

SHAPES = {"tall": (96, 40), "wide": (40, 96), "square": (64, 64)}


def factors(shape, ranks=(2, 5, 8), scales=(1.0, 1.1, 0.9), seed=0) -> list[Factored]:
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    return [Factored(s * torch.randn(d_out, r, generator=gen, dtype=torch.float64)
                     + 0.5 * torch.randn(1, r, generator=gen, dtype=torch.float64),
                     torch.randn(r, d_in, generator=gen, dtype=torch.float64))
            for r, s in zip(ranks, scales, strict=True)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


BRANCHES = {"homogeneous": (1.0, 1.1, 0.9), "heterogeneous": (0.02, 0.3, 3.0)}
SETTINGS = [{}, {"eps": 1e-2}, {"eps": 1e-5}, {"eps": 0.3, "eps_mode": "relative"},
            {"collective_prior": False}, {"adaptive_normalization": False},
            {"spectral_refinement": False}, {"k_frac": 0.05}, {"ablation": "E1"}]


@pytest.mark.parametrize("branch", BRANCHES)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("setting", SETTINGS, ids=[str(s) for s in SETTINGS])
def test_ace_low_rank_equals_dense(branch, shape, setting):
    ace = get("ace")
    parts = factors(shape, scales=BRANCHES[branch])
    # eps 1e-3: at 1e-5 the square heterogeneous system is so ill-conditioned that the dense
    # and the low-rank solve are each ~1e-6 from a 40-digit evaluation (measured); see below
    params = ace.validate({"eps": 1e-3, **setting})
    low = ace.low_rank_rule(parts, params)
    assert low is not None
    dense = ace.matrix_rule([f.dense() for f in parts], params)
    assert rel(low.dense(), dense) < (1e-5 if params.eps == 1e-5 else 1e-6)
    assert low.left.shape[1] <= 2 * sum(f.left.shape[1] for f in parts)  # stays low-rank


def test_ace_low_rank_with_a_zero_task_and_float32():
    ace = get("ace")
    parts = factors((80, 48), scales=(0.05, 0.5, 2.0))
    parts[1] = Factored(torch.zeros(80, 0, dtype=torch.float64),
                        torch.zeros(0, 48, dtype=torch.float64))
    params = ace.validate({})
    dense = ace.matrix_rule([f.dense() for f in parts], params)
    assert rel(ace.low_rank_rule(parts, params).dense(), dense) < 1e-6
    single = [Factored(f.left.float(), f.right.float()) for f in parts]
    assert rel(ace.low_rank_rule(single, params).dense().double(), dense) < 1e-5


def test_ace_low_rank_declines_what_it_cannot_do_exactly():
    ace = get("ace")
    parts = factors((40, 40))
    for setting in ({"eps": "auto"}, {"eps": 0.0}, {"solver": "inverse"}):
        assert ace.low_rank_rule(parts, ace.validate(setting)) is None


@pytest.mark.parametrize("method", ["task_arithmetic", "average"])
def test_linear_rules_concatenate_factors(method):
    m = get(method)
    parts = factors((30, 20))
    params = m.validate({"weight": [0.5, 1.0, 2.0]} if method == "task_arithmetic" else {})
    low = m.low_rank_rule(parts, params)
    assert rel(low.dense(), m.matrix_rule([f.dense() for f in parts], params)) < 1e-12
    assert low.left.shape[1] == 2 + 5 + 8


from tests.test_lora_output import llama  # noqa: E402,F401  (the adapters fixture)


@pytest.mark.parametrize("method", ["ace", "eigcov", "cart", "task_arithmetic", "average",
                                    "tsv", "iso_c"])
def test_engine_takes_the_low_rank_path_for_adapters(method, llama, monkeypatch):  # noqa: F811
    from acemerge import work
    from acemerge.api import _run, open_inputs
    from acemerge.config import build_config

    base_dir, adapters = llama
    cfg = build_config(merge_method=method, base_model=str(base_dir),
                       models=[str(a) for a in adapters],
                       parameters={"flatten_over": "rank"} if method == "iso_c" else {})
    base, experts = open_inputs(cfg)
    used = []
    original = work._merge_low_rank

    def counting(*args, **kwargs):
        result = original(*args, **kwargs)
        used.append(result is not None)
        return result

    monkeypatch.setattr(work, "_merge_low_rank", counting)
    fast: dict[str, torch.Tensor] = {}
    _run(cfg, base, experts, fast.__setitem__)
    calls = len(used)
    # the dense reference in float64: a float32 dense ACE solve at eps 1e-5 on rank-deficient
    # proxies is ~40% off (measured), the low-rank path's float64 core is not
    dense: dict[str, torch.Tensor] = {}
    _run(cfg.model_copy(update={"compute_dtype": "float64", "low_rank": False}), base,
         experts, dense.__setitem__)
    assert calls and all(used) and len(used) == calls  # low_rank=False: the dense rule only
    worst = max(float((fast[k].double() - dense[k].double()).abs().max()
                      / dense[k].double().abs().max().clamp_min(1e-12)) for k in dense)
    assert worst < 1e-5


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("setting", [{}, {"weighting": "energy"}, {"weighting": "gram"},
                                     {"ridge": 1e-3}], ids=["pinv", "energy", "gram", "ridge"])
def test_eigcov_low_rank_equals_dense(shape, setting):
    eigcov = get("eigcov")
    parts = factors(shape, scales=(0.05, 0.5, 2.0))
    params = eigcov.validate(setting)
    low = eigcov.low_rank_rule(parts, params)
    assert rel(low.dense(), eigcov.matrix_rule([f.dense() for f in parts], params)) < 1e-6


def test_ace_low_rank_equals_dense_on_a_tinyllama_kv_projection():
    """Four rank-16 adapters on a 256 x 2048 layer: the dense solve leaves W_fused's zero
    singular values at ~3e-9 sigma_1 (float64), which the numerical-rank tolerance must
    not count as rank (it did at max(d) * eps: 66% apart; sqrt(eps): 1e-8)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
    from bench_lora_time import adapters

    ace = get("ace")
    parts = [Factored(p.left.double(), p.right.double()) for p in adapters((256, 2048), 4, 16, 1)]
    params = ace.validate({})
    dense = ace.matrix_rule([f.dense() for f in parts], params)
    assert rel(ace.low_rank_rule(parts, params).dense(), dense) < 1e-6


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("setting", [{}, {"rank_fraction": 0.5}, {"rank_fraction": 0.0},
                                     {"rank_fraction": 0.02, "lam_c": 1.0}])
def test_cart_low_rank_equals_dense(shape, setting):
    cart = get("cart")
    parts = factors(shape)
    params = cart.validate(setting)
    low = cart.low_rank_rule(parts, params)
    assert rel(low.dense(), cart.matrix_rule([f.dense() for f in parts], params)) < 1e-6


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("ranks", [(2, 5, 8), (8, 8, 8), (1, 0, 3)], ids=str)
def test_tsv_low_rank_equals_dense(shape, ranks):
    tsv = get("tsv")
    parts = factors(shape, ranks=ranks, scales=(0.05, 0.5, 2.0))
    params = tsv.validate({})
    low = tsv.low_rank_rule(parts, params)
    dense = tsv.matrix_rule([f.dense() for f in parts], params)
    assert rel(low.dense(), dense) < 1e-6
    assert low.left.shape[1] <= sum(ranks)


def test_tsv_rank_cap_keeps_full_rank_results_and_removes_noise():
    tsv = get("tsv")
    gen = torch.Generator().manual_seed(1)
    full = [torch.randn(24, 16, generator=gen, dtype=torch.float64) for _ in range(3)]
    assert torch.equal(tsv(full), tsv(full, rank_cap="paper"))  # k = 5 <= every rank
    parts = factors((64, 48), ranks=(2, 3, 4))
    # the same experts as float32 full models (rounded weights minus a rounded base):
    base = torch.randn(64, 48, generator=gen, dtype=torch.float64)
    rounded = [(base + f.dense()).float() - base.float() for f in parts]  # float32 compute
    exact = tsv([f.dense() for f in parts])
    assert rel(tsv(rounded).double(), exact) < 1e-5
    assert rel(tsv(rounded, rank_cap="paper").double(), exact) > 1e-2  # noise enters
    assert tsv.low_rank_rule(parts, tsv.validate({"rank_cap": "paper"})) is None


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_iso_c_low_rank_equals_dense_when_flattening_the_rank(shape):
    iso_c = get("iso_c")
    parts = factors(shape)
    params = iso_c.validate({"flatten_over": "rank"})
    low = iso_c.low_rank_rule(parts, params)
    assert rel(low.dense(), iso_c.matrix_rule([f.dense() for f in parts], params)) < 1e-6
    assert low.left.shape[1] == 2 + 5 + 8
    assert iso_c.low_rank_rule(parts, iso_c.validate({})) is None  # "all": no low-rank form
