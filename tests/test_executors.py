"""The executor layer and the local executor: reading, merging and writing overlapped give
the same bytes as the serial engine, hold at most two parameters' inputs, and errors raised
in a thread end the merge with the one-line error and nothing written."""

from __future__ import annotations

import shutil
import sys
import threading
import time
import weakref

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from acemerge.cli import main
from acemerge.config import config_from_mapping
from acemerge.engine import merge_stream
from acemerge.executors import local
from acemerge.executors.base import submitted_in_order, work_units
from acemerge.executors.local import LocalExecutor
from acemerge.io.readers import StateDictCheckpoint
from acemerge.methods import get
from acemerge.plan import build_plan
from tests.merge_cases import build_models, case_args, folder_bytes
from tests.test_cli import assert_clean_failure

CASES = ["gpt2-ace-conv1d", "gpt2-ties-model-trim", "gpt2-bf16-sharded", "llama-tsv",
         "llama-lora-expert-ace", "llama-lora-experts-ties", "llama-mergekit-yaml",
         "llama-out-lora"]


@pytest.fixture(scope="module")
def models(gpt2_family, tmp_path_factory):
    base, experts = gpt2_family
    return build_models(tmp_path_factory.mktemp("cases"), base, experts)


def cli_merge(args: list[str], out) -> int:
    return main(["merge", *args, "--out", str(out), "-q"])


@pytest.mark.parametrize("case", CASES)
def test_overlap_gives_the_serial_engines_bytes(case, models, tmp_path):
    args = case_args(models)[case]
    assert cli_merge([*args, "--overlap", "on"], tmp_path / "overlapped") == 0
    assert cli_merge([*args, "--overlap", "off"], tmp_path / "serial") == 0
    overlapped, serial = folder_bytes(tmp_path / "overlapped"), folder_bytes(tmp_path / "serial")
    assert overlapped.keys() == serial.keys()
    assert any(name.endswith(".safetensors") for name in serial)
    for name in serial:
        assert overlapped[name] == serial[name], name


