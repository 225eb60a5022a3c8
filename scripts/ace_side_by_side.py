"""ACE side by side on the GPT-2-small x7 workload: acemerge's ACE now, acemerge's ACE at an
earlier revision, and a direct evaluation of the paper's equations, interleaved.

The direct evaluation (``direct_ace`` below, written from Algorithm 1 of arXiv 2603.02945)
has the operation count of the authors' code as the issue describes it: per task three full
products (the Gram C^T C, the numerator C Sigma_reg, the residual's D Sigma~), an explicit
inverse of the system, and a full float32 SVD of W_fused when heterogeneous. The third
product is formed in both branches, as the authors' timings indicate (their homogeneous run
took 0.74x their heterogeneous one; skipping it would give about 0.5x); "direct, 2 products"
is the stricter reference that skips it when homogeneous (the two differ only in the
homogeneous setting, where both are timed). The earlier revision's ``ace.py`` is read with
``git show`` and executed as a module of its own. Inputs: the 48 matrices of GPT-2 small as
(d_out, d_in), 7 random task vectors each with magnitudes 10**uniform(-3.5, -2) per task (as
scripts/bench_methods.py); the branch is forced with tau (0: heterogeneous on every
matrix, 1e9: homogeneous), so each setting is timed on its own. Every matrix is merged by
each implementation in a rotating order; per round the totals are summed; the min and
median over rounds and the ratios of the per-round totals are printed, with the largest
relative difference (max |x - y| / max |y|) of each output to a float64 evaluation of the
current rule on the first layer's matrices.

    python scripts/bench_methods.py --ace-side-by-side [--rounds 3] [--layers 12]
        [--before-rev dfa7c08] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import torch

from acemerge.methods import get

GPT2_BLOCK = ((2304, 768), (768, 768), (3072, 768), (768, 3072))  # c_attn, attn/mlp c_proj, c_fc
SETTINGS = {"heterogeneous": 0.0, "homogeneous": 1e9}
Rule = Callable[[list[torch.Tensor], float], torch.Tensor]


def task_vectors(shape: tuple[int, int], experts: int, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    scales = 10 ** (torch.rand(experts, generator=gen) * 1.5 - 3.5)
    return [float(s) * torch.randn(shape, generator=gen) for s in scales]


def direct_ace(tvs: list[torch.Tensor], tau: float, eps: float = 1e-5, k_frac: float = 0.3,
               residual_always: bool = True) -> torch.Tensor:
    """Algorithm 1 evaluated as written: three full products per task (the third only when
    heterogeneous with ``residual_always=False``), explicit inverse, full SVD in the input
    dtype."""
    n, (d_out, d_in) = len(tvs), tvs[0].shape
    energies = torch.stack([tv.double().pow(2).sum() for tv in tvs])
    logs = torch.log(energies + 1e-12)
    heterogeneous = float(logs.var() / (logs.mean() ** 2 + 1e-12)) > tau  # Eq. 7
    eye = torch.eye(d_in, dtype=tvs[0].dtype)
    sum_reg, numerator = torch.zeros(d_in, d_in), torch.zeros(d_out, d_in)
    prior, weighted, total = torch.zeros(d_in), torch.zeros(d_out, d_in), torch.zeros(d_out, d_in)
    for tv in tvs:
        centered = tv - tv.mean(dim=0, keepdim=True)  # Eq. 5
        proxy = centered.T @ centered  # Eq. 6 (product 1)
        trace = float(torch.trace(proxy)) + 1e-12
        scaled, eps_t = (proxy / trace, eps / trace) if heterogeneous else (proxy, eps)  # 8-10
        reg = scaled + eps_t * eye
        sum_reg += reg
        numerator += centered @ reg  # product 2
        prior += scaled.mean(dim=0)  # Eq. 11
        if heterogeneous or residual_always:
            weighted += tv @ scaled  # product 3 (Eq. 16)
            total += tv
    if heterogeneous:
        prior /= float(energies.mean()) + 1e-12  # Eq. 12
    merged = numerator @ torch.linalg.inv(sum_reg + prior.unsqueeze(0))  # Eqs. 13-14
    if not heterogeneous:
        return merged
    fused = merged + weighted - total @ (sum_reg / n)  # Eq. 17
    u, s, vh = torch.linalg.svd(fused, full_matrices=False)
    k = int(min(d_out, d_in) * k_frac)
    return merged + s[:k].mean() * (u[:, :k] @ vh[:k])  # Eqs. 18-19


def rule_at_revision(rev: str) -> Rule:
    """ACE's matrix rule as it was at git revision ``rev`` (run as a separate module)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:src/acemerge/methods/ace.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    source = source.replace("METHOD = register(", "METHOD = (")  # not registered twice
    module = types.ModuleType(f"ace_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"ace.py@{rev}", "exec"), module.__dict__)  # noqa: S102
    params_type = module.AceParams

    def rule(tvs: list[torch.Tensor], tau: float) -> torch.Tensor:
        return module.ace_matrix(tvs, params_type(tau=tau))

    return rule


def current_rule() -> Rule:
    ace = get("ace")
    return lambda tvs, tau: ace.matrix_rule(tvs, ace.validate({"tau": tau}))


def relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y).abs().max() / y.abs().max())


