"""The command line: happy paths through a subprocess, and every bad input of the issue."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from acemerge.cli import main


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "acemerge.cli", *args],
                          capture_output=True, text=True, timeout=300)


def merge_args(base, experts, out) -> list[str]:
    args = ["merge", "--base", str(base), "--out", str(out), "-q"]
    for expert in experts:
        args += ["--expert", str(expert)]
    return args


def assert_clean_failure(result_code: int, stderr: str, out: Path, fragment: str) -> None:
    """Non-zero exit, one line naming the problem, no traceback, nothing left behind."""
    assert result_code != 0
    lines = [line for line in stderr.strip().splitlines() if line]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("acemerge: error:"), stderr
    assert fragment in lines[0], stderr
    assert "Traceback" not in stderr
    assert not out.exists()
    assert not list(out.parent.glob(f".{out.name}.partial-*"))


def test_merge_subprocess_writes_loadable_folder(gpt2_family, tmp_path):
    base, experts = gpt2_family
    result = run_cli(*merge_args(base, experts, tmp_path / "out"), "--set", "eps=gpt2",
                     "--scale", "0.8")
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "out" / "acemerge_config.yaml").read_text())
    assert saved["parameters"] == {"eps": "gpt2"} and saved["scale"] == 0.8
    assert (tmp_path / "out" / "config.json").is_file()


def test_dry_run_prints_every_parameter_with_its_treatment(gpt2_family, tmp_path):
    base, experts = gpt2_family
    result = run_cli(*merge_args(base, experts, tmp_path / "out"), "--dry-run")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    c_attn = next(line for line in lines if "h.0.attn.c_attn.weight" in line)
    assert "32x96" in c_attn and "ace" in c_attn and "Conv1D, transposed" in c_attn
    assert "keep base" in next(line for line in lines if line.startswith("score.weight"))
    assert "mean" in next(line for line in lines if "ln_f.bias" in line)
    assert not (tmp_path / "out").exists()


def test_methods_lists_parameters_and_paper():
    result = run_cli("methods")
    assert result.returncode == 0
    assert "2603.02945" in result.stdout and "k_frac=0.3" in result.stdout


def test_config_file_merge(gpt2_family, tmp_path, capsys):
    base, experts = gpt2_family
    config = {"merge_method": "ace", "base_model": str(base),
              "models": [{"model": str(e)} for e in experts],
              "parameters": {"eps": "1e-4", "k_frac": 0.2}, "dtype": "float16"}
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    assert main(["merge", "--config", str(tmp_path / "merge.yaml"), "--out",
                 str(tmp_path / "out"), "-q"]) == 0
    tensors = load_file(tmp_path / "out" / "model.safetensors")
    assert tensors["transformer.h.0.mlp.c_fc.weight"].dtype == torch.float16


@pytest.fixture()
def workspace(gpt2_family, tmp_path):
    """A copy of the tiny GPT-2 family that tests may break."""
    base, experts = gpt2_family
    shutil.copytree(base.parent, tmp_path / "models")
    root = tmp_path / "models"
    return root / "base", [root / e.name for e in experts], tmp_path / "merged"


def write_modified(expert: Path, change) -> None:
    tensors = load_file(expert / "model.safetensors")
    change(tensors)
    save_file(tensors, expert / "model.safetensors", metadata={"format": "pt"})


def break_truncate(base, experts):
    path = experts[1] / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return experts, "not a valid safetensors file"


def break_garbage(base, experts):
    (experts[1] / "model.safetensors").write_bytes(b"\x00\x01garbage" * 100)
    return experts, "not a valid safetensors file"


def break_not_checkpoint(base, experts):
    notes = base.parent / "notes.txt"
    notes.write_text("hello")
    return [experts[0], notes], "not a checkpoint"


def break_missing_param(base, experts):
    write_modified(experts[1], lambda t: t.pop("transformer.h.0.ln_1.bias"))
    return experts, "missing parameter 'transformer.h.0.ln_1.bias'"


def break_extra_param(base, experts):
    write_modified(experts[1], lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
    return experts, "extra parameter 'extra.weight'"


def break_shape(base, experts):
    write_modified(experts[2], lambda t: t.__setitem__("transformer.h.1.mlp.c_fc.weight",
                                                       torch.zeros(32, 100)))
    return experts, "transformer.h.1.mlp.c_fc.weight' has shape"


def break_nan(base, experts):
    def poison(t):
        t["transformer.h.1.attn.c_proj.weight"][0, 0] = float("nan")
    write_modified(experts[0], poison)
    return experts, "'transformer.h.1.attn.c_proj.weight' contains NaN"


def break_inf_in_base(base, experts):
    tensors = load_file(base / "model.safetensors")
    tensors["transformer.ln_f.weight"][3] = float("inf")
    save_file(tensors, base / "model.safetensors", metadata={"format": "pt"})
    return experts, "contains NaN or Inf"


def break_missing_path(base, experts):
    return [experts[0], base.parent / "nope"], "no such file or folder"


def break_one_expert(base, experts):
    return experts[:1], "at least two experts"


BAD_INPUTS = {
    "truncated": break_truncate, "garbage": break_garbage, "not-checkpoint": break_not_checkpoint,
    "missing-param": break_missing_param, "extra-param": break_extra_param,
    "shape": break_shape, "nan": break_nan, "inf-base": break_inf_in_base,
    "missing-path": break_missing_path, "one-expert": break_one_expert,
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_checkpoints_fail_cleanly(case, workspace, capsys):
    base, experts, out = workspace
    experts, fragment = BAD_INPUTS[case](base, experts)
    code = main(merge_args(base, experts, out))
    assert_clean_failure(code, capsys.readouterr().err, out, fragment)


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [(["--method", "nope"], "unknown method 'nope'"),
     (["--set", "rank=4"], "unknown parameter 'rank'"),
     (["--set", "k_frac=0"], "'k_frac'"), (["--set", "k_frac=1.5"], "'k_frac'"),
     (["--set", "eps=-1"], "'eps'"), (["--set", "tau=-0.5"], "'tau'"),
     (["--set", "oops"], "key=value"), (["--exclude", "("], "invalid exclude pattern"),
     (["--dtype", "int3"], "dtype"), (["--device", "cuda:7"], "device")],
)
def test_bad_options_fail_cleanly(extra, fragment, workspace, capsys):
    base, experts, out = workspace
    code = main(merge_args(base, experts, out) + extra)
    assert_clean_failure(code, capsys.readouterr().err, out, fragment)


def test_non_empty_output_is_refused_unless_overwrite(workspace, capsys):
    base, experts, out = workspace
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert main(merge_args(base, experts, out)) == 2
    assert "not empty" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"
    assert main(merge_args(base, experts, out) + ["--overwrite"]) == 0
    assert (out / "model.safetensors").is_file() and not (out / "keep.txt").exists()


def test_inputs_are_never_modified(workspace):
    base, experts, out = workspace
    before = {p: p.read_bytes() for p in base.parent.rglob("*") if p.is_file()}
    assert main(merge_args(base, experts, out)) == 0
    assert before == {p: p.read_bytes() for p in base.parent.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("config", "fragment"),
    [({"merge_method": "ace", "models": ["a", "b"]}, "missing config field 'base_model'"),
     ({"base_model": "x", "models": ["a", "b"], "weights": [1]}, "unknown config field"),
     ({"base_model": "x", "models": ["a"]}, "at least two experts"),
     ({"base_model": "x", "models": [{"model": "a", "extra": 1}, "b"]},
      "unknown config field 'models.0.extra'")],
)
def test_bad_config_files_fail_cleanly(config, fragment, tmp_path, capsys):
    (tmp_path / "merge.yaml").write_text(yaml.safe_dump(config))
    code = main(["merge", "--config", str(tmp_path / "merge.yaml"), "--out",
                 str(tmp_path / "out")])
    assert_clean_failure(code, capsys.readouterr().err, tmp_path / "out", fragment)


@pytest.mark.parametrize("case", ["truncated", "nan"])
def test_bad_input_in_a_real_process_has_no_traceback(case, workspace):
    base, experts, out = workspace
    experts, fragment = BAD_INPUTS[case](base, experts)
    result = run_cli(*merge_args(base, experts, out))
    assert_clean_failure(result.returncode, result.stderr, out, fragment)
