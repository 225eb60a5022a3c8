"""Merges written as PEFT LoRA adapters: loadable by PEFT, exact where the update is
low-rank (PEFT's own "cat" combination as the anchor), truncated by SVD otherwise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from acemerge.cli import main
from tests.test_lora_experts import ARCHS, make_adapter, tiny_llama_config

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama base and three adapters of ranks 2, 4, 6 on overlapping modules."""
    root = tmp_path_factory.mktemp("lora-out")
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(tiny_llama_config()).save_pretrained(root / "base")
    targets = (["q_proj", "v_proj", "down_proj"], ["q_proj", "up_proj"], ["k_proj", "q_proj"])
    adapters = []
    for i, (rank, modules) in enumerate(zip((2, 4, 6), targets, strict=True)):
        make_adapter(transformers.LlamaForCausalLM, None, root / "base", root / f"a{i}",
                     200 + i, r=rank, target_modules=modules, use_rslora=i == 1)
        adapters.append(root / f"a{i}")
    return root / "base", adapters


def merge_cli(base: Path, experts: list[Path], out: Path, *extra: str) -> int:
    args = ["merge", "--base", str(base), "--out", str(out), "-q", *extra]
    return main(args + [a for e in experts for a in ("--expert", str(e))])


def peft_weights(base: Path, adapter: Path) -> dict[str, torch.Tensor]:
    model = transformers.LlamaForCausalLM.from_pretrained(base)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12))
               for k in b)


def test_task_arithmetic_adapter_equals_peft_cat(llama, tmp_path):
    base, adapters = llama
    out = tmp_path / "out"
    assert merge_cli(base, adapters, out, "--method", "task_arithmetic", "--scale", "0.7",
                     "--out-format", "lora", "--out-rank", "exact") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    ranks = {m: config["rank_pattern"].get(m.replace(".", r"\."), config["r"])
             for m in config["target_modules"]}
    assert ranks["model.layers.0.self_attn.q_proj"] == 2 + 4 + 6  # exact: the sum of ranks
    assert ranks["model.layers.0.self_attn.v_proj"] == 2
    ours = peft_weights(base, out)

    model = transformers.LlamaForCausalLM.from_pretrained(base)
    combined = peft.PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, adapter in enumerate(adapters[1:], 1):
        combined.load_adapter(adapter, adapter_name=f"a{i}")
    combined.add_weighted_adapter(["a0", "a1", "a2"], [0.7, 0.7, 0.7], "cat",
                                  combination_type="cat")
    combined.set_adapter("cat")
    theirs = {k: v.detach() for k, v in combined.merge_and_unload().state_dict().items()}
    assert worst(ours, theirs) < 1e-6
    full = tmp_path / "full"
    assert merge_cli(base, adapters, full, "--method", "task_arithmetic", "--scale",
                     "0.7") == 0
    assert worst(ours, load_file(full / "model.safetensors")) < 1e-6
    assert "## LoRA output" in (out / "README.md").read_text()
    assert not (out / "config.json").exists()


def test_ace_adapter_keeps_the_low_rank_update_exactly(llama, tmp_path):
    base, adapters = llama
    lora, full = tmp_path / "lora", tmp_path / "full"
    assert merge_cli(base, adapters, lora, "--method", "ace", "--out-format", "lora") == 0
    assert merge_cli(base, adapters, full, "--method", "ace") == 0
    assert worst(peft_weights(base, lora), load_file(full / "model.safetensors")) < 1e-5


def test_a_fixed_rank_truncates_by_svd_and_reports_energy(llama, tmp_path):
    base, adapters = llama
    out, full = tmp_path / "r2", tmp_path / "full"
    assert merge_cli(base, adapters, out, "--method", "task_arithmetic", "--scale", "1",
                     "--out-format", "lora", "--out-rank", "2") == 0
    assert merge_cli(base, adapters, full, "--method", "task_arithmetic", "--scale", "1") == 0
    name = "model.layers.1.self_attn.q_proj"
    tensors = load_file(out / "adapter_model.safetensors")
    product = (tensors[f"base_model.model.{name}.lora_B.weight"].double()
               @ tensors[f"base_model.model.{name}.lora_A.weight"].double())
    update = (load_file(full / "model.safetensors")[f"{name}.weight"].double()
              - load_file(base / "model.safetensors")[f"{name}.weight"].double())
    u, s, vh = torch.linalg.svd(update)
    best = u[:, :2] * s[:2] @ vh[:2]
    assert float((product - best).abs().max() / best.abs().max()) < 1e-5
    card = (out / "README.md").read_text()
    kept = float(s[:2].pow(2).sum() / s.pow(2).sum())
    line = next(x for x in card.splitlines() if f"`{name}`:" in x)
    assert float(line.split(": ")[1].rstrip("%")) == pytest.approx(100 * kept, abs=1e-3)


