"""Method benchmark: wall time and peak memory of every data-free method on a GPT-2-small base.

Generates (once, cached under ``--workdir``) a float32 GPT-2-small-shaped base as a Hugging
Face folder (``config.json`` from ``transformers.GPT2Config()`` defaults; tensor names and
shapes taken from a meta-device ``GPT2LMHeadModel``, Conv1D weights stored (d_in, d_out),
the tied ``lm_head`` left out) and seven experts, each the base plus a dense random task
vector whose magnitude is drawn per task and per tensor as 10**uniform(-3.5, -2), so that
task energies differ and ACE takes its heterogeneous branch on some layers.

Then, for every registered method without data statistics (``Method.needs`` empty; the
others are listed as skipped), runs the merge with the method's default parameters and
default scale, WUDI included at its default 300 Adam iterations per matrix (by far the
costliest). Each measurement runs in a fresh child process (this script, re-invoked with
``--child``) that imports acemerge and transformers first, then times
``acemerge.api.merge_from_config`` alone and reports its own peak RSS
(``getrusage(RUSAGE_SELF)``), so interpreter start and imports are not in the seconds
(their memory is in the peak: the baseline is printed below the table).

Prints a markdown table (method | seconds | peak RSS | notes) with the machine and the
command, and writes it to ``--out-md`` when given.

    python scripts/bench_methods.py [--methods ace,ties,...] [--repeat 1] [--layers 12]
        [--experts 7] [--workdir bench-out/methods] [--device cpu] [--threads N]
        [--timeout SECONDS] [--out-md FILE]

``--layers`` below 12 gives a smaller model for a quick check of the script itself.

``--ace-side-by-side [options]`` instead times ACE's matrix rule now, at an earlier
revision and as a direct evaluation of the paper's equations, interleaved in one process
(see scripts/ace_side_by_side.py for its options). ``--compare-rev REV`` runs every child
twice per repeat, alternating the current source with a git worktree of ``REV``, and prints
the ratio of each pair and the largest relative difference between the two merged models.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from acemerge.io.writers import ShardedSafetensorsWriter, TensorSpec

SEED = 0
#: log10 range of the per-task, per-tensor task-vector magnitude.
LOG10_MAGNITUDE = (-3.5, -2.0)
MAX_SHARD_BYTES = 2 * 1024**3  # GPT-2 small in float32 (0.5 GB) fits one file
GIB = 1024**3


# ---------------------------------------------------------------------------- inputs


def gpt2_config(layers: int) -> dict[str, Any]:
    """``config.json`` of ``GPT2Config()`` defaults with ``n_layer=layers``."""
    import transformers

    config = transformers.GPT2Config(n_layer=layers)
    config.architectures = ["GPT2LMHeadModel"]
    data = config.to_dict()
    data["torch_dtype"] = "float32"
    return data


def gpt2_specs(layers: int) -> list[TensorSpec]:
    """Names and shapes of a meta-device ``GPT2LMHeadModel``'s state dict, float32.

    A tensor that is the same parameter as an earlier one (the tied ``lm_head.weight``)
    is left out, as in the published GPT-2 checkpoints.
    """
    import transformers

    config = transformers.GPT2Config(n_layer=layers)
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(config)
    specs: list[TensorSpec] = []
    seen: set[int] = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        tied = config.tie_word_embeddings and name == "lm_head.weight"
        if id(tensor) in seen or tied:
            continue
        seen.add(id(tensor))
        specs.append(TensorSpec(name, tuple(tensor.shape), torch.float32))
    return specs


def base_value(spec: TensorSpec, index: int) -> torch.Tensor:
    """GPT-2-like initial values: LayerNorm weights 1, biases 0, other tensors N(0, 0.02)."""
    leaf = spec.name.rsplit(".", 2)
    if leaf[-2].startswith("ln_") and leaf[-1] == "weight":
        return torch.ones(spec.shape)
    if leaf[-1] == "bias":
        return torch.zeros(spec.shape)
    generator = torch.Generator().manual_seed(SEED * 1_000_003 + index)
    return 0.02 * torch.randn(spec.shape, generator=generator)


def generate(folder: Path, layers: int, n_experts: int) -> None:
    """Write the base and the experts tensor by tensor (all files open at once)."""
    if folder.exists():
        shutil.rmtree(folder)  # an incomplete earlier generation
    specs = gpt2_specs(layers)
    config = gpt2_config(layers)
    names = ["base"] + [f"expert{t}" for t in range(n_experts)]
    writers = []
    for name in names:
        (folder / name).mkdir(parents=True)
        writers.append(ShardedSafetensorsWriter(folder / name, specs, MAX_SHARD_BYTES))
    generators = [torch.Generator().manual_seed(SEED * 7919 + 1 + t) for t in range(n_experts)]
    low, high = LOG10_MAGNITUDE
    energies: dict[str, list[float]] = {}
    magnitudes: dict[str, list[float]] = {}
    for index, spec in enumerate(specs):
        base = base_value(spec, index)
        writers[0].add(spec.name, base)
        energies[spec.name], magnitudes[spec.name] = [], []
        for t, generator in enumerate(generators):
            u = float(torch.rand((), generator=generator))
            magnitude = 10 ** (low + (high - low) * u)
            task_vector = magnitude * torch.randn(spec.shape, generator=generator)
            writers[t + 1].add(spec.name, base + task_vector)
            norm = torch.linalg.vector_norm(task_vector, dtype=torch.float64)
            energies[spec.name].append(float(norm) ** 2)
            magnitudes[spec.name].append(magnitude)
            del task_vector
    for writer, name in zip(writers, names, strict=True):
        writer.close()
        (folder / name / "config.json").write_text(json.dumps(config, indent=2))
    meta = {"layers": layers, "experts": n_experts, "seed": SEED,
            "log10_magnitude": list(LOG10_MAGNITUDE), "energies": energies,
            "magnitudes": magnitudes}
    (folder / "meta.json").write_text(json.dumps(meta))  # written last: marks completion


def prepare(workdir: Path, layers: int, n_experts: int) -> tuple[Path, list[Path], dict]:
    """The cached inputs (generated when missing); returns base, experts and meta."""
    folder = workdir / f"gpt2-{layers}L-{n_experts}x-seed{SEED}"
    if not (folder / "meta.json").is_file():
        start = time.perf_counter()
        print(f"generating {folder} ...", file=sys.stderr, flush=True)
        generate(folder, layers, n_experts)
        print(f"generated in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    meta = json.loads((folder / "meta.json").read_text())
    return folder / "base", [folder / f"expert{t}" for t in range(n_experts)], meta


def ace_branches(base: Path, meta: dict) -> tuple[int, int]:
    """(heterogeneous matrices, all matrices) for ACE at its default tau."""
    from acemerge import methods
    from acemerge.methods.ace import heterogeneity_gamma
    from acemerge.plan import Treatment, build_plan

    config = json.loads((base / "config.json").read_text())
    specs = gpt2_specs(config["n_layer"])
    plan = build_plan([(s.name, s.shape, s.dtype) for s in specs], config=config)
    tau = methods.get("ace").defaults()["tau"]
    matrices = [e.name for e in plan.entries if e.treatment is Treatment.MATRIX]
    hetero = sum(
        heterogeneity_gamma(torch.tensor(meta["energies"][name], dtype=torch.float64)) > tau
        for name in matrices
    )
    return hetero, len(matrices)


# ---------------------------------------------------------------------------- child


def rss_kib_now() -> int | None:
    """Current resident set size (Linux), KiB."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_kib(who: int) -> int:
    """``ru_maxrss`` in KiB (macOS reports bytes)."""
    peak = resource.getrusage(who).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


