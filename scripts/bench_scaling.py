"""Scaling on paper: a merge's makespan on N workers under the Ray executor's scheduling,
from the per-parameter step times of a real run; and a measured 2-worker Ray run.

    python scripts/bench_scaling.py steps --shape gpt2 [--layers 12] [--method ace]
    python scripts/bench_scaling.py steps --shape tinyllama --layers 2
    python scripts/bench_scaling.py measure --shape gpt2 --executor local|ray [--workers 2]
    python scripts/bench_scaling.py report [--workers 1,2,8,64] [--out-md FILE]

``steps`` runs one serial local merge (``LocalExecutor(overlap=False)``, ``--threads``
torch threads, the threads of one worker) and records every parameter's ``MergeStep``
seconds (reading and merging it) and the seconds the writer took for it. Inputs: the
GPT-2-small-shaped base and 7 experts of scripts/bench_methods.py (under
bench-out/methods), or the TinyLlama-1.1B-shaped base and 3 experts of
scripts/bench_stream.py with ``--layers`` layers (under bench-out/stream-<L>L).

``measure`` times one whole merge (``merge_from_config``) with the local executor or the
Ray executor on ``--workers`` workers (a local Ray that the executor starts: its start is
in the wall time), and compares its output folder byte for byte with the local one of the
same thread count.

``report`` prints, per shape, the projected makespan for each N: the units of work are
the Ray executor's (``units_for``: a large parameter alone, small ones batched), at most
``max_in_flight = 2 N`` units are submitted and not yet written, a submitted unit goes to
the first free worker, and the driver writes results in plan order (a unit is submitted
when the unit ``max_in_flight`` places before it has been written). The projection leaves
out Ray's per-task overhead, moving results to the driver and workers competing for
storage. A TinyLlama run of L < 22 layers is replicated to 22 layers: each layer takes the
mean times of the measured layers' parameter of the same name, in the 22-layer
checkpoint's order.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_methods  # noqa: E402
import bench_stream  # noqa: E402

from acemerge import methods  # noqa: E402
from acemerge.config import DTYPES, build_config  # noqa: E402
from acemerge.engine import merge_stream  # noqa: E402
from acemerge.executors.base import units_for  # noqa: E402
from acemerge.executors.local import LocalExecutor  # noqa: E402
from acemerge.inputs import open_inputs, plan_for  # noqa: E402
from acemerge.io.writers import ShardedSafetensorsWriter, TensorSpec, shard_layout  # noqa: E402
from acemerge.plan import PlanEntry, Treatment, build_plan  # noqa: E402

OUT = Path("bench-out/scaling")
TINYLLAMA_LAYERS = 22


def inputs(shape: str, layers: int) -> tuple[Path, list[Path]]:
    """The generated inputs (cached by the two benchmark scripts)."""
    if shape == "gpt2":
        base, experts, _ = bench_methods.prepare(Path("bench-out/methods"), layers, 7)
        return base, experts
    return bench_stream.prepare(Path(f"bench-out/stream-{layers}L"), layers)


def config(shape: str, layers: int, method: str):
    base, experts = inputs(shape, layers)
    return build_config(merge_method=method, base_model=str(base),
                        models=[str(e) for e in experts], device="cpu")


def steps(args: argparse.Namespace) -> None:
    """One serial local merge: per parameter, read+merge seconds and write seconds."""
    torch.set_num_threads(args.threads)
    cfg = config(args.shape, args.layers, args.method)
    base, experts = open_inputs(cfg)
    plan = plan_for(cfg, base)
    method = methods.get(cfg.merge_method)
    params = method.for_model(method.validate(cfg.parameters), base.config)
    folder = OUT / f"steps-{args.shape}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    writer = ShardedSafetensorsWriter(folder, [TensorSpec(e.name, e.shape, e.dtype)
                                               for e in plan.entries], 5 * 1024**3)
    writes: dict[str, float] = {}

    def timed_emit(name: str, tensor: torch.Tensor) -> None:
        start = time.perf_counter()
        writer.add(name, tensor)
        writes[name] = time.perf_counter() - start

    start = time.perf_counter()
    done = merge_stream(base, experts, method, params, plan, timed_emit,
                        scale=cfg.resolved_scale, compute_dtype=DTYPES[cfg.compute_dtype],
                        executor=LocalExecutor(overlap=False))
    writer.close()
    wall = time.perf_counter() - start
    shutil.rmtree(folder)
    record = {"shape": args.shape, "layers": args.layers, "method": args.method,
              "threads": args.threads, "wall": wall, "load": os.getloadavg()[0],
              "steps": [{"name": s.entry.name, "numel": s.entry.numel, "seconds": s.seconds,
                         "write": writes.get(s.entry.name, 0.0)} for s in done]}
    save(f"steps-{args.shape}", record)
    print(f"{args.shape} ({args.layers} layers, {args.method}, {args.threads} thread(s)): "
          f"{len(done)} parameters, wall {wall:.1f} s, steps {sum(s.seconds for s in done):.1f}"
          f" s, writes {sum(writes.values()):.1f} s")


def measure(args: argparse.Namespace) -> None:
    """One whole merge with the local or the Ray executor; wall time and byte identity."""
    from acemerge.api import merge_from_config

    torch.set_num_threads(args.threads)
    cfg = config(args.shape, args.layers, args.method)
    name = f"{args.executor}{args.workers if args.executor == 'ray' else ''}-t{args.threads}"
    out = OUT / f"merged-{args.shape}-{name}"
    executor = LocalExecutor()
    if args.executor == "ray":
        from acemerge.executors.ray_executor import RayExecutor
        from acemerge.inputs import InputSource

        executor = RayExecutor(InputSource.of(cfg), workers=args.workers)
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with executor:
        merge_from_config(cfg, out, overwrite=True, executor=executor)
    wall = time.perf_counter() - start
    reference = OUT / f"merged-{args.shape}-local-t{args.threads}"
    same = None
    if reference != out and reference.is_dir():
        same = all((reference / p.name).read_bytes() == p.read_bytes()
                   for p in sorted(out.iterdir()) if p.is_file())
    measured = load_json("measured") or {}
    measured[f"{args.shape}/{name}"] = {"wall": wall, "load": load, "same_bytes": same,
                                         "layers": args.layers, "method": args.method}
    save("measured", measured)
    print(f"{args.shape} {name}: wall {wall:.1f} s (load {load:.2f} at start)"
          + ("" if same is None else f", bytes equal to local-t{args.threads}: {same}"))


def makespan(units: list[tuple[float, float]], workers: int, max_in_flight: int) -> float:
    """The end of the last write: units (compute, write seconds) in plan order, submitted
    while fewer than ``max_in_flight`` are unwritten, each to the first free worker, written
    by the driver in order."""
    free = [0.0] * workers
    written: list[float] = []
    last = 0.0
    for j, (compute, write) in enumerate(units):
        submitted = written[j - max_in_flight] if j >= max_in_flight else 0.0
        start = max(submitted, heapq.heappop(free))
        heapq.heappush(free, start + compute)
        last = max(start + compute, last) + write
        written.append(last)
    return last


def tinyllama_entries(record: dict) -> tuple[list[PlanEntry], dict[str, tuple[float, float]]]:
    """The 22-layer plan and each parameter's (seconds, write) from an L-layer run."""
    cfg = bench_stream.llama_config(TINYLLAMA_LAYERS)
    specs = bench_stream.tensor_specs(cfg)
    ordered = [s for shard in shard_layout(specs, 1024**3)
               for s in sorted(shard, key=lambda s: s.name)]  # as safetensors lists them
    plan = build_plan([(s.name, s.shape, s.dtype) for s in ordered], config=cfg)
    sums: dict[str, list[float]] = {}
    for step in record["steps"]:
        key = _layer_free(step["name"])
        acc = sums.setdefault(key, [0.0, 0.0, 0])
        acc[0] += step["seconds"]
        acc[1] += step["write"]
        acc[2] += 1
    times = {e.name: (sums[_layer_free(e.name)][0] / sums[_layer_free(e.name)][2],
                      sums[_layer_free(e.name)][1] / sums[_layer_free(e.name)][2])
             for e in plan.entries}
    return plan.entries, times


