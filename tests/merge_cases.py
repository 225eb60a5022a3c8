"""Merges that exercise every path of the engine, for comparing executors byte for byte:
GPT-2 Conv1D weights, a Llama, LoRA adapter experts (factored and materialized), TIES's
whole-model trim, a mergekit YAML config and the LoRA adapter output."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
import yaml
from safetensors.torch import save_file

from tests.conftest import save_family

PEFT_PREFIX = "base_model.model."


def tiny_llama_config() -> transformers.LlamaConfig:
    return transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=64, max_position_embeddings=32,
        tie_word_embeddings=False)


def write_adapter(folder: Path, base: Path, modules: list[str], rank: int, seed: int) -> None:
    """A PEFT LoRA adapter on the tiny Llama at ``base`` (random nonzero A and B), written
    the way PEFT writes it."""
    model = transformers.LlamaForCausalLM(tiny_llama_config())
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in modules:
            d_out, d_in = module.weight.shape
            prefix = f"{PEFT_PREFIX}{name}."
            tensors[prefix + "lora_A.weight"] = 0.05 * torch.randn(rank, d_in, generator=gen)
            tensors[prefix + "lora_B.weight"] = 0.05 * torch.randn(d_out, rank, generator=gen)
    folder.mkdir(parents=True)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 16, "target_modules": modules,
              "base_model_name_or_path": str(base), "fan_in_fan_out": False}
    (folder / "adapter_config.json").write_text(json.dumps(config))


def build_models(root: Path, gpt2_base: Path, gpt2_experts: list[Path]) -> dict[str, Path]:
    """A tiny Llama family (base, 3 full experts, 2 adapters) beside the GPT-2 one."""
    llama_base, llama_experts = save_family(root / "llama", transformers.LlamaForCausalLM,
                                            tiny_llama_config())
    write_adapter(root / "llama" / "a0", llama_base, ["q_proj", "v_proj", "down_proj"], 4, 1)
    write_adapter(root / "llama" / "a1", llama_base, ["q_proj", "up_proj"], 2, 2)
    paths = {"gpt2": gpt2_base, "llama": llama_base, "a0": root / "llama" / "a0",
             "a1": root / "llama" / "a1"}
    paths |= {f"gpt2-e{i}": e for i, e in enumerate(gpt2_experts)}
    paths |= {f"llama-e{i}": e for i, e in enumerate(llama_experts)}
    mergekit = {"merge_method": "ties", "base_model": str(llama_base),
                "models": [{"model": str(llama_experts[0]),
                            "parameters": {"weight": [0.2, 1.0], "density": 0.5}},
                           {"model": str(llama_experts[1]),
                            "parameters": {"weight": 0.7, "density": [
                                {"filter": "mlp", "value": 0.3}, {"value": 0.8}]}},
                           {"model": str(llama_experts[2]),
                            "parameters": {"weight": 0.5, "density": 0.6}}],
                "parameters": {"normalize": True}, "dtype": "float32"}
    paths["mergekit.yaml"] = root / "mergekit.yaml"
    paths["mergekit.yaml"].write_text(yaml.safe_dump(mergekit))
    return paths


def experts(paths: dict[str, Path], *names: str) -> list[str]:
    return [a for name in names for a in ("--expert", str(paths[name]))]


def case_args(paths: dict[str, Path]) -> dict[str, list[str]]:
    """Each case's ``acemerge merge`` arguments (without --out)."""
    gpt2 = ["--base", str(paths["gpt2"]), *experts(paths, "gpt2-e0", "gpt2-e1", "gpt2-e2")]
    llama = ["--base", str(paths["llama"])]
    full = experts(paths, "llama-e0", "llama-e1", "llama-e2")
    return {
        "gpt2-ace-conv1d": gpt2,
        "gpt2-ties-model-trim": [*gpt2, "--method", "ties", "--set", "k=0.3"],
        "gpt2-bf16-sharded": [*gpt2, "--dtype", "bfloat16", "--max-shard-size", "20KB"],
        "llama-tsv": [*llama, *full, "--method", "tsv"],
        "llama-lora-expert-ace": [*llama, *experts(paths, "a0", "llama-e1", "a1")],
        "llama-lora-experts-ties": [*llama, *experts(paths, "a0", "a1"), "--method", "ties"],
        "llama-mergekit-yaml": [str(paths["mergekit.yaml"])],
        "llama-out-lora": [*llama, *experts(paths, "a0", "a1"), "--method",
                           "task_arithmetic", "--out-format", "lora"],
    }


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}
