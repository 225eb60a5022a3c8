"""Diagnostics of a set of experts: per-layer heterogeneity, branch, energies, spectra.

``acemerge inspect`` and the benchmark's figures use these: the per-layer gamma of the
task vectors against tau (the paper's Fig. 1), and the singular spectrum of ACE's W_pre
against the final merge for one heterogeneous layer (Fig. 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acemerge.engine import check_compatible
from acemerge.io.readers import Checkpoint
from acemerge.methods.ace import AceParams, ace_matrix, heterogeneity
from acemerge.plan import Plan, PlanEntry, Treatment
from acemerge.work import TaskVectorReader


@dataclass(frozen=True)
class LayerStats:
    """Stage-1 statistics of one merged matrix."""

    name: str
    shape: tuple[int, int]
    gamma: float
    heterogeneous: bool
    energies: list[float]


def layer_stats(base: Checkpoint, experts: list[Checkpoint], plan: Plan, tau: float = 0.3
                ) -> list[LayerStats]:
    """Gamma, branch and per-task energy of every matrix the plan merges (streamed)."""
    check_compatible(base, experts, plan)
    reader = TaskVectorReader(base, experts, torch.float32, torch.device("cpu"))
    out = []
    for entry in matrix_entries(plan):
        task_vectors = reader.read(entry)
        stats = heterogeneity(task_vectors, tau)
        out.append(LayerStats(entry.name, tuple(task_vectors[0].shape), stats.gamma,
                              stats.heterogeneous, stats.energies.tolist()))
    return out


def matrix_entries(plan: Plan) -> list[PlanEntry]:
    return [e for e in plan.entries if e.treatment is Treatment.MATRIX]


def spectra(task_vectors: list[torch.Tensor], params: AceParams | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Singular values of ACE's preliminary W_pre and of its final merge (Fig. 2)."""
    params = params or AceParams()
    pre = ace_matrix(task_vectors, params.model_copy(update={"spectral_refinement": False}))
    final = ace_matrix(task_vectors, params)
    return torch.linalg.svdvals(pre.double()), torch.linalg.svdvals(final.double())


def format_layer_table(rows: list[LayerStats], tau: float) -> str:
    """A text table: parameter, shape, gamma, branch and task energies."""
    width = max((len(r.name) for r in rows), default=9)
    lines = [f"{'parameter':<{width}}  {'shape':>11}  {'gamma':>8}  {'branch':<13}  energies"]
    for r in rows:
        branch = "heterogeneous" if r.heterogeneous else "homogeneous"
        energies = " ".join(f"{e:.3g}" for e in r.energies)
        lines.append(f"{r.name:<{width}}  {r.shape[0]:>5}x{r.shape[1]:<5}  {r.gamma:8.3f}  "
                     f"{branch:<13}  {energies}")
    n_het = sum(r.heterogeneous for r in rows)
    lines.append(f"{n_het} of {len(rows)} matrices take the heterogeneous branch (tau = {tau:g})")
    return "\n".join(lines)


#: gamma is drawn on a log axis; values below this floor (e.g. exactly 0) sit on it.
GAMMA_FLOOR = 1e-4


def gamma_figure(rows: list[LayerStats], tau: float, title: str = "") -> Any:
    """The gamma bar chart as a matplotlib figure: log axis, ticks at 1, 2 and 5 per decade
    labelled as plain numbers (0.2, 0.5, 1, 2, ...)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, len(rows) * 0.18), 3.6))
    colors = ["tab:red" if r.heterogeneous else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [max(r.gamma, GAMMA_FLOOR) for r in rows], color=colors,
           bottom=0)
    ax.axhline(tau, color="black", linestyle="--", label=f"tau = {tau:g}")
    ax.set_xlabel("merged matrix (model order)")
    ax.set_ylabel("heterogeneity gamma")
    ax.set_yscale("log")
    ax.set_ylim(top=2 * max([tau, *(r.gamma for r in rows)]))  # tau's line stays in view
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0), numticks=12))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_title(title or "Per-layer task heterogeneity (red: heterogeneous branch)")
    ax.legend()
    fig.tight_layout()
    return fig


def plot_gamma(rows: list[LayerStats], tau: float, path: Path, title: str = "") -> None:
    """Per-layer gamma against the threshold tau (the paper's Fig. 1), saved to ``path``."""
    fig = gamma_figure(rows, tau, title)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)


def plot_spectrum(pre: torch.Tensor, final: torch.Tensor, path: Path, layer: str) -> None:
    """Singular spectra of W_pre and the final ACE merge for one layer (Fig. 2)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.semilogy(pre.numpy(), label="W_pre (closed form)")
    ax.semilogy(final.numpy(), label="final (spectral refinement)")
    ax.set_xlabel("index")
    ax.set_ylabel("singular value")
    ax.set_title(f"Spectrum of {layer}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def most_heterogeneous(rows: list[LayerStats]) -> LayerStats | None:
    """The heterogeneous layer with the largest gamma (None if none is heterogeneous)."""
    het = [r for r in rows if r.heterogeneous]
    return max(het, key=lambda r: r.gamma) if het else None


def write_figures(base: Checkpoint, experts: list[Checkpoint], plan: Plan, rows: list[LayerStats],
                  out: Path, tau: float = 0.3, params: AceParams | None = None) -> list[Path]:
    """gamma.png and, when a layer is heterogeneous, spectrum.png under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "gamma.png"]
    plot_gamma(rows, tau, paths[0])
    layer = most_heterogeneous(rows)
    if layer is not None:
        entry = next(e for e in plan.entries if e.name == layer.name)
        reader = TaskVectorReader(base, experts, torch.float32, torch.device("cpu"))
        pre, final = spectra(reader.read(entry), params)
        paths.append(out / "spectrum.png")
        plot_spectrum(pre, final, paths[1], layer.name)
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