def child_main(argv: list[str]) -> None:
    """One measurement: merge once, print a JSON line with seconds and peak RSS."""
    parser = argparse.ArgumentParser(prog="bench_methods.py --child")
    parser.add_argument("--method", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--expert", action="append", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from acemerge import methods
    from acemerge.api import merge_from_config
    from acemerge.config import build_config

    # The plan builds the architecture on the meta device: import it before the clock.
    getattr(transformers, "GPT2LMHeadModel")  # noqa: B009 - triggers the lazy import
    method = methods.get(args.method)
    cfg = build_config(merge_method=args.method, base_model=args.base, models=args.expert,
                       scale=method.default_scale, device=args.device)
    cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
    rss_before = rss_kib_now()
    start = time.perf_counter()
    merge_from_config(cfg, args.out)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    result = {
        "method": args.method, "seconds": seconds,
        "peak_rss_kib": peak_rss_kib(resource.RUSAGE_SELF), "rss_before_kib": rss_before,
        "torch_threads": torch.get_num_threads(), "scale": method.default_scale,
        "cuda_peak_bytes": torch.cuda.max_memory_allocated() if cuda else None,
    }
    print(json.dumps(result), flush=True)


# ---------------------------------------------------------------------------- parent


@dataclass
class Row:
    """One line of the table."""

    method: str
    runs: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    status: str = "ok"  # ok, skipped, failed

    def seconds(self) -> str:
        times = [run["seconds"] for run in self.runs]
        if not times:
            return "-"
        if len(times) == 1:
            return f"{times[0]:.2f}"
        return f"{statistics.median(times):.2f} ({min(times):.2f}-{max(times):.2f})"

    def peak(self) -> str:
        peaks = [run["peak_rss_kib"] for run in self.runs]
        return f"{max(peaks) * 1024 / GIB:.2f}" if peaks else "-"


def run_child(method: str, base: Path, experts: list[Path], out: Path,
              args: argparse.Namespace, source: Path | None = None,
              keep: bool = False) -> dict[str, Any]:
    """One fresh child process (importing acemerge from ``source``, a ``src`` folder, when
    given); its JSON result, or ``{"error": ...}``. The output is removed unless ``keep``."""
    if out.exists():
        shutil.rmtree(out)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--method", method,
           "--base", str(base), "--out", str(out), "--device", args.device]
    cmd += [a for e in experts for a in ("--expert", str(e))]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    env = None
    if source is not None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            [str(source), *filter(None, [os.environ.get("PYTHONPATH")])])}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                              env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout:g} s"}
    finally:
        if out.exists() and not keep:
            shutil.rmtree(out)
    if proc.stderr.strip():
        sys.stderr.write(proc.stderr)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": f"exit {proc.returncode}: {last}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def select_methods(requested: str | None) -> list[str]:
    """The methods to run: all registered ones, or the comma-separated subset."""
    from acemerge import methods

    names = methods.available()
    if not requested:
        return names
    chosen = [n.strip() for n in requested.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in names]
    if unknown:
        raise SystemExit(f"unknown method(s) {', '.join(unknown)} "
                         f"(available: {', '.join(names)})")
    return chosen


