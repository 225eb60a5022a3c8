"""The offline text benchmark: docstring tasks, tiny gpt2-text and minilm suites."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest
import torch

import acemerge
from acemerge.bench import text_tasks
from acemerge.bench.gpt2_text import Gpt2TextSuite, sequence_classifier
from acemerge.bench.text_suite import BuiltTextSuite

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------- tasks


def test_corpus_is_deterministic() -> None:
    assert text_tasks.load_units.__wrapped__() == text_tasks.load_units()
    units = text_tasks.load_units()
    assert len(units) > 2000
    assert {u.topic for u in units} == set(range(len(text_tasks.TOPICS)))


def test_tasks_are_deterministic_balanced_and_split() -> None:
    tasks = text_tasks.build_tasks(seed=0)
    assert [t.name for t in tasks] == list(text_tasks.TASK_NAMES)
    assert len(tasks) >= 7
    assert any(t.is_pair for t in tasks) and any(not t.is_pair for t in tasks)
    again = text_tasks.build_task("order", seed=0)
    assert again.splits == tasks[text_tasks.TASK_NAMES.index("order")].splits
    for task in tasks:
        for split, examples in task.splits.items():
            counts = Counter(e.label for e in examples)
            assert sorted(counts) == list(range(task.n_classes)), (task.name, split)
            assert len(set(counts.values())) == 1, (task.name, split, counts)
            assert len(examples) >= 100
        train = {(e.text, e.pair) for e in task.splits["train"]}
        held_out = {(e.text, e.pair) for s in ("val", "test") for e in task.splits[s]}
        assert not train & held_out, task.name


def test_seed_changes_the_split() -> None:
    first = text_tasks.build_task("topic", seed=0, sizes=text_tasks.TINY_SIZES)
    second = text_tasks.build_task("topic", seed=1, sizes=text_tasks.TINY_SIZES)
    assert first.splits["test"] != second.splits["test"]


# --------------------------------------------------------------------------- gpt2-text


@pytest.fixture(scope="module")
def gpt2_suite(tmp_path_factory: pytest.TempPathFactory) -> BuiltTextSuite:
    cache = tmp_path_factory.mktemp("bench-cache")
    return Gpt2TextSuite().build(cache, seed=0, tiny=True, progress=False)


def _check_suite(suite: BuiltTextSuite, margin: float) -> None:
    base = suite.base_state_dict()
    experts = suite.expert_state_dicts()
    assert len(experts) == len(suite.tasks) >= 3
    for task, expert in enumerate(experts):
        expert_acc = suite.evaluate(expert, task, "test")
        base_acc = suite.evaluate(base, task, "test")
        assert expert_acc > base_acc + margin, (suite.tasks[task].name, expert_acc, base_acc)
        assert expert_acc == pytest.approx(suite.info["results"][task]["expert_test"])
    merged = acemerge.merge_state_dicts(base, experts, method="ace", config=suite.config())
    assert merged.keys() == base.keys()
    assert all(torch.isfinite(t).all() for t in merged.values() if t.is_floating_point())
    scores = suite.evaluate_all(merged, "val")
    assert all(0.0 <= s <= 1.0 and math.isfinite(s) for s in scores)


def test_gpt2_tiny_experts_beat_base_and_merge(gpt2_suite: BuiltTextSuite) -> None:
    assert not gpt2_suite.from_cache
    _check_suite(gpt2_suite, margin=0.15)


def test_gpt2_second_build_uses_cache(gpt2_suite: BuiltTextSuite) -> None:
    again = Gpt2TextSuite().build(gpt2_suite.folder.parent, seed=0, tiny=True,
                                  progress=False)
    assert again.from_cache and again.folder == gpt2_suite.folder
    assert not list(gpt2_suite.folder.parent.glob(".*tmp*"))


def test_gpt2_folders_are_hf_models(gpt2_suite: BuiltTextSuite) -> None:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gpt2_suite.base_dir)
    ids = tokenizer("Return the value.", "Second sentence.")["input_ids"]
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.sep_token_id in ids
    model = AutoModel.from_pretrained(gpt2_suite.expert_dirs[0])
    assert type(model).__name__ == "GPT2Model"
    assert gpt2_suite.config()["model_type"] == "gpt2"


def test_gpt2_heads_match_sequence_classifier(gpt2_suite: BuiltTextSuite) -> None:
    expert = gpt2_suite.expert_state_dicts()[0]
    batch = next(gpt2_suite.encoded(0, "val").in_order(16))
    batch.pop("labels")
    with torch.no_grad():
        ours = gpt2_suite.classifier(expert, 0)(**batch)
        theirs = sequence_classifier(gpt2_suite, expert, 0)(**batch).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_gpt2_statistics_match_encoder_names(gpt2_suite: BuiltTextSuite) -> None:
    stats = gpt2_suite.statistics(["grams", "fishers"], gram_examples=64, fisher_examples=8)
    base = gpt2_suite.base_state_dict()
    name = "h.0.attn.c_attn.weight"
    gram = stats.get("grams", name, 1)
    assert gram.shape == (base[name].shape[0],) * 2  # Conv1D: stored (d_in, d_out)
    assert stats.get("fishers", name, 2).shape == base[name].shape
    assert len(stats.per_task) == len(gpt2_suite.tasks)
    again = gpt2_suite.statistics(["fishers", "grams"], gram_examples=64,
                                  fisher_examples=8)  # from disk
    torch.testing.assert_close(again.get("grams", name, 1), gram)


def test_gpt2_benchmark_rows(gpt2_suite: BuiltTextSuite) -> None:
    from acemerge.bench.runner import run_benchmark

    result = run_benchmark(gpt2_suite, ["ace", "task_arithmetic", "regmean"], tune=True)
    labels = [row.label for row in result.rows]
    assert labels == ["base (zero-shot)", "individual experts", "ace", "task_arithmetic",
                      "task_arithmetic (tuned)", "regmean"]
    experts = result.rows[1]
    assert experts.accuracy == pytest.approx(
        [r["expert_test"] for r in gpt2_suite.info["results"]])
    for row in result.rows[2:]:
        assert all(0.0 <= a <= 1.0 for a in row.accuracy), row.label
        assert row.mean_accuracy > result.rows[0].mean_accuracy - 0.05, row.label


# ------------------------------------------------------------------------------ minilm


def test_minilm_tiny(tmp_path: Path) -> None:
    from acemerge.bench.minilm import MiniLMSuite

    suite = MiniLMSuite().build(tmp_path, tiny=True, progress=False)
    _check_suite(suite, margin=0.05)
    assert suite.config()["model_type"] == "bert"
    assert MiniLMSuite().build(tmp_path, tiny=True, progress=False).from_cache
