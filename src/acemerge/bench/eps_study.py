"""ACE's eps on a suite: the paper's settings, the scale-free and automatic options, sweeps,
the oracle-best fixed eps (chosen on test, labelled as such), and the usual comparisons.

``acemerge bench SUITE --eps-study`` writes two tables (the study and its sweeps) and a
figure of normalized accuracy against eps and rho with the paper default, eps=paper and the
automatic rules marked.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from acemerge.bench.runner import Benchmark, BenchResult, Row
from acemerge.bench.suite import BuiltSuite
from acemerge.engine import Observer
from acemerge.methods.ace import AceParams, paper_eps
from acemerge.methods.shrinkage import auto_ridge_ratio
from acemerge.plan import PlanEntry, Treatment

ABSOLUTE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 4e-2, 1e-1, 1.0)
RELATIVE_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
AUTO_RULES = ("ledoit_wolf", "oas", "mp_edge")
COMPARED = ("tsv", "iso_c", "iso_cts", "cart", "ties", "task_arithmetic", "eigcov", "regmean")


@dataclass
class EpsStudy:
    """The study table, the sweep table, and the median rho each auto rule chose."""

    main: BenchResult
    sweeps: BenchResult
    auto_rho: dict[str, float] = field(default_factory=dict)


def rho_recorder(rule: str, into: list[float]) -> Observer:
    """An engine observer that records rule's rho for every task of every merged matrix."""
    def observe(entry: PlanEntry, task_vectors: list[torch.Tensor], merged: torch.Tensor,
                seconds: float) -> None:
        if entry.treatment is not Treatment.MATRIX:
            return
        for tv in task_vectors:
            centered = tv - tv.mean(dim=0, keepdim=True)
            rho = auto_ridge_ratio(rule, centered, centered.T @ centered)
            if rho is not None:
                into.append(rho)
    return observe


def _ace_row(bench: Benchmark, label: str, params: dict[str, Any], note: str = "",
             observer: Observer | None = None) -> Row:
    merged, seconds = bench.merge("ace", params, observer=observer)
    return bench.row(label, merged, method="ace", params=params, scale=1.0, note=note,
                     seconds=seconds)


def run_eps_study(built: BuiltSuite, *, compared: tuple[str, ...] = COMPARED,
                  tune: bool = True, log: Callable[[str], None] | None = None) -> EpsStudy:
    """Every row of the study (see the module docstring)."""
    bench = Benchmark(built)
    say = log or (lambda _: None)
    tasks = [t.name for t in built.tasks]
    main = BenchResult(built.name, tasks, bench.reference_rows())
    sweeps = BenchResult(built.name, tasks, [])
    resolved = paper_eps(bench.config)
    default = _ace_row(bench, "ace (paper default eps=1e-05)", {}, "fixed default")
    paper_label, paper_note = f"ace eps=paper (= {resolved:g})", \
        "the paper's per-model eps, from config.json"
    main.rows.append(default)
    if resolved == AceParams().eps:  # the same merge: score it once
        main.rows.append(replace(default, label=paper_label, params={"eps": "paper"},
                                 note=paper_note))
    else:
        main.rows.append(_ace_row(bench, paper_label, {"eps": "paper"}, paper_note))
    auto_rho = {}
    for rule in AUTO_RULES:
        rhos: list[float] = []
        main.rows.append(_ace_row(bench, f"ace eps=auto ({rule})",
                                  {"eps": "auto", "auto_rule": rule}, "per layer and task",
                                  observer=rho_recorder(rule, rhos)))
        auto_rho[rule] = statistics.median(rhos) if rhos else float("nan")
        say(f"eps=auto {rule}: {100 * main.rows[-1].mean_normalized:.1f} "
            f"(median rho {auto_rho[rule]:.3g})")
    main.rows.append(_ace_row(bench, "ace eps=auto (ledoit_wolf), log_std",
                              {"eps": "auto", "heterogeneity": "log_std"},
                              "scale-free branch statistic"))
    for rho in RELATIVE_GRID:
        sweeps.rows.append(_ace_row(bench, f"ace rho={rho:g} (relative)",
                                    {"eps": rho, "eps_mode": "relative"}))
    for eps in ABSOLUTE_GRID:
        sweeps.rows.append(_ace_row(bench, f"ace eps={eps:g}", {"eps": eps}))
    say("sweeps done: " + ", ".join(f"{r.label} {100 * r.mean_normalized:.1f}"
                                    for r in sweeps.rows))
    absolute = [r for r in sweeps.rows if "eps_mode" not in r.params]
    best = max(absolute, key=lambda r: r.mean_normalized)
    main.rows.append(replace(best, label=f"ace oracle-best eps={best.params['eps']:g}",
                             note="ORACLE: eps chosen on the test set"))
    for name in compared:
        params: dict[str, Any] = {}
        main.rows += bench.method_rows(name, params, tune)
        say(f"{name}: {100 * main.rows[-1].mean_normalized:.1f}")
    return EpsStudy(main, sweeps, auto_rho)


