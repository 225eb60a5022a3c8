"""An output folder that is, contains or lies inside an input is refused, whatever the flags."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

import acemerge
from acemerge.api import merge_from_config
from acemerge.cli import main
from acemerge.config import build_config
from acemerge.errors import AceMergeError
from tests.test_cli import merge_args


def snapshot(root: Path) -> dict[Path, bytes]:
    """Every file under ``root`` with its bytes."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture()
def models(gpt2_family, tmp_path) -> tuple[Path, list[Path]]:
    """A private copy of the tiny GPT-2 family."""
    base, experts = gpt2_family
    root = tmp_path / "models"
    shutil.copytree(base.parent, root)
    return root / "base", [root / e.name for e in experts]


def _out_cases(base: Path, experts: list[Path]) -> dict[str, tuple[Path, str]]:
    link = base.parent.parent / "link-to-base"
    link.symlink_to(base, target_is_directory=True)
    return {
        "the base": (base, "is the input"),
        "an expert": (experts[1], "is the input"),
        "inside the base": (base / "merged", "lies inside the input"),
        "the folder holding every input": (base.parent, "contains the input"),
        "a symlink to the base": (link, "is the input"),
        "the base via ..": (experts[0] / ".." / "base", "is the input"),
    }


@pytest.mark.parametrize("case", ["the base", "an expert", "inside the base",
                                  "the folder holding every input", "a symlink to the base",
                                  "the base via .."])
@pytest.mark.parametrize("overwrite", [False, True])
def test_output_overlapping_an_input_is_refused(case, overwrite, models, capsys):
    base, experts = models
    out, fragment = _out_cases(base, experts)[case]
    before = snapshot(base.parent)
    code = main(merge_args(base, experts, out) + (["--overwrite"] if overwrite else []))
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("acemerge: error:") and fragment in lines[0], lines
    assert snapshot(base.parent) == before  # nothing deleted, nothing added (no staging)


def test_single_file_inputs_are_protected(models, tmp_path):
    base, experts = models
    files = [e / "model.safetensors" for e in experts]
    with pytest.raises(AceMergeError, match="contains the input"):
        acemerge.merge(base, files, experts[0], overwrite=True)
    assert all(f.is_file() for f in files)


def test_config_file_and_statistics_are_inputs(models, tmp_path, capsys):
    base, experts = models
    folder = tmp_path / "configs"
    folder.mkdir()
    config = folder / "merge.yaml"
    config.write_text(yaml.safe_dump({"base_model": str(base),
                                      "models": [str(e) for e in experts]}))
    code = main(["merge", "--config", str(config), "--out", str(folder), "--overwrite", "-q"])
    assert code == 2 and "contains the input" in capsys.readouterr().err
    assert config.is_file()
    stats = tmp_path / "stats"
    stats.mkdir()
    files = [stats / f"s{i}.pt" for i in range(len(experts))]
    for f in files:
        f.write_bytes(b"x")
    with pytest.raises(AceMergeError, match="contains the input"):
        cfg = build_config(merge_method="regmean", base_model=str(base),
                           models=[str(e) for e in experts], statistics=[str(f) for f in files])
        merge_from_config(cfg, stats, overwrite=True)
    assert all(f.read_bytes() == b"x" for f in files)


def test_a_sibling_output_is_fine(models):
    base, experts = models
    out = base.parent / "merged"  # beside the inputs, not inside one
    result = acemerge.merge(base, experts, out, method="average")
    assert (result.out / "model.safetensors").is_file()
