"""PEFT LoRA adapters as experts: exact task vectors (PEFT's own merge as the oracle), mixed
with full experts, unequal ranks and targets, rsLoRA, modules_to_save, and bad adapters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from acemerge.cli import main
from tests.conftest import tiny_gpt2_config

peft = pytest.importorskip("peft")


def tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
        tie_word_embeddings=False)


ARCHS = {
    "gpt2": (transformers.GPT2ForSequenceClassification, tiny_gpt2_config,
             [dict(r=4, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True,
                   modules_to_save=["score"]),
              dict(r=2, target_modules=["c_proj"], fan_in_fan_out=True, use_rslora=True),
              dict(r=8, target_modules=["c_attn", "wte"], fan_in_fan_out=True)]),
    "llama": (transformers.LlamaForCausalLM, tiny_llama_config,
              [dict(r=4, target_modules=["q_proj", "v_proj", "down_proj"]),
               dict(r=2, target_modules=["q_proj", "up_proj"], use_rslora=True),
               dict(r=6, target_modules=["k_proj", "o_proj", "embed_tokens"])]),
}


def make_adapter(model_cls, config, base_dir: Path, out: Path, seed: int, **lora) -> None:
    """A PEFT adapter with random (nonzero) A and B saved the way PEFT saves it."""
    torch.manual_seed(seed)
    model = model_cls.from_pretrained(base_dir)
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(lora_alpha=16, init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "modules_to_save" in name:
                param.add_(0.05 * torch.randn_like(param))
    peft_model.save_pretrained(out)


def peft_merged(model_cls, base_dir: Path, adapter: Path) -> dict[str, torch.Tensor]:
    """PEFT's own merge of one adapter into the base (the oracle for its task vector)."""
    model = model_cls.from_pretrained(base_dir)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return {k: v.detach() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    model_cls, make_config, loras = ARCHS[request.param]
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    torch.manual_seed(0)
    model_cls(make_config()).save_pretrained(root / "base")
    adapters = []
    for i, lora in enumerate(loras):
        make_adapter(model_cls, None, root / "base", root / f"adapter{i}", 100 + i, **lora)
        adapters.append(root / f"adapter{i}")
    return model_cls, root / "base", adapters


def merge_cli(base: Path, experts: list[Path], out: Path, *extra: str) -> int:
    args = ["merge", "--base", str(base), "--out", str(out), "-q", *extra]
    return main(args + [a for e in experts for a in ("--expert", str(e))])


def test_adapter_task_vectors_equal_peft_merges(arch, tmp_path):
    """task_arithmetic with scale 1 and no exclusions = base + the sum of PEFT's updates."""
    model_cls, base, adapters = arch
    out = tmp_path / "out"
    assert merge_cli(base, adapters, out, "--method", "task_arithmetic", "--scale", "1",
                     "--no-default-excludes") == 0
    base_sd = load_file(base / "model.safetensors")
    ours = load_file(out / "model.safetensors")
    expected = {k: v.clone() for k, v in base_sd.items()}
    for adapter in adapters:
        merged = peft_merged(model_cls, base, adapter)
        for k in expected:
            expected[k] += merged[k] - base_sd[k]
    for k in expected:
        scale = expected[k].abs().max().clamp_min(1e-12)
        assert float((ours[k] - expected[k]).abs().max() / scale) < 1e-6, k


def test_full_experts_and_adapters_mix(arch, tmp_path):
    model_cls, base, adapters = arch
    full = tmp_path / "full"
    merged = peft_merged(model_cls, base, adapters[0])
    model = model_cls.from_pretrained(base)
    model.load_state_dict(merged, strict=False)
    model.save_pretrained(full)
    pure, mixed = tmp_path / "pure", tmp_path / "mixed"
    assert merge_cli(base, adapters, pure, "--method", "ace") == 0
    assert merge_cli(base, [full, *adapters[1:]], mixed, "--method", "ace") == 0
    a, b = load_file(pure / "model.safetensors"), load_file(mixed / "model.safetensors")
    worst = max(float((a[k] - b[k]).abs().max() / a[k].abs().max().clamp_min(1e-12))
                for k in a)
    assert worst < 1e-4  # the full expert carries float32 rounding of base + update


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def edit_tensors(adapter: Path, change) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def break_dora(a):
    edit_config(a, use_dora=True)
    return "DoRA adapters are not supported"


def break_type(a):
    edit_config(a, peft_type="LOHA")
    return "adapter type LOHA is not supported"


def break_missing_b(a):
    edit_tensors(a, lambda t: t.pop(next(k for k in t if "lora_B" in k)))
    return "has no lora_B"


def break_rank(a):
    edit_config(a, r=3)
    return "the config says r = 3"


def break_target(a):
    def rename(t):
        module = next(k for k in t if "lora_A" in k).split(".lora_A")[0]
        for key in [k for k in t if k.startswith(module + ".lora_")]:
            t[key.replace("layers.0.", "layers.9.").replace("h.0.", "h.9.")] = t.pop(key)
    edit_tensors(a, rename)
    return "has no parameter in the base"


def break_shape(a):
    def widen(t):
        key = next(k for k in t if "lora_A" in k)
        t[key] = torch.zeros(t[key].shape[0], t[key].shape[1] + 1)
    edit_tensors(a, widen)
    return "(another base?)"


def break_base_name(a):
    edit_config(a, base_model_name_or_path="someone/another-model")
    return "adapter was trained on 'someone/another-model'"


BAD = {"dora": break_dora, "type": break_type, "missing-b": break_missing_b,
       "rank": break_rank, "target": break_target, "shape": break_shape,
       "base-name": break_base_name}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapters_fail_in_one_line(case, arch, tmp_path, capsys):
    import shutil

    _, base, adapters = arch
    broken = tmp_path / "broken"
    shutil.copytree(adapters[0], broken)
    fragment = BAD[case](broken)
    out = tmp_path / "out"
    code = merge_cli(base, [broken, adapters[1]], out)
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and fragment in lines[0], lines
    assert not out.exists()
    if case == "base-name":
        assert merge_cli(base, [broken, adapters[1]], out, "--allow-base-mismatch") == 0


def test_an_adapter_as_base_is_refused(arch, tmp_path, capsys):
    _, base, adapters = arch
    assert merge_cli(adapters[0], adapters[1:], tmp_path / "out") == 2
    assert "a LoRA adapter, not a full model" in capsys.readouterr().err


def test_pickled_adapter_reads_like_safetensors(arch, tmp_path):
    import shutil

    _, base, adapters = arch
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters[0], pickled)
    tensors = load_file(pickled / "adapter_model.safetensors")
    (pickled / "adapter_model.safetensors").unlink()
    torch.save(tensors, pickled / "adapter_model.bin")
    for name, expert in (("a", adapters[0]), ("b", pickled)):
        assert merge_cli(base, [expert, adapters[1]], tmp_path / name, "--method",
                         "average") == 0
    a, b = (load_file(tmp_path / n / "model.safetensors") for n in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