def test_gpt2_adapter_with_conv1d_and_a_saved_head_loads_in_peft(tmp_path):
    model_cls, make_config, loras = ARCHS["gpt2"]
    torch.manual_seed(0)
    model_cls(make_config()).save_pretrained(tmp_path / "base")
    adapters = []
    for i, lora in enumerate(loras[:2]):
        make_adapter(model_cls, None, tmp_path / "base", tmp_path / f"a{i}", 300 + i, **lora)
        adapters.append(tmp_path / f"a{i}")
    out, full = tmp_path / "out", tmp_path / "full"
    flags = ["--method", "average", "--no-default-excludes"]
    assert merge_cli(tmp_path / "base", adapters, out, *flags, "--out-format", "lora") == 0
    assert merge_cli(tmp_path / "base", adapters, full, *flags) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] and "score" in config["target_modules"]  # a Linear
    model = model_cls.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    expected = load_file(full / "model.safetensors")
    assert worst({k: merged[k] for k in expected}, expected) < 1e-5


@pytest.mark.parametrize(("extra", "fragment"), [
    (["--method", "ties", "--out-format", "lora"], "gives no low-rank update; give --out-rank"),
    (["--out-format", "lora", "--out-rank", "0"], "--out-rank: expected a positive integer"),
])
def test_adapter_output_errors(extra, fragment, llama, tmp_path, capsys):
    base, adapters = llama
    assert merge_cli(base, adapters, tmp_path / "out", *extra) == 2
    assert fragment in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_norm_updates_go_to_modules_to_save_and_bias_clashes_are_refused(tmp_path, capsys):
    model_cls, make_config, _ = ARCHS["gpt2"]
    torch.manual_seed(0)
    model_cls(make_config()).save_pretrained(tmp_path / "base")
    saved = dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, modules_to_save=["ln_f"])
    for i in range(2):
        make_adapter(model_cls, None, tmp_path / "base", tmp_path / f"a{i}", 400 + i, **saved)
    adapters = [tmp_path / "a0", tmp_path / "a1"]
    out, full = tmp_path / "out", tmp_path / "full"
    assert merge_cli(tmp_path / "base", adapters, out, "--method", "average",
                     "--out-format", "lora") == 0
    assert merge_cli(tmp_path / "base", adapters, full, "--method", "average") == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["transformer.ln_f"]
    model = model_cls.from_pretrained(tmp_path / "base")
    merged = peft.PeftModel.from_pretrained(model, out).merge_and_unload().state_dict()
    expected = load_file(full / "model.safetensors")
    assert worst({k: merged[k] for k in expected}, expected) < 1e-5

    biased = dict(r=2, target_modules=["c_attn"], fan_in_fan_out=True, bias="all")
    make_adapter(model_cls, None, tmp_path / "base", tmp_path / "b0", 500, **biased)
    from safetensors.torch import save_file

    path = tmp_path / "b0" / "adapter_model.safetensors"
    tensors = load_file(path)
    assert any("c_attn" in k and k.endswith("bias") for k in tensors)  # trained biases saved
    save_file({k: v + 0.01 if k.endswith("bias") else v for k, v in tensors.items()}, path)
    assert merge_cli(tmp_path / "base", [tmp_path / "b0", adapters[0]], tmp_path / "x",
                     "--method", "average", "--out-format", "lora") == 2
    assert "a LoRA adapter cannot hold both" in capsys.readouterr().err


def test_the_readme_adapter_commands_run(llama, tmp_path, monkeypatch):
    import re
    import shlex

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"```bash\n(# three adapters.*?)```", readme, re.S).group(1)
    commands = [" ".join(c.split()) for c in block.replace("\\\n", " ").splitlines()
                if c.startswith("acemerge")]
    base, adapters = llama
    for name, source in (("base", base), ("adapter-a", adapters[0]),
                         ("adapter-b", adapters[1]), ("adapter-c", adapters[2])):
        (tmp_path / name).symlink_to(source, target_is_directory=True)
    monkeypatch.chdir(tmp_path)
    assert len(commands) == 2
    for command in commands:
        args = shlex.split(command.split("#")[0])[1:]
        assert main([*args, "-q"]) == 0
    assert worst(peft_weights(base, tmp_path / "merged-adapter"),
                 load_file(tmp_path / "merged-model" / "model.safetensors")) < 1e-5