def run(rules: dict[str, Rule], layers: int, experts: int, rounds: int, tau: float
        ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Per-round totals of each rule and each rule's largest difference to float64."""
    names = list(rules)
    totals = {name: [0.0] * rounds for name in names}
    errors = dict.fromkeys(names, 0.0)
    shapes = [shape for _ in range(layers) for shape in GPT2_BLOCK]
    for index, shape in enumerate(shapes):
        tvs = task_vectors(shape, experts, index)
        reference = current_rule()([tv.double() for tv in tvs], tau) \
            if index < len(GPT2_BLOCK) else None
        for r in range(rounds):
            shift = (index + r) % len(names)
            for name in names[shift:] + names[:shift]:
                start = time.perf_counter()
                out = rules[name](tvs, tau)
                totals[name][r] += time.perf_counter() - start
                if reference is not None and r == 0:
                    errors[name] = max(errors[name], relative(out, reference))
        print(f"  {index + 1}/{len(shapes)} matrices", file=sys.stderr, end="\r", flush=True)
    print(file=sys.stderr)
    return totals, errors


def report(setting: str, totals: dict[str, list[float]], errors: dict[str, float]) -> None:
    """A markdown table: times, per-round ratios to each direct evaluation, differences."""
    references = [name for name in totals if name.startswith("direct")]
    print(f"\n{setting} branch on every matrix")
    print("| implementation | min s | median s | "
          + "".join(f"ratio to {ref} (median, min-max) | " for ref in references)
          + "max rel. diff to float64 (layer 0) |")
    print("|---|---:|---:|" + "---|" * len(references) + "---:|")
    for name, times in totals.items():
        cells = []
        for ref in references:
            ratios = [t / d for t, d in zip(times, totals[ref], strict=True)]
            cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-"
                         f"{max(ratios):.2f}) | ")
        print(f"| {name} | {min(times):.1f} | {statistics.median(times):.1f} | "
              + "".join(cells) + f"{errors[name]:.1e} |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12, help="12 = GPT-2 small")
    parser.add_argument("--experts", type=int, default=7)
    parser.add_argument("--before-rev", default="dfa7c08",
                        help="the earlier acemerge revision to compare (default: dfa7c08)")
    parser.add_argument("--settings", default="heterogeneous,homogeneous")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rules = {"direct": lambda tvs, tau: direct_ace(tvs, tau),
             f"acemerge {args.before_rev}": rule_at_revision(args.before_rev),
             "acemerge now": current_rule()}
    print(f"ACE side by side: GPT-2-small shapes x {args.layers} layers, {args.experts} "
          f"experts, {args.rounds} rounds, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    for setting in args.settings.split(","):
        if setting == "homogeneous":
            rules["direct, 2 products"] = lambda tvs, tau: direct_ace(tvs, tau,
                                                                      residual_always=False)
        totals, errors = run(rules, args.layers, args.experts, args.rounds, SETTINGS[setting])
        report(setting, totals, errors)


if __name__ == "__main__":
    main()
