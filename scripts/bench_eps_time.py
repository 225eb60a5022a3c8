"""Time ACE with eps=auto (each rule) against plain ACE, interleaved in one process.

The merge time of a model is the sum of ACE's per-matrix rule over its matrices (reading and
writing are the same for every eps), so this times the rule on one GPT-2-small block's four
matrix shapes ((2304, 768), (768, 768), (3072, 768), (768, 3072), all (d_out, d_in)) with
7 experts whose magnitudes differ per task (10**uniform(-3.5, -2), as
scripts/bench_methods.py), so some shapes take the heterogeneous branch. Each round runs
every setting once, in a rotating order; the ratio of each round's totals is reported
(median and range over rounds), never a time from another run.

    python scripts/bench_eps_time.py [--rounds 5] [--experts 7] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from acemerge.methods import get

SHAPES = ((2304, 768), (768, 768), (3072, 768), (768, 3072))
SETTINGS = {
    "paper eps 1e-5": {},
    "eps=auto ledoit_wolf": {"eps": "auto", "auto_rule": "ledoit_wolf"},
    "eps=auto oas": {"eps": "auto", "auto_rule": "oas"},
    "eps=auto mp_edge": {"eps": "auto", "auto_rule": "mp_edge"},
    "relative rho=1": {"eps": 1.0, "eps_mode": "relative"},
}


def task_vectors(shape: tuple[int, int], experts: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = 10 ** (torch.rand(experts, generator=gen) * 1.5 - 3.5)
    return [float(s) * torch.randn(shape, generator=gen) for s in scales]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--experts", type=int, default=7)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ace = get("ace")
    inputs = [task_vectors(shape, args.experts, seed) for seed, shape in enumerate(SHAPES)]
    names = list(SETTINGS)
    totals: dict[str, list[float]] = {name: [] for name in names}
    ace(inputs[1], **SETTINGS[names[0]])  # warm-up
    for round_index in range(args.rounds):
        order = names[round_index % len(names):] + names[:round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            for tvs in inputs:
                ace(tvs, **SETTINGS[name])
            totals[name].append(time.perf_counter() - start)
    base = totals[names[0]]
    print(f"ACE rule on one GPT-2-small block, {args.experts} experts, {args.rounds} rounds, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| setting | median s per block | ratio to paper eps (median, min-max) |")
    print("|---|---|---|")
    for name in names:
        ratios = [t / b for t, b in zip(totals[name], base, strict=True)]
        print(f"| {name} | {statistics.median(totals[name]):.2f} | "
              f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")


if __name__ == "__main__":
    main()