def _layer_free(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        parts[2] = "*"
    return ".".join(parts)


def run_entries(record: dict) -> tuple[list[PlanEntry], dict[str, tuple[float, float]]]:
    """The measured run's plan entries (treatment irrelevant here) and times."""
    entries = [PlanEntry(s["name"], (s["numel"],), torch.float32, Treatment.MATRIX, False, "")
               for s in record["steps"]]
    return entries, {s["name"]: (s["seconds"], s["write"]) for s in record["steps"]}


def projection(entries: list[PlanEntry], times: dict[str, tuple[float, float]],
               workers: list[int]) -> list[tuple[int, int, int, float]]:
    rows = []
    for n in workers:
        units = units_for(entries, n)
        unit_times = [(sum(times[e.name][0] for e in u), sum(times[e.name][1] for e in u))
                      for u in units]
        rows.append((n, 2 * n, len(units), makespan(unit_times, n, 2 * n)))
    return rows


def report(args: argparse.Namespace) -> None:
    workers = [int(n) for n in args.workers.split(",")]
    lines = []
    for shape, title in (("gpt2", "GPT-2-small shape"), ("tinyllama", "TinyLlama-1.1B shape")):
        record = load_json(f"steps-{shape}")
        if record is None:
            continue
        if shape == "tinyllama":
            entries, times = tinyllama_entries(record)
            source = (f"{record['layers']}-layer run replicated to {TINYLLAMA_LAYERS} layers"
                      if record["layers"] != TINYLLAMA_LAYERS else "22-layer run")
        else:
            entries, times = run_entries(record)
            source = f"{record['layers']}-layer run"
        total = sum(t for t, _ in times.values())
        writes = sum(w for _, w in times.values())
        largest = max(times.items(), key=lambda item: item[1][0])
        lines += [f"{title}, {record['method']}, {len(entries)} parameters, step times from a "
                  f"serial {record['threads']}-thread local {source} (load "
                  f"{record['load']:.1f}): read+merge {total:.1f} s, writes {writes:.1f} s; "
                  f"longest parameter {largest[0]} {largest[1][0]:.1f} s.", "",
                  "| workers N | max in flight | units | makespan (s) | speed-up vs N = 1 |",
                  "|---:|---:|---:|---:|---:|"]
        rows = projection(entries, times, workers)
        one = projection(entries, times, [1])[0][3]
        for n, in_flight, count, span in rows:
            lines.append(f"| {n} | {in_flight} | {count} | {span:.1f} | {one / span:.2f} |")
        lines.append("")
    measured = load_json("measured") or {}
    if measured:
        lines += ["| measured run | wall (s) | load at start | bytes equal to local, same "
                  "threads |", "|---|---:|---:|---|"]
        for key, row in measured.items():
            same = {None: "-", True: "yes", False: "no"}[row["same_bytes"]]
            lines.append(f"| {key} ({row['layers']} layers, {row['method']}) | "
                         f"{row['wall']:.1f} | {row['load']:.2f} | {same} |")
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out_md:
        args.out_md.write_text(text)


def save(name: str, data: object) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{name}.json").write_text(json.dumps(data, indent=1))


def load_json(name: str) -> dict | None:
    path = OUT / f"{name}.json"
    return json.loads(path.read_text()) if path.is_file() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("steps", "measure"):
        p = sub.add_parser(name)
        p.add_argument("--shape", choices=["gpt2", "tinyllama"], required=True)
        p.add_argument("--layers", type=int, help="default: 12 (gpt2), 2 (tinyllama)")
        p.add_argument("--method", default="ace")
        p.add_argument("--threads", type=int, default=1, help="torch threads (one worker's)")
        if name == "measure":
            p.add_argument("--executor", choices=["local", "ray"], default="local")
            p.add_argument("--workers", type=int, default=2)
    r = sub.add_parser("report")
    r.add_argument("--workers", default="1,2,8,64")
    r.add_argument("--out-md", type=Path)
    args = parser.parse_args()
    if args.command != "report" and args.layers is None:
        args.layers = 12 if args.shape == "gpt2" else 2
    {"steps": steps, "measure": measure, "report": report}[args.command](args)


if __name__ == "__main__":
    main()