def method_notes(name: str, hetero: tuple[int, int], n_experts: int) -> list[str]:
    """What the reader of the table should know about one method's run."""
    from acemerge import methods

    method = methods.get(name)
    notes = []
    if method.default_scale != 1.0:
        notes.append(f"scale {method.default_scale:g} (method default)")
    if name == "ace":
        notes.append(f"heterogeneous branch on {hetero[0]}/{hetero[1]} matrices "
                     f"(tau {method.defaults()['tau']:g})")
    if name == "wudi":
        iterations = method.defaults()["iterations"]
        notes.append(f"{iterations} Adam iterations per matrix (default): cost grows "
                     "linearly with iterations")
    if method.prepare is not None:
        notes.append("whole-model pre-pass over the task vectors")
    return notes


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_lines(rows: list[Row], args: argparse.Namespace, load: str) -> list[str]:
    import acemerge

    threads = sorted({run["torch_threads"] for row in rows for run in row.runs})
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    mem = "unknown"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
    except OSError:
        pass
    return [
        f"- CPU: {cpu_model()}; nproc {os.cpu_count()}"
        + (f" (usable {affinity})" if affinity is not None else "") + f"; memory {mem}",
        f"- torch {torch.__version__}, torch threads in the child "
        f"{', '.join(map(str, threads)) or 'n/a'}; device {args.device}; "
        f"Python {platform.python_version()}; acemerge {acemerge.__version__}",
        f"- load average at start: {load}",
    ]


