"""The digits benchmark suite: tiny build, cache reuse, evaluation, statistics, merging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import acemerge
from acemerge.bench.digits import FULL, SPLITS, TINY, DigitsBuilt, DigitsSuite, _complete
from acemerge.errors import AceMergeError


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("digits-cache")


@pytest.fixture(scope="module")
def built(cache_dir: Path) -> DigitsBuilt:
    return DigitsSuite().build(cache_dir, seed=0, tiny=True, progress=False)


def _config(built: DigitsBuilt) -> dict:
    return json.loads((built.base_dir / "config.json").read_text())


def test_tiny_suite_builds(built: DigitsBuilt) -> None:
    assert built.trained and not built.from_cache
    assert len(built.tasks) >= 3
    assert len(built.expert_dirs) == len(built.tasks) == len(built.head_paths)
    for folder in [built.base_dir, *built.expert_dirs]:
        assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert _config(built)["model_type"] == "vit"
    assert len(built.manifest["task_vector_norms"]) == len(built.tasks)


def test_experts_beat_base_on_their_own_task(built: DigitsBuilt) -> None:
    base = built.base_state_dict()
    for task, expert in enumerate(built.expert_state_dicts()):
        expert_acc, base_acc = built.evaluate(expert, task), built.evaluate(base, task)
        assert expert_acc > base_acc + 0.1, (built.tasks[task].name, expert_acc, base_acc)


def test_second_build_loads_from_cache(built: DigitsBuilt, cache_dir: Path) -> None:
    again = DigitsSuite().build(cache_dir, seed=0, tiny=True, progress=False)
    assert not again.trained and again.folder == built.folder
    assert again.manifest == built.manifest
    expert = again.expert_state_dicts()[0]
    assert again.evaluate(expert, 0) == built.evaluate(expert, 0)


def test_incomplete_cache_is_not_reused(built: DigitsBuilt, tmp_path: Path) -> None:
    assert _complete(built.folder) and _complete(built.folder, TINY)
    assert not _complete(built.folder, FULL)  # built with another recipe: stale
    copy = tmp_path / built.folder.name
    copy.mkdir()
    (copy / "manifest.json").write_text((built.folder / "manifest.json").read_text())
    assert not _complete(copy)  # the manifest alone: every listed file must exist


def test_evaluate_gives_accuracies(built: DigitsBuilt) -> None:
    base = built.base_state_dict()
    for split in ("val", "test"):
        scores = built.evaluate_all(base, split)
        assert len(scores) == len(built.tasks)
        assert all(0.0 <= s <= 1.0 for s in scores)
    assert {len(built.inputs(0, s)[1]) for s in SPLITS} == {len(built.data.splits[s])
                                                           for s in SPLITS}
    with pytest.raises(AceMergeError):
        built.evaluate(base, 0, "dev")


def test_ace_merge_is_finite_and_evaluates(built: DigitsBuilt) -> None:
    base = built.base_state_dict()
    merged = acemerge.merge_state_dicts(base, built.expert_state_dicts(), method="ace",
                                        config=_config(built))
    assert merged.keys() == base.keys()
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert all(0.0 <= s <= 1.0 for s in built.evaluate_all(merged, "val"))


def test_statistics_keyed_by_encoder_names(built: DigitsBuilt) -> None:
    stats = built.statistics(["grams", "fishers"], fisher_examples=4)
    base = built.base_state_dict()
    name = "layers.0.attention.q_proj.weight"
    assert name in base
    for task in range(len(built.tasks)):
        d_in = base[name].shape[1]
        assert stats.get("grams", name, task).shape == (d_in, d_in)
        for key, tensor in base.items():
            assert stats.get("fishers", key, task).shape == tensor.shape
    with pytest.raises(AceMergeError):
        built.statistics(["hessians"])


def test_regmean_merge_with_suite_statistics(built: DigitsBuilt) -> None:
    merged = acemerge.merge_state_dicts(
        built.base_state_dict(), built.expert_state_dicts(), method="regmean",
        config=_config(built), statistics=built.statistics(["grams"]))
    assert all(torch.isfinite(t).all() for t in merged.values())
    assert all(0.0 <= s <= 1.0 for s in built.evaluate_all(merged, "val"))


@pytest.mark.slow
def test_full_suite_merge_lies_between_base_and_experts(tmp_path: Path) -> None:
    full = DigitsSuite().build(tmp_path, seed=0, progress=False)
    assert len(full.tasks) >= 8
    base, experts = full.base_state_dict(), full.expert_state_dicts()

    def mean(scores: list[float]) -> float:
        return sum(scores) / len(scores)

    base_acc = mean(full.evaluate_all(base))
    expert_acc = mean([full.evaluate(e, t) for t, e in enumerate(experts)])
    merged = acemerge.merge_state_dicts(base, experts, method="task_arithmetic",
                                        config=full.config())
    merged_acc = mean(full.evaluate_all(merged))
    assert base_acc + 0.05 < merged_acc < expert_acc - 0.1
