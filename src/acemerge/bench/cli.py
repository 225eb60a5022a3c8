"""The ``acemerge bench`` command's work: choose methods, run, write reports and figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from acemerge import methods
from acemerge.bench.report import markdown_table, write_report
from acemerge.bench.runner import BenchResult, run_benchmark, run_sweep
from acemerge.bench.suite import BuiltSuite, Progress
from acemerge.errors import AceMergeError
from acemerge.parsing import parse_value


def choose_methods(names: str | None, data_free: bool) -> list[str]:
    """Methods to run: the named ones (validated) or every registered one that merges a
    suite's experts (SLERP, which interpolates the base with ONE model, is left out)."""
    if names:
        chosen = [n.strip() for n in names.split(",") if n.strip()]
        for name in chosen:
            methods.get(name)
    else:
        chosen = [n for n in methods.available() if methods.get(n).max_experts is None]
    return [n for n in chosen if not (data_free and methods.get(n).needs)]


def parse_sweep(text: str) -> tuple[str, str, list[Any]]:
    """``method.key=v1,v2`` -> (method, key, values)."""
    target, sep, values = text.partition("=")
    method, dot, key = target.partition(".")
    if not (sep and dot and key and values):
        raise AceMergeError(f"--sweep expects method.key=v1,v2,..., got {text!r}")
    methods.get(method)
    return method, key, [parse_value(v) for v in values.split(",")]


def suite_figures(built: BuiltSuite, out: Path) -> list[Path]:
    """The suite's per-layer gamma (Fig. 1) and one layer's spectra (Fig. 2)."""
    from acemerge import inspect as diagnostics
    from acemerge.api import open_inputs, plan_for
    from acemerge.config import build_config

    cfg = build_config(base_model=str(built.base_dir),
                       models=[str(p) for p in built.expert_dirs], exclude=built.exclude)
    base, experts = open_inputs(cfg)
    plan = plan_for(cfg, base)
    rows = diagnostics.layer_stats(base, experts, plan)
    return diagnostics.write_figures(base, experts, plan, rows, out)


def run_bench_command(built: BuiltSuite, names: str | None, data_free: bool,
                      settings: dict[str, dict[str, Any]], sweep: str | None, tune: bool,
                      out: Path | None, progress: bool = False, eps_study: bool = False
                      ) -> str:
    """Run the benchmark (or a sweep), write the reports, return the markdown table."""
    for method, params in settings.items():
        methods.get(method).validate(params)
    if eps_study:
        return run_eps_study_command(built, tune, out, progress)
    if sweep:
        method, key, values = parse_sweep(sweep)
        result: BenchResult = run_sweep(built, method, key, values, settings.get(method))
        stem = f"sweep_{method}_{key}"
    else:
        result = run_benchmark(built, choose_methods(names, data_free), settings, tune=tune,
                               log=Progress("bench", progress))
        stem = "results"
    text = f"## {built.name}\n\n{markdown_table(result)}\n"
    if out is not None:
        paths = write_report(result, out, stem)
        if not sweep:
            paths += suite_figures(built, out)
        text += "\n" + "\n".join(f"wrote {p}" for p in paths) + "\n"
    return text


def run_eps_study_command(built: BuiltSuite, tune: bool, out: Path | None,
                          progress: bool) -> str:
    """ACE's eps study (bench/eps_study.py): two tables, and a figure under ``out``."""
    from acemerge.bench.eps_study import plot_eps_study, run_eps_study

    study = run_eps_study(built, tune=tune, log=Progress("eps-study", progress))
    rhos = ", ".join(f"{rule} {rho:.3g}" for rule, rho in study.auto_rho.items())
    text = (f"## {built.name}: ACE eps study\n\n{markdown_table(study.main)}\n\n"
            f"Median rho chosen by eps=auto: {rhos}.\n\n### Sweeps\n\n"
            f"{markdown_table(study.sweeps)}\n")
    if out is not None:
        paths = write_report(study.main, out, "eps_study")
        paths += write_report(study.sweeps, out, "eps_sweeps")
        paths.append(out / "eps_study_curve.png")
        plot_eps_study(study, paths[-1])
        text += "\n" + "\n".join(f"wrote {p}" for p in paths) + "\n"
    return text