def render(rows: list[Row], args: argparse.Namespace, meta: dict, base: Path,
           load: str) -> str:
    specs = gpt2_specs(meta["layers"])
    n_params = sum(s.nbytes for s in specs) // 4
    disk = sum(p.stat().st_size for p in base.glob("*.safetensors")) / GIB
    repeat = f"median of {args.repeat} runs, min-max" if args.repeat > 1 else "one run"
    lines = [
        f"GPT-2-small-shaped base: {meta['layers']} layers, {n_params / 1e6:.1f} M parameters "
        f"float32 ({disk:.2f} GiB on disk); {meta['experts']} experts = base + random task "
        f"vectors, magnitude 10**uniform({LOG10_MAGNITUDE[0]:g}, {LOG10_MAGNITUDE[1]:g}) per "
        "task and tensor. Method defaults throughout.",
        "",
        f"| method | seconds ({repeat}) | peak RSS (GiB) | notes |",
        "|---|---:|---:|---|",
    ]
    for row in rows:
        lines.append(f"| {row.method} | {row.seconds()} | {row.peak()} | "
                     f"{'; '.join(row.notes)} |")
    baselines = [run["rss_before_kib"] for row in rows for run in row.runs
                 if run.get("rss_before_kib")]
    lines += [
        "",
        "Seconds: wall time of `merge_from_config` inside a fresh child process (reading the "
        "inputs, merging, writing the output), interpreter start and imports excluded. Peak "
        "RSS: the child's `ru_maxrss`, which includes the interpreter and imports"
        + (f" (about {max(baselines) * 1024 / GIB:.2f} GiB before the merge started)"
           if baselines else "") + ".",
        "",
        "Machine:",
        *machine_lines(rows, args, load),
        "",
        "Command:",
        "",
        f"    {shlex.join([sys.executable, *sys.argv])}",
    ]
    return "\n".join(lines) + "\n"


def revision_source(rev: str, workdir: Path) -> Path:
    """The ``src`` folder of a git worktree of ``rev`` (created under ``workdir`` once)."""
    root = Path(__file__).resolve().parents[1]
    sha = subprocess.run(["git", "rev-parse", "--short", rev], cwd=root, check=True,
                         capture_output=True, text=True).stdout.strip()
    tree = (workdir / f"rev-{sha}").resolve()
    if not tree.is_dir():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=root,
                       check=True, capture_output=True)
    return tree / "src"


def largest_difference(merged: Path, reference: Path) -> float:
    """max over tensors of max |merged - reference| / max |reference| (0 for equal ones)."""
    from safetensors import safe_open

    worst = 0.0
    for file in sorted(reference.glob("*.safetensors")):
        with safe_open(file, "pt") as ref, safe_open(merged / file.name, "pt") as new:
            for name in ref.keys():  # noqa: SIM118 (safe_open has no __iter__)
                expected, actual = ref.get_tensor(name).double(), new.get_tensor(name).double()
                scale = float(expected.abs().max())
                if scale > 0:
                    worst = max(worst, float((actual - expected).abs().max()) / scale)
    return worst


