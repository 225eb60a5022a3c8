"""Whole-model LoRA merge: ACE's low-rank path against the dense path, time and peak memory.

Generates (once, cached) a TinyLlama-1.1B-shaped base (bfloat16, as scripts/bench_stream.py)
and four PEFT LoRA adapters of rank 16 on every attention and MLP projection, with task
magnitudes spread over 1.5 decades (as scripts/bench_lora_time.py), then runs
``acemerge merge`` in child processes, interleaved: low-rank, dense (``--no-low-rank``),
low-rank. Prints each run's wall time and peak RSS (its own, from wait4), the ratios, and
the largest difference between the two merged models' updates relative to the update
(outputs in float32 so that bfloat16 rounding does not hide it), and, for the tensor where
they differ most, each one's distance to ACE evaluated in float64. ``--float64-reference``
adds a dense run in float64 and measures both paths against it.

    python scripts/bench_lora_model.py [--layers 22] [--rank 16] [--adapters 4] [--workdir DIR]
        [--float64-reference]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from bench_lora_time import adapters  # noqa: E402
from bench_stream import llama_config, tensor_specs, write_model  # noqa: E402

from acemerge.io.readers import open_checkpoint  # noqa: E402

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


def write_adapters(base: Path, workdir: Path, count: int, rank: int, layers: int
                   ) -> list[Path]:
    """``count`` PEFT LoRA folders (lora_alpha = 2 r) on every projection of ``base``."""
    folders = [workdir / f"adapter{i}" for i in range(count)]
    if all((f / "adapter_config.json").is_file() for f in folders):
        return folders
    specs = [s for s in tensor_specs(llama_config(layers))
             if s.name.split(".")[-2] in TARGETS]
    tensors: list[dict[str, torch.Tensor]] = [{} for _ in folders]
    scaling = 2.0  # lora_alpha / r
    for index, spec in enumerate(specs):
        module = spec.name.removesuffix(".weight")
        for t, parts in enumerate(adapters(tuple(spec.shape), count, rank, index)):
            tensors[t][f"{PEFT_PREFIX}{module}.lora_A.weight"] = parts.right.contiguous()
            tensors[t][f"{PEFT_PREFIX}{module}.lora_B.weight"] = \
                (parts.left / scaling).contiguous()
    for folder, state in zip(folders, tensors, strict=True):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank,
            "lora_alpha": scaling * rank, "target_modules": list(TARGETS),
            "base_model_name_or_path": str(base), "fan_in_fan_out": False,
            "use_rslora": False, "bias": "none"}, indent=2))
    return folders


def run_child(args: list[str]) -> tuple[float, float]:
    """Run ``acemerge`` in a child process; (wall seconds, its peak RSS in GiB)."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "acemerge.cli", *args])
    _, status, usage = os.wait4(child.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"acemerge {' '.join(args)} failed")
    return time.perf_counter() - start, usage.ru_maxrss / 1024**2


def update_difference(base: Path, low: Path, dense: Path) -> tuple[float, str]:
    """max over tensors of max|low - dense| / max|dense - base| (0 where both are 0)."""
    worst, where = 0.0, ""
    readers = [open_checkpoint(str(folder)) for folder in (base, low, dense)]
    for key in readers[1].specs():
        ref, low_w, dense_w = (r.get(key).double() for r in readers)
        update = dense_w - ref
        scale = float(update.abs().max())
        if scale == 0.0:
            continue
        diff = float((low_w - ref - update).abs().max()) / scale
        if diff > worst:
            worst, where = diff, key
    return worst, where


def float64_spot_check(workdir: Path, experts: list[Path], key: str,
                       outs: dict[str, Path]) -> dict[str, float]:
    """ACE's dense rule in float64 on the adapters' exact task vectors of ``key``; each
    output's distance to it, relative to its largest entry."""
    from acemerge.methods import get

    module = PEFT_PREFIX + key.removesuffix(".weight")
    task_vectors = []
    for folder in experts:
        config = json.loads((folder / "adapter_config.json").read_text())
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            a = f.get_tensor(f"{module}.lora_A.weight").double()
            b = f.get_tensor(f"{module}.lora_B.weight").double()
        task_vectors.append(config["lora_alpha"] / config["r"] * b @ a)
    ace = get("ace")
    reference = ace.matrix_rule(task_vectors, ace.validate({}))
    base = open_checkpoint(str(workdir / "base")).get(key).double()
    return {kind: float((open_checkpoint(str(out)).get(key).double() - base - reference)
                        .abs().max() / reference.abs().max()) for kind, out in outs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=22, help="22 = TinyLlama-1.1B shape")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/lora-model"))
    parser.add_argument("--float64-reference", action="store_true",
                        help="also run the dense path in float64 and compare both with it")
    args = parser.parse_args()

    base = args.workdir / "base"
    if not (base / "config.json").is_file():
        write_model(base, llama_config(args.layers), seed=0, update_scale=None)
    experts = write_adapters(base, args.workdir, args.adapters, args.rank, args.layers)
    common = ["merge", "--base", str(base), "--method", "ace", "--dtype", "float32",
              "--overwrite", "-q"] + [a for e in experts for a in ("--expert", str(e))]
    outs = {"low": args.workdir / "merged-low", "dense": args.workdir / "merged-dense"}
    runs: dict[str, list[tuple[float, float]]] = {"low": [], "dense": []}
    for kind in ("low", "dense", "low"):
        extra = ["--no-low-rank"] if kind == "dense" else []
        runs[kind].append(run_child([*common, "--out", str(outs[kind]), *extra]))
        wall, peak = runs[kind][-1]
        print(f"  {kind}: wall {wall:.1f} s, peak RSS {peak:.2f} GiB", flush=True)
    low_wall = min(w for w, _ in runs["low"])
    low_peak = max(p for _, p in runs["low"])
    dense_wall, dense_peak = runs["dense"][0]
    worst, where = update_difference(base, outs["low"], outs["dense"])
    print(f"ACE, {args.adapters} LoRA adapters of rank {args.rank} on a {args.layers}-layer "
          f"TinyLlama-1.1B-shaped base, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"whole merge (read, merge, write): low-rank {low_wall:.1f} s (best of 2), "
          f"dense {dense_wall:.1f} s -> {dense_wall / low_wall:.1f}x faster")
    print(f"peak RSS: low-rank {low_peak:.2f} GiB, dense {dense_peak:.2f} GiB -> "
          f"{dense_peak / low_peak:.2f}x")
    print(f"largest difference of the merged updates (relative to the update): {worst:.1e} "
          f"({where})")
    spot = float64_spot_check(args.workdir, experts, where, outs)
    print(f"that tensor against ACE in float64 on the exact task vectors: "
          f"low-rank {spot['low']:.1e}, dense {spot['dense']:.1e}")
    if args.float64_reference:
        reference = args.workdir / "merged-dense64"
        run_child([*common, "--out", str(reference), "--no-low-rank", "--compute-dtype",
                   "float64"])
        for kind in ("low", "dense"):
            worst, where = update_difference(base, outs[kind], reference)
            print(f"{kind} (float32) vs dense float64: {worst:.1e} ({where})")


if __name__ == "__main__":
    main()
