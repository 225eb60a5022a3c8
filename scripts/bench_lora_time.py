"""Time ACE on LoRA experts: the low-rank rule against the dense rule, interleaved.

Four rank-16 adapters on one TinyLlama-1.1B decoder layer's matrices (q/o 2048 x 2048,
k/v 256 x 2048, gate/up 5632 x 2048, down 2048 x 5632; a 1.1B model has 22 such layers, so
a whole merge scales both times by about 22), with task magnitudes spread so some matrices
take the heterogeneous branch. Each round times both rules on every matrix, in alternating
order; the ratio of each round's totals is reported (median, range), and the largest
relative difference between the two outputs (float32 inputs; the dense rule in float32, as
the engine's default, and in float64 as a reference).

    python scripts/bench_lora_time.py [--rounds 3] [--rank 16] [--adapters 4] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from acemerge.methods import get
from acemerge.methods.registry import Factored

SHAPES = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "v_proj": (256, 2048),
          "o_proj": (2048, 2048), "gate_proj": (5632, 2048), "up_proj": (5632, 2048),
          "down_proj": (2048, 5632)}


def adapters(shape: tuple[int, int], count: int, rank: int, seed: int) -> list[Factored]:
    gen = torch.Generator().manual_seed(seed)
    d_out, d_in = shape
    scales = 10 ** (torch.rand(count, generator=gen) * 1.5 - 2.5)
    return [Factored(float(s) * torch.randn(d_out, rank, generator=gen) / rank ** 0.5,
                     torch.randn(rank, d_in, generator=gen) / d_in ** 0.5) for s in scales]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--adapters", type=int, default=4)
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    ace = get("ace")
    params = ace.validate({})
    inputs = {name: adapters(shape, args.adapters, args.rank, i)
              for i, (name, shape) in enumerate(SHAPES.items())}
    low_times, dense_times = [], []
    worst32 = worst64 = 0.0
    for round_index in range(args.rounds):
        order = ("low", "dense") if round_index % 2 == 0 else ("dense", "low")
        totals = {"low": 0.0, "dense": 0.0}
        for parts in inputs.values():
            outputs = {}
            for kind in order:
                start = time.perf_counter()
                if kind == "low":
                    outputs[kind] = ace.low_rank_rule(parts, params).dense()
                else:
                    outputs[kind] = ace.matrix_rule([p.dense() for p in parts], params)
                totals[kind] += time.perf_counter() - start
            if round_index == 0:
                reference = ace.matrix_rule([p.dense().double() for p in parts], params)
                scale = float(reference.abs().max())
                worst64 = max(worst64, float((outputs["low"].double() - reference).abs().max())
                              / scale)
                worst32 = max(worst32, float((outputs["dense"].double() - reference).abs()
                                             .max()) / scale)
        low_times.append(totals["low"])
        dense_times.append(totals["dense"])
    ratios = [d / low for d, low in zip(dense_times, low_times, strict=True)]
    print(f"ACE, {args.adapters} LoRA experts of rank {args.rank}, one TinyLlama-1.1B layer "
          f"({len(SHAPES)} matrices), {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"dense rule: {statistics.median(dense_times):.2f} s per layer (median)")
    print(f"low-rank rule: {statistics.median(low_times):.3f} s per layer (median)")
    print(f"speed-up dense / low-rank: {statistics.median(ratios):.1f}x "
          f"(range {min(ratios):.1f}-{max(ratios):.1f})")
    print(f"max relative difference to the float64 dense rule: low-rank {worst64:.1e}, "
          f"float32 dense {worst32:.1e}")


if __name__ == "__main__":
    main()