def compare_revisions(chosen: list[str], base: Path, experts: list[Path], out: Path,
                      args: argparse.Namespace) -> None:
    """Each method's whole merge now and at ``--compare-rev``, alternating per repeat, and
    the largest relative difference between the two outputs."""
    source = revision_source(args.compare_rev, args.workdir)
    print(f"| method | now s (runs) | {args.compare_rev} s (runs) | now / {args.compare_rev} "
          "(median of pairs, min-max) | max rel. diff of outputs |")
    print("|---|---|---|---|---:|")
    folders = {"now": out.with_name(f"{out.name}-now"), "rev": out.with_name(f"{out.name}-rev")}
    for name in chosen:
        times: dict[str, list[float]] = {"now": [], "rev": []}
        for r in range(args.repeat):
            order = ("now", "rev") if r % 2 == 0 else ("rev", "now")
            for kind in order:
                result = run_child(name, base, experts, folders[kind], args,
                                   source if kind == "rev" else None, keep=True)
                if "error" in result:
                    raise SystemExit(f"{name} ({kind}): {result['error']}")
                times[kind].append(result["seconds"])
                print(f"  {name} {kind}: {result['seconds']:.2f} s", file=sys.stderr,
                      flush=True)
        ratios = [a / b for a, b in zip(times["now"], times["rev"], strict=True)]
        difference = largest_difference(folders["now"], folders["rev"])
        for folder in folders.values():
            shutil.rmtree(folder)
        print(f"| {name} | {', '.join(f'{t:.1f}' for t in times['now'])} | "
              f"{', '.join(f'{t:.1f}' for t in times['rev'])} | "
              f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) | "
              f"{difference:.1e} |", flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child_main(sys.argv[2:])
        return
    if sys.argv[1:2] == ["--ace-side-by-side"]:
        sys.path.insert(0, str(Path(__file__).parent))
        from ace_side_by_side import main as side_by_side

        side_by_side(sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--methods", help="comma-separated subset (default: every method)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per method (default 1)")
    parser.add_argument("--layers", type=int, default=12, help="12 = GPT-2 small")
    parser.add_argument("--experts", type=int, default=7, help="number of experts (default 7)")
    parser.add_argument("--workdir", type=Path, default=Path("bench-out/methods"))
    parser.add_argument("--device", default="cpu", help="merge device (default cpu)")
    parser.add_argument("--threads", type=int, help="torch threads in the child (default: torch's)")
    parser.add_argument("--timeout", type=float,
                        help="seconds per child process (start and imports included)")
    parser.add_argument("--out-md", type=Path, help="also write the table to this file")
    parser.add_argument("--compare-rev", metavar="REV",
                        help="also run each child with acemerge at git revision REV, "
                        "alternating, and print the ratios")
    args = parser.parse_args()
    if args.repeat < 1 or args.layers < 1 or args.experts < 2:
        parser.error("--repeat and --layers must be >= 1, --experts >= 2")

    from acemerge import AceMergeError, methods
    from acemerge.engine import check_expert_count

    load = " ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    chosen = select_methods(args.methods)
    base, experts, meta = prepare(args.workdir, args.layers, args.experts)
    hetero = ace_branches(base, meta)
    out = args.workdir / "merged"
    if args.compare_rev:
        compare_revisions(chosen, base, experts, out, args)
        return
    rows: list[Row] = []
    for i, name in enumerate(chosen):
        method = methods.get(name)
        row = Row(name)
        rows.append(row)
        if method.needs:
            row.status = "skipped"
            row.notes.append(f"skipped: needs per-task statistics from data "
                             f"({', '.join(method.needs)})")
            continue
        try:
            check_expert_count(method, args.experts)
        except AceMergeError as exc:
            row.status = "skipped"
            row.notes.append(f"skipped: {exc}")
            continue
        row.notes = method_notes(name, hetero, args.experts)
        for r in range(args.repeat):
            print(f"[{i + 1}/{len(chosen)}] {name} run {r + 1}/{args.repeat} ...",
                  file=sys.stderr, flush=True)
            result = run_child(name, base, experts, out, args)
            if "error" in result:
                row.status = "failed"
                row.notes.append(f"FAILED: {result['error']}")
                break
            row.runs.append(result)
            print(f"    {result['seconds']:.2f} s, peak RSS "
                  f"{result['peak_rss_kib'] / 1024**2:.2f} GiB", file=sys.stderr, flush=True)
            if result.get("cuda_peak_bytes") is not None and r == 0:
                row.notes.append(f"GPU peak {result['cuda_peak_bytes'] / GIB:.2f} GiB")
    table = render(rows, args, meta, base, load)
    print(table, end="")
    (args.workdir / "results.json").write_text(json.dumps(
        [{"method": r.method, "status": r.status, "notes": r.notes, "runs": r.runs}
         for r in rows], indent=2))
    if args.out_md:
        args.out_md.parent.mkdir(parents=True, exist_ok=True)
        args.out_md.write_text(table)
    if any(row.status == "failed" for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