def test_auto_overlap_needs_a_free_core_or_cuda():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(local.available_cores())
        assert not LocalExecutor().overlaps(torch.device("cpu"))
        assert LocalExecutor().overlaps(torch.device("cuda"))
        if local.available_cores() > 1:
            torch.set_num_threads(local.available_cores() - 1)
            assert LocalExecutor().overlaps(torch.device("cpu"))
        assert LocalExecutor(overlap=True).overlaps(torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize(("text", "expected"), [("off", "off"), ("on", "on"), ("auto", "auto"),
                                              ("false", "off")])
def test_overlap_reads_from_yaml(text, expected, tmp_path):
    data = yaml.safe_load(f"base_model: {tmp_path}\nmodels: [{{model: a}}, {{model: b}}]\n"
                          f"overlap: {text}\n")
    cfg = config_from_mapping(data, tmp_path / "merge.yaml")
    assert cfg.overlap == expected
    assert "\noverlap:" not in cfg.to_yaml()  # how a merge runs, not what it computes


def test_overlap_is_an_option_of_the_local_executor_only(models, tmp_path, capsys):
    args = case_args(models)["gpt2-ace-conv1d"]
    assert cli_merge([*args, "--executor", "ray", "--overlap", "off"], tmp_path / "o") == 2
    assert "overlap applies only to executor 'local'" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_reader_thread_error_is_one_line_and_leaves_nothing(models, tmp_path, capsys):
    bad = tmp_path / "bad-expert"
    shutil.copytree(models["gpt2-e1"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "transformer.h.1.mlp.c_proj.weight"  # late in the plan: read by the thread
    tensors[name][0, 0] = float("nan")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code = cli_merge(["--base", str(models["gpt2"]), "--expert", str(models["gpt2-e0"]),
                      "--expert", str(bad)], out)
    assert_clean_failure(code, capsys.readouterr().err, out,
                         f"{bad}: parameter '{name}' contains NaN or Inf")
    assert code == 2


def test_a_merge_thread_error_is_one_line_and_leaves_nothing(models, tmp_path, capsys):
    doc = yaml.safe_load(models["mergekit.yaml"].read_text())
    doc["models"][1]["parameters"]["density"][0]["value"] = "half"  # only mlp tensors
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(doc))
    out = tmp_path / "out"
    code = main(["merge", str(config), str(out), "-q"])
    assert_clean_failure(code, capsys.readouterr().err, out, "(tensor model.layers.0.mlp.")
    assert code == 2


class CountingBase(StateDictCheckpoint):
    """Counts how many of the tensors it handed out are alive at once."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__(tensors, "base")
        self.alive = self.peak = 0
        self.lock = threading.Lock()

    def _load(self, name: str) -> torch.Tensor:
        tensor = self.tensors[name].clone()
        with self.lock:
            self.alive += 1
            self.peak = max(self.peak, self.alive)
        weakref.finalize(tensor, self._release)
        return tensor

    def _release(self) -> None:
        with self.lock:
            self.alive -= 1


def counting_family(count: int = 12) -> tuple[CountingBase, list[StateDictCheckpoint], object]:
    gen = torch.Generator().manual_seed(0)
    params = {f"layer{i}.weight": torch.randn(16, 8, generator=gen) for i in range(count)}
    experts = [StateDictCheckpoint({k: v + 0.1 * torch.randn(v.shape, generator=gen)
                                    for k, v in params.items()}) for _ in range(3)]
    plan = build_plan([(k, tuple(v.shape), v.dtype) for k, v in params.items()])
    return CountingBase(params), experts, plan


@pytest.mark.parametrize(("overlap", "bound"), [(True, 2), (False, 1)])
def test_at_most_two_parameters_are_read_at_once(overlap, bound):
    base, experts, plan = counting_family()
    method = get("ties")
    written = []

    def slow_emit(name: str, tensor: torch.Tensor) -> None:
        time.sleep(0.01)  # a slow writer: the reader and the merger run ahead of it
        written.append(name)

    merge_stream(base, experts, method, method.validate({}), plan, slow_emit,
                 executor=LocalExecutor(overlap=overlap))
    assert written == [e.name for e in plan.entries]
    assert base.peak == bound  # the one merging and the one read ahead


def test_an_error_while_writing_stops_the_threads():
    base, experts, plan = counting_family()
    method = get("average")

    def failing_emit(name: str, tensor: torch.Tensor) -> None:
        if name == "layer3.weight":
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        merge_stream(base, experts, method, method.validate({}), plan, failing_emit)
    assert not [t for t in threading.enumerate() if t.name.startswith("acemerge-")]


def test_work_units_batch_small_parameters_in_order():
    plan = build_plan([("a.weight", (4, 4), torch.float32), ("a.bias", (4,), torch.float32),
                       ("b.weight", (8, 8), torch.float32), ("c.bias", (4,), torch.float32)])
    units = work_units(plan.entries, 20)
    assert [[e.name for e in unit] for unit in units] == [
        ["a.weight", "a.bias"], ["b.weight"], ["c.bias"]]
    assert [e for unit in work_units(plan.entries, 1) for e in unit] == plan.entries


@pytest.mark.parametrize("limit", [1, 2, 5])
def test_submissions_stay_within_the_limit_and_in_order(limit):
    outstanding: list[int] = []
    peak = 0

    def submit(unit: int) -> int:
        nonlocal peak
        outstanding.append(unit)
        peak = max(peak, len(outstanding))
        return unit

    seen = []
    for handle in submitted_in_order(range(10), submit, limit, cancel=outstanding.remove):
        seen.append(handle)
        assert len(outstanding) <= limit
        outstanding.remove(handle)  # done with it
    assert seen == list(range(10)) and peak == limit


def test_closing_early_cancels_what_is_outstanding():
    cancelled = []
    handles = submitted_in_order(range(10), lambda unit: unit, 3, cancel=cancelled.append)
    assert next(handles) == 0
    handles.close()
    assert cancelled == [1, 2]


def test_ray_options_need_the_ray_executor(models, tmp_path, capsys):
    args = ["--base", str(models["gpt2"]), "--expert", str(models["gpt2-e0"]),
            "--expert", str(models["gpt2-e1"])]
    for extra, field in ((["--workers", "2"], "workers"), (["--max-in-flight", "2"],
                         "max_in_flight"), (["--ray-address", "auto"], "ray_address")):
        assert cli_merge([*args, *extra], tmp_path / "out") == 2
        err = capsys.readouterr().err.strip()
        assert err == f"acemerge: error: {field} applies only to executor 'ray' (--executor ray)"
    assert cli_merge([*args, "--executor", "ray", "--workers", "0"], tmp_path / "out") == 2
    assert "'workers'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_without_ray_the_ray_executor_says_how_to_install_it(models, tmp_path, capsys,
                                                              monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails as if not installed
    monkeypatch.delitem(sys.modules, "acemerge.executors.ray_executor", raising=False)
    out = tmp_path / "out"
    code = cli_merge(["--base", str(models["gpt2"]), "--expert", str(models["gpt2-e0"]),
                      "--expert", str(models["gpt2-e1"]), "--executor", "ray"], out)
    assert_clean_failure(code, capsys.readouterr().err, out,
                         "executor 'ray' needs Ray, which is not installed: "
                         "pip install 'acemerge[ray]'")
