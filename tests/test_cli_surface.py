"""The command line's surface: --version, methods NAME, --threads, help, repr, imports."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import acemerge
from acemerge.cli import build_parser, main


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    assert capsys.readouterr().out.strip() == f"acemerge {acemerge.__version__}"


def test_methods_name_shows_one_method(capsys):
    assert main(["methods", "ties"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ties:") and "2306.01708" in out and "ace:" not in out
    assert main(["methods", "from"]) == 0
    assert capsys.readouterr().out.startswith("from (FroM):")
    assert main(["methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_threads_sets_torch_threads(capsys):
    before = torch.get_num_threads()
    try:
        assert main(["--threads", "1", "methods", "ace"]) == 0
        assert torch.get_num_threads() == 1
        assert main(["--threads", "0", "methods"]) == 2
        assert "--threads" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["inspect", "bench", "merge"])
def test_every_option_has_help(command):
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    missing = [a.option_strings or a.dest for a in sub._actions
               if a.help is None and a.dest != "help"]
    assert not missing, missing


def test_merge_result_repr_is_short(gpt2_family, tmp_path):
    base, experts = gpt2_family
    result = acemerge.merge(base, experts, tmp_path / "out", method="average")
    text = repr(result)
    assert len(text) < 200 and "parameters=" in text and "seconds=" in text


def test_bench_cli_imports_first_without_a_circle():
    code = "import acemerge.bench.cli, acemerge.cli; print('ok')"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_saved_config_reruns_from_another_folder(gpt2_family, tmp_path, monkeypatch):
    import shutil

    from safetensors.torch import load_file

    base, experts = gpt2_family
    shutil.copytree(base.parent, tmp_path / "models")
    monkeypatch.chdir(tmp_path)
    args = ["merge", "--base", "models/base", "--out", "first", "-q", "--method", "ties"]
    assert main(args + [a for e in experts for a in ("--expert", f"models/{e.name}")]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["merge", "--config", "../first/acemerge_config.yaml", "--out", "again",
                 "-q"]) == 0
    first = load_file(tmp_path / "first" / "model.safetensors")
    again = load_file(elsewhere / "again" / "model.safetensors")
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_a_bare_hub_id_is_looked_up(tmp_path):
    import os

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(
        [sys.executable, "-m", "acemerge.cli", "merge", "--base", "gpt2", "--expert", "gpt2",
         "--expert", "distilgpt2", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    assert "gpt2: not a local path, and the Hugging Face Hub could not provide it" in \
        result.stderr, result.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "acemerge.cli", "merge", "--base", "./gpt2", "--expert", "a",
         "--expert", "b", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=120)
    assert "./gpt2: no such file or folder" in missing.stderr


def test_gamma_figure_ticks_are_readable():
    from acemerge.inspect import LayerStats, gamma_figure

    rows = [LayerStats(f"l{i}", (4, 4), g, g > 0.3, [1.0, 2.0])
            for i, g in enumerate((0.3, 0.45, 0.6, 0.75, 0.9))]
    fig = gamma_figure(rows, 0.3)
    fig.canvas.draw()
    ax = fig.axes[0]
    low, high = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels()
              if low <= t.get_position()[1] <= high and t.get_text()]
    assert {"0.5"} <= set(labels) and not any("10^" in t or "$" in t for t in labels), labels


def test_ties_whole_model_pass_shows_progress(gpt2_family, tmp_path, capsys):
    base, experts = gpt2_family
    args = ["merge", "--base", str(base), "--out", str(tmp_path / "out"), "--method", "ties"]
    assert main(args + [a for e in experts for a in ("--expert", str(e))]) == 0
    assert "ties: whole-model pass" in capsys.readouterr().err


def test_readme_bolds_the_best_entry_of_each_results_row():
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    table = readme[readme.index("| suite | ACE |"):].split("\n\n")[0].splitlines()[2:]
    assert table
    for line in table:
        cells = [c.strip() for c in line.strip("|").split("|")[1:]]
        values = [float(c.strip("*")) for c in cells]
        bold = [i for i, c in enumerate(cells) if re.fullmatch(r"\*\*[\d.]+\*\*", c)]
        assert bold == [values.index(max(values))], line


def test_methods_say_whether_lora_experts_stay_factored(capsys):
    assert main(["methods", "ace"]) == 0
    assert "LoRA experts: merged in factored (low-rank) form" in capsys.readouterr().out
    assert main(["methods", "iso_c"]) == 0
    assert "factored (low-rank) form (materialized with flatten_over=all" in \
        capsys.readouterr().out
    assert main(["methods", "ties"]) == 0
    assert "materialized one parameter at a time" in capsys.readouterr().out


@pytest.mark.parametrize("preset,expected", [(None, ["PASSIVE", "1000"]),
                                             ("ACTIVE", ["ACTIVE", "unset"])])
def test_openmp_waits_briefly_unless_told_otherwise(preset, expected):
    """acemerge sets OMP_WAIT_POLICY and GOMP_SPINCOUNT before torch loads OpenMP; an
    explicit wait policy wins, and then the spin count is left alone."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    if preset:
        env["OMP_WAIT_POLICY"] = preset
    code = ("import acemerge, os, sys; print(os.environ['OMP_WAIT_POLICY'], "
            "os.environ.get('GOMP_SPINCOUNT', 'unset'), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == [*expected, "True"]