def plot_eps_study(study: EpsStudy, path: Path) -> None:
    """Normalized accuracy against absolute eps and relative rho (log axes), with the
    paper default, eps=paper, the auto rules and TSV-M marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_label = {r.label: r for r in study.main.rows}
    absolute = [r for r in study.sweeps.rows if "eps_mode" not in r.params]
    relative = [r for r in study.sweeps.rows if "eps_mode" in r.params]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.6), sharey=True)
    for ax, rows, key, title in ((left, absolute, "eps", "absolute eps (the paper's)"),
                                 (right, relative, "eps", "relative rho (scale-free)")):
        xs = [r.params[key] for r in rows]
        ys = [100 * r.mean_normalized for r in rows]
        errs = [200 * r.se_mean_normalized for r in rows]
        ax.errorbar(xs, ys, yerr=errs, marker="o", color="tab:red", capsize=3,
                    label="ACE (± 2 SE)")
        ax.set_xscale("log")
        ax.set_title(title)
        ax.set_xlabel(key if key == "eps" and ax is left else "rho")
        ax.grid(alpha=0.3)
    left.set_ylabel("normalized accuracy (%)")
    paper_row = next(r for r in study.main.rows if r.params == {"eps": "paper"})
    default = by_label["ace (paper default eps=1e-05)"]
    left.scatter([1e-5], [100 * default.mean_normalized], s=120, facecolors="none",
                 edgecolors="black", zorder=5, label="paper default (1e-5)")
    colors = {"ledoit_wolf": "tab:green", "oas": "tab:olive", "mp_edge": "tab:purple"}
    for rule, color in colors.items():
        row = by_label[f"ace eps=auto ({rule})"]
        for ax in (left, right):
            ax.axhline(100 * row.mean_normalized, color=color, linestyle="--", linewidth=1,
                       label=f"eps=auto {rule}" if ax is left else None)
        right.axvline(study.auto_rho[rule], color=color, linestyle=":", linewidth=1)
    left.axhline(100 * paper_row.mean_normalized, color="black", linestyle="-.",
                 linewidth=1, label=f"eps=paper ({paper_row.label.split('= ')[-1][:-1]})")
    tsv = by_label.get("tsv")
    if tsv is not None:
        for ax in (left, right):
            ax.axhline(100 * tsv.mean_normalized, color="tab:blue", linewidth=1,
                       label="TSV-M" if ax is left else None)
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=4, fontsize=8,
               frameon=False)
    right.text(0.02, 0.02, "dotted: median rho each auto rule chose", transform=right.transAxes,
               fontsize=7)
    fig.suptitle(f"{study.main.suite}: ACE normalized accuracy against eps")
    fig.tight_layout(rect=(0, 0.14, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
