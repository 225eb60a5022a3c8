"""The gpt2-lora suite: gpt2-text's base with PEFT LoRA experts, merged through the engine
with and without the methods' low-rank rules."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

from acemerge import methods, work
from acemerge.bench import get_suite, gpt2_lora, gpt2_text
from acemerge.bench.runner import Benchmark, max_relative_difference, run_benchmark
from acemerge.bench.text_suite import BuiltTextSuite
from acemerge.io.adapters import LoraExpert

peft = pytest.importorskip("peft")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> BuiltTextSuite:
    cache = tmp_path_factory.mktemp("lora-cache")
    return get_suite("gpt2-lora").build(cache, seed=0, tiny=True, progress=False)


@pytest.fixture(scope="module")
def bench(suite: BuiltTextSuite) -> Benchmark:
    return Benchmark(suite)


def test_recipe_keeps_gpt2_texts_base_settings() -> None:
    assert gpt2_lora.Gpt2LoraSuite.base_model is gpt2_text.Gpt2TextSuite.base_model
    for lora, text in ((gpt2_lora.TINY, gpt2_text.TINY), (gpt2_lora.FULL, gpt2_text.FULL)):
        changed = [f.name for f in fields(text) if getattr(lora, f.name) != getattr(text, f.name)]
        assert changed == ["lr"]
        assert (lora.rank, lora.alpha) == (8, 16)


def test_tiny_suite_builds_adapters_that_beat_the_base(suite: BuiltTextSuite,
                                                       bench: Benchmark) -> None:
    assert not suite.from_cache and suite.name == "gpt2-lora"
    assert [t.name for t in suite.tasks] == list(gpt2_text.TINY.expert_steps)
    for task, folder in enumerate(suite.expert_dirs):
        config = json.loads((folder / "adapter_config.json").read_text())
        assert (config["r"], config["lora_alpha"], config["fan_in_fan_out"]) == (8, 16, True)
        assert set(config["target_modules"]) == {"c_attn", "c_proj", "c_fc"}
        assert not (folder / "model.safetensors").exists()
        assert (suite.folder / "heads" / f"{suite.tasks[task].name}.safetensors").is_file()
        result = suite.info["results"][task]
        assert result["expert_test"] > result["base_test"] + 0.15, result
        assert bench.expert_accuracy[task] == pytest.approx(result["expert_test"], abs=0.01)
    assert all(isinstance(e, LoraExpert) for e in bench.expert_checkpoints)
    again = get_suite("gpt2-lora").build(suite.folder.parent, seed=0, tiny=True,
                                         progress=False)
    assert again.from_cache and again.folder == suite.folder


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing`:FutureWarning")  # PEFT
def test_adapters_load_in_peft_and_equal_acemerges_task_vectors(suite: BuiltTextSuite) -> None:
    from transformers import GPT2Model

    for task, folder in enumerate(suite.expert_dirs):
        model = peft.PeftModel.from_pretrained(GPT2Model.from_pretrained(suite.base_dir), folder)
        theirs = {k: v.detach() for k, v in model.merge_and_unload().state_dict().items()}
        ours = suite.expert_state_dict(task)
        assert ours.keys() == theirs.keys()
        assert max_relative_difference(ours, theirs, suite.base_state_dict()) < 1e-5
        assert max_relative_difference(ours, theirs) < 1e-6


def test_low_rank_rule_is_used_and_equals_the_dense_rule(bench: Benchmark,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    original = work._merge_low_rank

    def counted(entry, *args, **kwargs):
        calls.append(entry.name)
        return original(entry, *args, **kwargs)

    monkeypatch.setattr(work, "_merge_low_rank", counted)
    low, _ = bench.merge("task_arithmetic", {}, low_rank=True)
    assert "h.0.attn.c_attn.weight" in calls and "h.1.mlp.c_proj.weight" in calls
    calls.clear()
    dense, _ = bench.merge("task_arithmetic", {}, low_rank=False)
    assert not calls
    assert max_relative_difference(low, dense) < 1e-5
    assert max_relative_difference(low, dense, bench.base) < 1e-5


def test_report_has_the_timing_ratio(suite: BuiltTextSuite, tmp_path: Path) -> None:
    from acemerge.bench.report import write_report

    names = ["task_arithmetic", "ties"]
    result = run_benchmark(suite, names, tune=False)
    assert [r.label for r in result.rows][:2] == ["base (zero-shot)", "individual experts"]
    timed = [n for n in names if methods.get(n).low_rank_rule is not None]
    assert [t.method for t in result.timings] == timed and timed
    timing = result.timings[0]
    assert timing.ratio == pytest.approx(timing.dense_seconds / timing.low_rank_seconds)
    assert timing.max_rel_diff < 1e-5 and timing.repeats >= 2
    paths = write_report(result, tmp_path)
    markdown = paths[0].read_text()
    assert "| dense / low-rank |" in markdown and f"| {timing.ratio:.2f} |" in markdown
    saved = json.loads(paths[2].read_text())
    assert saved["timings"][0]["ratio"] == pytest.approx(timing.ratio)
    assert (tmp_path / "results_timing.csv").read_text().count("task_arithmetic") == 1


def test_bench_command_on_the_cached_tiny_suite(suite: BuiltTextSuite,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    from acemerge.cli import main

    args = ["bench", "gpt2-lora", "--tiny", "--cache", str(suite.folder.parent),
            "--methods", "average", "--no-tune", "-q"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "## gpt2-lora" in out and "| average |" in out and "dense / low-rank" in out


@pytest.mark.slow
def test_base_is_gpt2_texts_base(suite: BuiltTextSuite) -> None:
    text = get_suite("gpt2-text").build(suite.folder.parent, seed=0, tiny=True, progress=False)
    ours, theirs = suite.base_state_dict(), text.base_state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert (suite.base_dir / "tokenizer.json").read_text() == \
        (text.base_dir / "tokenizer.json").read_text()


@pytest.mark.slow
def test_every_method_scores_with_tuned_rows_and_timings(suite: BuiltTextSuite) -> None:
    from acemerge.bench.cli import choose_methods

    names = choose_methods(None, data_free=False)
    result = run_benchmark(suite, names, tune=True)
    timed = [n for n in names if methods.get(n).low_rank_rule is not None]
    assert [t.method for t in result.timings] == timed
    assert any(r.label.endswith("(tuned)") for r in result.rows)
    for row in result.rows[2:]:
        assert all(0.0 <= a <= 1.0 for a in row.accuracy), row.label
    for timing in result.timings:
        assert timing.low_rank_seconds > 0 and timing.dense_seconds > 0
