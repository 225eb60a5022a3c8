"""mergekit 0.1.5 as the oracle: the same YAML through mergekit and acemerge, every output
tensor compared, on tiny generated Llama (untied lm_head) and GPT-2 (Conv1D) models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
import yaml
from safetensors.torch import load_file

from acemerge.cli import main
from acemerge.mergekit_schema import is_mergekit_document

mergekit_merge = pytest.importorskip("mergekit.merge")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402

N_EXPERTS = 3


def tiny_llama() -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=64,
        tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(config)


def tiny_gpt2() -> transformers.PreTrainedModel:
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, n_positions=32,
                                     vocab_size=96)
    return transformers.GPT2LMHeadModel(config)


FAMILIES = {"llama": tiny_llama, "gpt2": tiny_gpt2}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory) -> tuple[Path, list[Path]]:
    """A float32 base and three experts with different, dense updates."""
    root = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(0)
    base = FAMILIES[request.param]()
    base.save_pretrained(root / "base")
    experts = []
    for i in range(N_EXPERTS):
        gen = torch.Generator().manual_seed(10 + i)
        model = FAMILIES[request.param]()
        model.load_state_dict({k: v + 0.02 * (i + 1) * torch.randn(v.shape, generator=gen)
                               for k, v in base.state_dict().items()})
        model.save_pretrained(root / f"expert{i}")
        experts.append(root / f"expert{i}")
    return root / "base", experts


def documents(base: Path, experts: list[Path]) -> dict[str, dict]:
    """One mergekit config per method, with per-model parameters, gradients and filters."""
    e = [str(p) for p in experts]
    per_model = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.3},
                 {"weight": 0.7, "density": 0.7}]
    with_base = {"base_model": str(base), "dtype": "float32"}
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": m, "parameters": {"weight": w}}
            for m, w in zip(e, (1.0, 0.5, 2.0), strict=True)]},
        "task_arithmetic": {"merge_method": "task_arithmetic", **with_base, "models": [
            {"model": m, "parameters": {"weight": [0.2, 0.8]}} for m in e],
            "parameters": {"lambda": 0.9}},
        "ties": {"merge_method": "ties", **with_base, "models": [
            {"model": m, "parameters": p} for m, p in zip(e, per_model, strict=True)],
            "parameters": {"normalize": True}},
        "breadcrumbs": {"merge_method": "breadcrumbs", **with_base, "models": [
            {"model": m} for m in e],
            "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.05}},
        "breadcrumbs_ties": {"merge_method": "breadcrumbs_ties", **with_base, "models": [
            {"model": m, "parameters": {"weight": 1.0}} for m in e],
            "parameters": {"density": [{"filter": "mlp", "value": 0.4}, {"value": 0.7}],
                           "gamma": 0.02}},
        "slerp": {"merge_method": "slerp", **with_base, "models": [
            {"model": str(base)}, {"model": e[1]}],
            "parameters": {"t": [{"filter": "attn", "value": [0, 0.5, 1]}, {"value": 0.3}]}},
        "model_stock": {"merge_method": "model_stock", **with_base, "models": [
            {"model": m} for m in e]},
    }


def run_mergekit(doc: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.io.tasks import LoaderCache

    LoaderCache().loaders.clear()  # mergekit caches loaders by path string across runs
    mergekit_merge.run_merge(MergeConfiguration.model_validate(doc), str(out),
                             options=MergeOptions(copy_tokenizer=False, quiet=True))
    return load_file(out / "model.safetensors")


def run_acemerge(doc: dict, folder: Path) -> dict[str, torch.Tensor]:
    config = folder / "merge.yml"
    config.write_text(yaml.safe_dump(doc))
    assert main(["merge", str(config), str(folder / "out"), "-q"]) == 0
    return load_file(folder / "out" / "model.safetensors")


def worst_relative_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()
                     / a[k].double().abs().max().clamp_min(1e-12)) for k in a)


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "breadcrumbs",
                                    "breadcrumbs_ties", "slerp", "model_stock"])
def test_same_yaml_same_tensors(method, family, tmp_path):
    base, experts = family
    doc = documents(base, experts)[method]
    assert is_mergekit_document(doc)
    theirs = run_mergekit(doc, tmp_path / "mergekit")
    ours = run_acemerge({**doc, "merge_method": method.upper()}, tmp_path)  # any case
    assert all(ours[k].dtype == theirs[k].dtype for k in theirs)
    assert worst_relative_difference(theirs, ours) <= 1e-6


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear", "della", "della_linear"])
def test_random_methods_keep_everything_alike_at_density_one(method, family, tmp_path):
    """With density 1 no entry is dropped: the deterministic part equals mergekit's."""
    base, experts = family
    doc = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(m), "parameters": {"weight": w}}
                      for m, w in zip(experts, (1.0, 0.6, 0.3), strict=True)],
           "parameters": {"density": 1.0}}
    assert worst_relative_difference(run_mergekit(doc, tmp_path / "mk"),
                                     run_acemerge(doc, tmp_path)) <= 1e-6


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_methods_agree_in_distribution(method, family, tmp_path):
    """mergekit draws masks from torch's global stream, acemerge from seeded generators:
    masks differ entry by entry but not in law. With two experts at density 0.5 the
    fraction of untouched entries is about (1 - 0.5)^2 = 0.25 in both, and the L1 rescale
    makes the merged task vector's norm alike."""
    base, experts = family
    doc = {"merge_method": method, "base_model": str(base), "dtype": "float32",
           "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in experts[:2]],
           "parameters": {"density": 0.5, "epsilon": 0.2}}
    theirs, ours = run_mergekit(doc, tmp_path / "mk"), run_acemerge(doc, tmp_path)
    base_sd = load_file(base / "model.safetensors")
    for name in [k for k in base_sd if base_sd[k].numel() >= 2048]:
        deltas = [(sd[name] - base_sd[name]).double() for sd in (theirs, ours)]
        untouched = [float((d == 0).double().mean()) for d in deltas]
        assert abs(untouched[0] - 0.25) < 0.05 and abs(untouched[1] - 0.25) < 0.05, name
        norms = [float(d.abs().sum()) for d in deltas]
        assert abs(norms[0] - norms[1]) / norms[0] < 0.05, name
        assert not torch.equal(deltas[0], deltas[1])  # really different draws


def test_acemerge_random_methods_are_reproducible(family, tmp_path):
    base, experts = family
    doc = {"merge_method": "dare_ties", "base_model": str(base),
           "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.4}}
                      for m in experts]}
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = run_acemerge(doc, tmp_path / "a")
    assert worst_relative_difference(first, run_acemerge(doc, tmp_path / "b")) == 0


def test_the_readme_config_runs_unchanged_in_both_tools(family, tmp_path, monkeypatch):
    import re

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```yaml\n(# ties\.yml.*?)```", readme, re.S).group(1)
    base, experts = family
    for name, source in (("base", base), ("expert-a", experts[0]), ("expert-b", experts[1])):
        (tmp_path / name).symlink_to(source, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    doc = yaml.safe_load(block)
    theirs = run_mergekit(doc, tmp_path / "mergekit-out")
    (tmp_path / "merge.yml").write_text(block)
    assert main(["merge", "merge.yml", "acemerge-out", "-q"]) == 0
    ours = load_file(tmp_path / "acemerge-out" / "model.safetensors")
    assert worst_relative_difference(theirs, ours) <= 1e-6
