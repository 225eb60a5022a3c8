"""Methods inside the engine: whole-model first passes, per-parameter seeds, the CLI."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import acemerge
from acemerge.cli import main
from acemerge.methods import available, get
from acemerge.methods.ties import ties_merge


def family(seed: int = 0, n_experts: int = 3):
    gen = torch.Generator().manual_seed(seed)
    base = {"a.weight": torch.randn(12, 8, generator=gen), "b.weight": torch.randn(12, 8,
            generator=gen), "a.bias": torch.randn(12, generator=gen)}
    experts = [{k: v + (t + 1) * 0.1 * torch.randn(v.shape, generator=gen)
                for k, v in base.items()} for t in range(n_experts)]
    return base, experts


def test_ties_model_trim_equals_trimming_the_concatenated_model():
    base, experts = family()
    merged = acemerge.merge_state_dicts(base, experts, method="ties", k=0.3)
    names = list(base)
    flat = [torch.cat([(e[n] - base[n]).flatten() for n in names]) for e in experts]
    k_th = [tv.abs().sort(descending=True).values[round(0.3 * tv.numel()) - 1] for tv in flat]
    trimmed = torch.stack([torch.where(tv.abs() >= th, tv, 0.0) for tv, th in zip(flat, k_th,
                                                                                 strict=True)])
    expected_flat = ties_merge(list(trimmed), 1.0)
    offset = 0
    for name in names:
        n = base[name].numel()
        expected = base[name] + expected_flat[offset:offset + n].view_as(base[name])
        torch.testing.assert_close(merged[name], expected)
        offset += n


def test_ties_model_trim_differs_from_per_parameter_trim():
    base, experts = family(1)
    by_model = acemerge.merge_state_dicts(base, experts, method="ties", k=0.2)
    by_param = acemerge.merge_state_dicts(base, experts, method="ties", k=0.2, trim="parameter")
    assert any(not torch.equal(by_model[n], by_param[n]) for n in base)


def test_dare_masks_differ_across_same_shaped_tensors_and_repeat_with_the_seed():
    base, experts = family(2)
    first = acemerge.merge_state_dicts(base, experts, method="dare", p=0.5, seed=7)
    again = acemerge.merge_state_dicts(base, experts, method="dare", p=0.5, seed=7)
    other = acemerge.merge_state_dicts(base, experts, method="dare", p=0.5, seed=8)
    assert all(torch.equal(first[n], again[n]) for n in base)
    assert not torch.equal(first["a.weight"], other["a.weight"])
    kept_a = (first["a.weight"] != base["a.weight"])
    kept_b = (first["b.weight"] != base["b.weight"])
    assert not torch.equal(kept_a, kept_b)


DATA_FREE = [m for m in available() if not get(m).needs]


@pytest.mark.parametrize("method", DATA_FREE)
def test_every_data_free_method_runs_through_the_cli(method, gpt2_family, tmp_path):
    base, experts = gpt2_family
    experts = experts[:get(method).max_experts or len(experts)]  # SLERP takes one
    args = ["merge", "--base", str(base), "--method", method, "--out", str(tmp_path / "out"),
            "-q"] + [a for e in experts for a in ("--expert", str(e))]
    if method == "wudi":
        args += ["--set", "iterations=5"]
    assert main(args) == 0
    merged = load_file(tmp_path / "out" / "model.safetensors")
    base_w = load_file(base / "model.safetensors")
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.isfinite(merged[name]).all() and not torch.equal(merged[name], base_w[name])
    torch.testing.assert_close(merged["score.weight"], base_w["score.weight"])


def test_default_scale_is_the_methods():
    base, experts = family(3)
    default = acemerge.merge_state_dicts(base, experts, method="task_arithmetic")
    explicit = acemerge.merge_state_dicts(base, experts, method="task_arithmetic", scale=0.3)
    unit = acemerge.merge_state_dicts(base, experts, method="task_arithmetic", scale=1.0)
    assert all(torch.equal(default[n], explicit[n]) for n in base)
    total = sum(e["a.bias"] - base["a.bias"] for e in experts)
    torch.testing.assert_close(unit["a.bias"], base["a.bias"] + total)


def test_regmean_from_statistics_files_on_the_cli(gpt2_family, tmp_path):
    import transformers

    from acemerge.statistics import collect_tensor_statistics

    base, experts = gpt2_family
    gen = torch.Generator().manual_seed(0)
    pairs = []
    for expert in experts:
        model = transformers.GPT2ForSequenceClassification.from_pretrained(expert)
        batches = [{"input_ids": torch.randint(1, 64, (4, 8), generator=gen)} for _ in range(2)]
        pairs.append((model, batches))
    stats = collect_tensor_statistics(pairs, ("grams",))
    files = [str(p) for p in stats.save(tmp_path / "stats")]
    args = ["merge", "--base", str(base), "--method", "regmean", "-q"]
    args += [a for e in experts for a in ("--expert", str(e))]
    assert main(args + ["--out", str(tmp_path / "no-stats")]) == 2
    assert main(args + ["--statistics", files[0], "--out", str(tmp_path / "one")]) == 2
    with_files = args + [a for f in files for a in ("--statistics", f)]
    assert main(with_files + ["--out", str(tmp_path / "out")]) == 0
    api = acemerge.merge(base, experts, tmp_path / "api", method="regmean", statistics=stats)
    cli_sd = load_file(tmp_path / "out" / "model.safetensors")
    api_sd = load_file(api.out / "model.safetensors")
    assert all(torch.equal(cli_sd[k], api_sd[k]) for k in cli_sd)
