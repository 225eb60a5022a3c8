"""Streaming benchmark: peak memory and wall time of a merge of a ~1B Llama-shaped model.

Generates (once, cached) a base with the shape of TinyLlama-1.1B (hidden 2048,
intermediate 5632, 22 layers, 32 heads, 4 KV heads, vocabulary 32000) in bfloat16 and
three experts (base + dense random updates of different magnitudes), as sharded HF
folders, then runs ``acemerge merge`` in a child process and prints its peak RSS and
wall time next to the size of one model and the (T + 2) x largest-parameter bound.

    python scripts/bench_stream.py [--layers 22] [--method ace] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from acemerge.io.writers import ShardedSafetensorsWriter, TensorSpec

N_EXPERTS = 3
EXPERT_SCALES = (1e-3, 3e-3, 1e-2)


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 2048,
        "intermediate_size": 5632, "num_hidden_layers": layers, "num_attention_heads": 32,
        "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "hidden_act": "silu",
    }


def tensor_specs(cfg: dict) -> list[TensorSpec]:
    h, inter, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    kv = h // cfg["num_attention_heads"] * cfg["num_key_value_heads"]
    shapes = {"model.embed_tokens.weight": (vocab, h)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (inter, h), p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter), p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    shapes |= {"model.norm.weight": (h,), "lm_head.weight": (vocab, h)}
    return [TensorSpec(name, shape, torch.bfloat16) for name, shape in shapes.items()]


def write_model(folder: Path, cfg: dict, seed: int, update_scale: float | None) -> None:
    """Stream a model to disk; experts are the base plus seeded dense updates."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(cfg)
    writer = ShardedSafetensorsWriter(folder, specs, max_shard_bytes=1024**3)
    for index, spec in enumerate(specs):
        base_gen = torch.Generator().manual_seed(index)
        value = 0.02 * torch.randn(spec.shape, generator=base_gen)
        if update_scale is not None:
            gen = torch.Generator().manual_seed(seed * 100_003 + index)
            value += update_scale * torch.randn(spec.shape, generator=gen)
        writer.add(spec.name, value.to(torch.bfloat16))
    writer.close()
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))


def prepare(workdir: Path, layers: int) -> tuple[Path, list[Path]]:
    cfg = llama_config(layers)
    base = workdir / "base"
    experts = [workdir / f"expert{i}" for i in range(N_EXPERTS)]
    for i, folder in enumerate([base, *experts]):
        if (folder / "config.json").is_file():
            continue
        start = time.perf_counter()
        write_model(folder, cfg, seed=i, update_scale=None if i == 0 else EXPERT_SCALES[i - 1])
        print(f"generated {folder.name} in {time.perf_counter() - start:.0f} s", flush=True)
    return base, experts


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def run_child(args: list[str]) -> tuple[float, float]:
    """Run ``acemerge`` in a child process; return (wall seconds, peak RSS in GiB)."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "acemerge.cli", *args], check=True)
    wall = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, peak_kib / 1024**2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="22 = TinyLlama-1.1B shape")
    parser.add_argument("--method", default="ace")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/stream"))
    args = parser.parse_args()

    base, experts = prepare(args.workdir, args.layers)
    specs = tensor_specs(llama_config(args.layers))
    n_params = sum(s.nbytes for s in specs) // 2
    largest = max(specs, key=lambda s: s.nbytes)
    out = args.workdir / "merged"
    cmd = ["merge", "--base", str(base), "--method", args.method, "--out", str(out),
           "--overwrite", "-q"] + [a for e in experts for a in ("--expert", str(e))]
    wall, peak = run_child(cmd)
    model_gib = folder_bytes(base) / 1024**3
    largest_f32_gib = largest.nbytes * 2 / 1024**3
    print(f"model: {n_params / 1e9:.2f} B parameters, {model_gib:.2f} GiB on disk (bf16), "
          f"{N_EXPERTS} experts")
    print(f"largest parameter: {largest.name} {largest.shape} = {largest.nbytes / 2**20:.0f} MiB "
          f"bf16; (T + 2) x largest in float32 = {(N_EXPERTS + 2) * largest_f32_gib:.2f} GiB")
    print(f"merge ({args.method}): wall {wall:.1f} s, peak RSS {peak:.2f} GiB "
          f"({peak / model_gib:.2f} x one model, {peak / (model_gib * (N_EXPERTS + 1)):.2f} x "
          f"all {N_EXPERTS + 1} inputs)")


if __name__ == "__main__":
    main()
