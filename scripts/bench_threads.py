"""ACE on a shared CPU: torch's default threads against one thread, OMP_WAIT_POLICY=PASSIVE and
acemerge's default (PASSIVE with GOMP_SPINCOUNT=1000), idle and with a second merge running.

The workload is ACE's matrix rule on one GPT-2-small block (the four matrix shapes, 7
experts, magnitudes as scripts/bench_methods.py), run in a child process per measurement
(imports excluded from the seconds). "idle": the child alone; "loaded": two identical
children at once (two merges sharing the machine, both with the setting under test), the
mean of their times. Rounds rotate the order of the settings; medians over rounds, and
each setting's loaded / idle ratio, are printed.

    python scripts/bench_threads.py [--rounds 3] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = {
    "default": {},
    "1 thread": {"ACEMERGE_BENCH_THREADS": "1"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
    "acemerge: PASSIVE, GOMP_SPINCOUNT=1000": {"OMP_WAIT_POLICY": "PASSIVE",
                                               "GOMP_SPINCOUNT": "1000"},
}


def child(repeat: int) -> None:
    """Time ``repeat`` passes of ACE over one GPT-2-small block; print the seconds."""
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from ace_side_by_side import GPT2_BLOCK, task_vectors

    from acemerge.methods import get

    if os.environ.get("ACEMERGE_BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["ACEMERGE_BENCH_THREADS"]))
    ace = get("ace")
    params = ace.validate({})
    inputs = [task_vectors(shape, 7, i) for i, shape in enumerate(GPT2_BLOCK)]
    start = time.perf_counter()
    for _ in range(repeat):
        for tvs in inputs:
            ace.matrix_rule(tvs, params)
    print(json.dumps({"seconds": time.perf_counter() - start,
                      "threads": torch.get_num_threads()}))


def launch(setting: str, repeat: int) -> subprocess.Popen:
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}  # the setting decides
    env = {**inherited, **SETTINGS[setting]}
    return subprocess.Popen([sys.executable, __file__, "--child", str(repeat)], env=env,
                            stdout=subprocess.PIPE, text=True)


def seconds(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit("child failed")
    return json.loads(out.strip().splitlines()[-1])["seconds"]


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        child(int(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=2, help="passes over the block per child")
    args = parser.parse_args()
    names = list(SETTINGS)
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            times.setdefault((name, "idle"), []).append(seconds(launch(name, args.repeat)))
            pair = [launch(name, args.repeat) for _ in range(2)]
            times.setdefault((name, "loaded"), []).append(
                statistics.mean(seconds(p) for p in pair))
            print(f"  round {r + 1} {name}: idle {times[name, 'idle'][-1]:.2f} s, "
                  f"loaded {times[name, 'loaded'][-1]:.2f} s", file=sys.stderr, flush=True)
    print(f"ACE on one GPT-2-small block x {args.repeat}, 7 experts; {os.cpu_count()} CPUs; "
          f"medians of {args.rounds} rounds")
    print("| setting | idle s | loaded s (two merges at once) | loaded / idle |")
    print("|---|---:|---:|---:|")
    for name in names:
        idle = statistics.median(times[name, "idle"])
        loaded = statistics.median(times[name, "loaded"])
        print(f"| {name} | {idle:.2f} | {loaded:.2f} | {loaded / idle:.2f} |")


if __name__ == "__main__":
    main()
