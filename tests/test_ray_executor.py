"""The Ray executor on a local Ray (2 CPUs): every file of its output folder is the local
merge's, byte for byte; a killed worker's task is retried; bad input found by a worker ends
the merge with the one-line error and no output folder."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import acemerge
from acemerge.cli import main
from acemerge.config import build_config
from acemerge.engine import merge_stream
from acemerge.errors import AceMergeError
from acemerge.inputs import InputSource, open_inputs, plan_for
from acemerge.methods import get
from tests.merge_cases import build_models, case_args, folder_bytes
from tests.test_cli import assert_clean_failure

ray = pytest.importorskip("ray")
from acemerge.executors.ray_executor import RayExecutor  # noqa: E402

CASES = ["gpt2-ace-conv1d", "gpt2-ties-model-trim", "gpt2-bf16-sharded",
         "llama-lora-expert-ace", "llama-lora-experts-ties", "llama-mergekit-yaml",
         "llama-out-lora"]


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    """One small local Ray for the module; this module's functions travel by value (the
    workers need not import the tests)."""
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.ERROR)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield
    ray.cloudpickle.unregister_pickle_by_value(sys.modules[__name__])
    ray.shutdown()


@pytest.fixture(scope="module")
def models(gpt2_family, tmp_path_factory):
    base, experts = gpt2_family
    return build_models(tmp_path_factory.mktemp("ray-cases"), base, experts)


def cli_merge(args: list[str], out: Path, *extra: str) -> int:
    return main(["merge", *args, "--out", str(out), "-q", *extra])


def assert_same_files(first: Path, second: Path) -> None:
    a, b = folder_bytes(first), folder_bytes(second)
    assert a.keys() == b.keys() and any(name.endswith(".safetensors") for name in a)
    for name in a:
        assert a[name] == b[name], name


@pytest.mark.parametrize("case", CASES)
def test_ray_writes_the_local_merges_bytes(case, models, tmp_path):
    args = case_args(models)[case]
    assert cli_merge(args, tmp_path / "local") == 0
    assert cli_merge(args, tmp_path / "ray", "--executor", "ray", "--workers", "2",
                     "--max-in-flight", "3") == 0
    assert_same_files(tmp_path / "local", tmp_path / "ray")


def test_python_api_and_yaml_config(models, tmp_path):
    experts = [models[f"gpt2-e{i}"] for i in range(3)]
    acemerge.merge(models["gpt2"], experts, tmp_path / "local", method="ties")
    acemerge.merge(models["gpt2"], experts, tmp_path / "api", method="ties", executor="ray",
                   workers=2, max_in_flight=1)
    assert_same_files(tmp_path / "local", tmp_path / "api")
    config = tmp_path / "merge.yaml"
    config.write_text(f"merge_method: ties\nbase_model: {models['gpt2']}\nmodels:\n"
                      + "".join(f"  - {e}\n" for e in experts)
                      + "executor: ray\nworkers: 1\n")
    assert main(["merge", str(config), str(tmp_path / "yaml"), "-q"]) == 0
    assert_same_files(tmp_path / "local", tmp_path / "yaml")  # the saved YAML has no executor


def kill_once(task_vectors, params, *, rule, marker: str):
    """The rule, after killing its worker process the first time it is called anywhere."""
    if not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)
    return rule(task_vectors, params)


def test_a_killed_worker_has_its_parameters_retried(models, tmp_path):
    cfg = build_config(merge_method="average", base_model=str(models["llama"]),
                       models=[str(models[f"llama-e{i}"]) for i in range(3)])
    base, experts = open_inputs(cfg)
    plan = plan_for(cfg, base)
    average = get("average")
    marker = tmp_path / "killed"
    dying = replace(average, name="average-killing-its-worker",
                    matrix_rule=partial(kill_once, rule=average.matrix_rule, marker=str(marker)))
    local: dict[str, torch.Tensor] = {}
    merge_stream(base, experts, average, average.validate({}), plan, local.__setitem__)
    remote: dict[str, torch.Tensor] = {}
    with RayExecutor(InputSource.of(cfg), workers=2, batch_numel=1) as executor:
        merge_stream(base, experts, dying, dying.validate({}), plan, remote.__setitem__,
                     executor=executor)
    assert marker.exists()  # a worker died
    assert list(remote) == list(local)
    for name, tensor in local.items():
        assert remote[name].dtype == tensor.dtype
        assert torch.equal(remote[name].reshape(-1).view(torch.uint8),
                           tensor.reshape(-1).view(torch.uint8)), name


def test_a_path_a_worker_cannot_read_is_named(models, tmp_path):
    root = tmp_path / "copy"
    for name in ("gpt2", "gpt2-e0", "gpt2-e1"):
        shutil.copytree(models[name], root / name)
    cfg = build_config(base_model=str(root / "gpt2"),
                       models=[str(root / "gpt2-e0"), str(root / "gpt2-e1")])
    base, experts = open_inputs(cfg)  # the driver sees it ...
    shutil.rmtree(root / "gpt2-e1")  # ... the workers do not
    method = get("ace")
    with RayExecutor(InputSource.of(cfg), workers=2) as executor, \
            pytest.raises(AceMergeError, match=r"^Ray worker on \S+: \S+/gpt2-e1: no such file "
                          r"or folder \(inputs must be readable at the same path on every node"):
        merge_stream(base, experts, method, method.validate({}), plan_for(cfg, base),
                     lambda name, tensor: None, executor=executor)


def test_bad_input_found_by_a_worker_leaves_no_output(models, tmp_path, capsys):
    bad = tmp_path / "bad-expert"
    shutil.copytree(models["gpt2-e1"], bad)
    tensors = load_file(bad / "model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"
    tensors[name][1, 2] = float("inf")
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code = cli_merge(["--base", str(models["gpt2"]), "--expert", str(models["gpt2-e0"]),
                      "--expert", str(bad), "--method", "ties"], out, "--executor", "ray")
    assert_clean_failure(code, capsys.readouterr().err, out,
                         f"{bad}: parameter '{name}' contains NaN or Inf")
    assert code == 2


def test_gpu_tasks_take_the_device_ray_assigns(models):
    with pytest.raises(AceMergeError, match="give --device cuda"):
        RayExecutor(InputSource.of(build_config(base_model=str(models["gpt2"]),
                                                models=[str(models["gpt2-e0"])] * 2)),
                    device="cuda:1")
