"""mergekit's schema and flags: detection, fields, errors, and mergekit-yaml's CLI habits."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from acemerge.cli import main
from acemerge.mergekit_schema import is_mergekit_document


@pytest.fixture()
def models(gpt2_family, tmp_path) -> tuple[Path, list[Path]]:
    base, experts = gpt2_family
    shutil.copytree(base.parent, tmp_path / "models")
    root = tmp_path / "models"
    return root / "base", [root / e.name for e in experts]


def write(tmp_path: Path, doc: dict) -> Path:
    path = tmp_path / "merge.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def ties_doc(base: Path, experts: list[Path], **extra) -> dict:
    return {"merge_method": "ties", "base_model": str(base),
            "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}}
                       for e in experts], **extra}


def test_detection_of_the_two_schemas():
    acemerge_doc = {"merge_method": "ace", "base_model": "b", "models": ["x", "y"],
                    "parameters": {"eps": "gpt2"}, "dtype": "float32"}
    assert not is_mergekit_document(acemerge_doc)
    assert is_mergekit_document({**acemerge_doc, "out_dtype": "bfloat16"})
    assert is_mergekit_document({"merge_method": "linear", "models": ["x", "y"]})
    assert is_mergekit_document({"merge_method": "ties", "base_model": "b",
                                 "models": [{"model": "b"}, {"model": "x"}]})
    assert is_mergekit_document({"merge_method": "ties", "base_model": "b", "models": ["x"],
                                 "parameters": {"density": [0.2, 0.8]}})


@pytest.mark.parametrize(("extra", "fragment"), [
    ({"slices": [{"sources": []}]}, "mergekit field 'slices' (layer slices) is not supported"),
    ({"modules": {"text": {}}}, "mergekit field 'modules'"),
    ({"tokenizer_source": "union"}, "tokenizer_source 'union' is not supported"),
    ({"chat_template": "chatml"}, "named templates are not supported"),
    ({"oops": 1}, "unknown config field 'oops'"),
])
def test_unsupported_fields_fail_in_one_line(extra, fragment, models, tmp_path, capsys):
    base, experts = models
    doc = {k: v for k, v in ties_doc(base, experts, **extra).items()
           if not (k == "models" and "slices" in extra)}
    code = main(["merge", str(write(tmp_path, doc)), str(tmp_path / "out")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not (tmp_path / "out").exists()


def test_missing_weight_is_an_error_as_in_mergekit(models, tmp_path, capsys):
    base, experts = models
    doc = {"merge_method": "dare_linear", "base_model": str(base),
           "models": [{"model": str(e)} for e in experts]}
    assert main(["merge", str(write(tmp_path, doc)), str(tmp_path / "out"), "-q"]) == 2
    assert "parameter 'weight' is required for model" in capsys.readouterr().err


def test_tokenizer_source_chat_template_name_and_rerun(models, tmp_path):
    base, experts = models
    (experts[1] / "tokenizer_config.json").write_text('{"from": "expert1"}')
    (base / "tokenizer_config.json").write_text('{"from": "base"}')
    doc = ties_doc(base, experts, tokenizer_source=str(experts[1]), name="My merge",
                   chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")
    out = tmp_path / "out"
    assert main(["merge", str(write(tmp_path, doc)), str(out), "-q"]) == 0
    assert (out / "tokenizer_config.json").read_text() == '{"from": "expert1"}'
    assert (out / "chat_template.jinja").read_text().startswith("{% for m")
    assert (out / "README.md").read_text().splitlines()[6] == "# My merge"
    saved = yaml.safe_load((out / "acemerge_config.yaml").read_text())
    assert is_mergekit_document(saved) and Path(saved["base_model"]).is_absolute()
    assert main(["merge", "--config", str(out / "acemerge_config.yaml"), "--out",
                 str(tmp_path / "again"), "-q"]) == 0
    first, again = load_file(out / "model.safetensors"), load_file(
        tmp_path / "again" / "model.safetensors")
    assert all(torch.equal(first[k], again[k]) for k in first)


def test_mergekit_yaml_flags(models, tmp_path, capsys):
    base, experts = models
    config = write(tmp_path, ties_doc(base, experts))
    out = tmp_path / "out"
    flags = ["--out-shard-size", "20K", "--no-copy-tokenizer", "--no-write-model-card",
             "--allow-crimes", "--lazy-unpickle", "--low-cpu-memory", "--trust-remote-code",
             "-v"]
    (base / "tokenizer_config.json").write_text("{}")
    assert main(["merge", str(config), str(out), *flags]) == 0
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    assert not (out / "README.md").exists() and not (out / "tokenizer_config.json").exists()
    err = capsys.readouterr().err
    assert "kept at the base value: nothing (every parameter is merged)" in err
    assert main(["merge", str(config), str(tmp_path / "o2"), "--out", "x"]) == 2
    assert "give the out once" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["merge", str(config), str(tmp_path / "o3"), "--cuda"]) == 2
        assert "not available" in capsys.readouterr().err


def test_random_seed_flag_reaches_random_methods(models, tmp_path):
    base, experts = models
    doc = {"merge_method": "dare_ties", "base_model": str(base),
           "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 0.5}}
                      for e in experts]}
    config = write(tmp_path, doc)
    runs = {}
    for name, seed in (("a", "7"), ("b", "7"), ("c", "8")):
        assert main(["merge", str(config), str(tmp_path / name), "-q", "--random-seed",
                     seed]) == 0
        runs[name] = load_file(tmp_path / name / "model.safetensors")
    key = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(runs["a"][key], runs["b"][key])
    assert not torch.equal(runs["a"][key], runs["c"][key])


def test_acemerge_schema_prints_what_the_plan_keeps(models, tmp_path, capsys):
    base, experts = models
    args = ["merge", "--base", str(base), "--out", str(tmp_path / "out"), "--method",
            "task_arithmetic"]
    assert main(args + [a for e in experts for a in ("--expert", str(e))]) == 0
    err = capsys.readouterr().err
    assert "kept at the base value: score.weight" in err
