"""Benchmark reports: markdown, CSV, JSON and a bar chart of normalized accuracy (and,
for LoRA experts, the low-rank vs dense merge timings)."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from acemerge.bench.runner import BenchResult, Row, Timing


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _with_se(value: float, se: float) -> str:
    return f"{100 * value:.1f} ± {100 * se:.1f}"


def beats(a: Row, b: Row) -> bool:
    """Whether ``a``'s mean normalized accuracy exceeds ``b``'s by more than two standard
    errors of the difference (independent errors: conservative for paired test sets)."""
    se = math.hypot(a.se_mean_normalized, b.se_mean_normalized)
    return a.mean_normalized - b.mean_normalized > 2 * se


def wins(result: BenchResult) -> dict[int, int]:
    """Per merged row (by index): how many other merged rows it beats beyond 2 SE."""
    merged = [i for i, r in enumerate(result.rows) if r.method is not None]
    return {i: sum(beats(result.rows[i], result.rows[j]) for j in merged if j != i)
            for i in merged}


def markdown_table(result: BenchResult) -> str:
    """Accuracy per task (%), average accuracy and average normalized accuracy, each average
    with its standard error, and the wins beyond 2 SE among the merged rows."""
    head = ["method", *result.tasks, "avg acc ± SE", "avg norm ± SE", "wins", "lambda", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    won = wins(result)
    for index, row in enumerate(result.rows):
        scale = "" if row.scale is None else f"{row.scale:g}"
        cells = [row.label, *map(_pct, row.accuracy),
                 _with_se(row.mean_accuracy, row.se_mean_accuracy),
                 _with_se(row.mean_normalized, row.se_mean_normalized),
                 str(won[index]) if index in won else "", scale, row.note]
        lines.append("| " + " | ".join(cells) + " |")
    merged_count = len(won)
    lines.append(f"\nSE: binomial per task, combined over tasks. wins: of the other "
                 f"{max(merged_count - 1, 0)} merged rows, how many this row beats by more "
                 "than 2 SE of the difference; smaller differences are ties.")
    if result.timings:
        lines.append("\n" + timing_table(result))
    return "\n".join(lines)


TIMING_COLUMNS = ("method", "low-rank s", "dense s", "dense / low-rank",
                  "max rel diff (weights)", "max rel diff (update)")


def _timing_cells(timing: Timing) -> list[str]:
    return [timing.method, f"{timing.low_rank_seconds:.4f}", f"{timing.dense_seconds:.4f}",
            f"{timing.ratio:.2f}", f"{timing.max_rel_diff:.2e}",
            f"{timing.max_rel_diff_update:.2e}"]


def timing_table(result: BenchResult) -> str:
    """Low-rank rule vs dense rule on the LoRA experts: seconds, ratio, agreement."""
    lines = ["| " + " | ".join(TIMING_COLUMNS) + " |", "|" + "---|" * len(TIMING_COLUMNS)]
    lines += ["| " + " | ".join(_timing_cells(t)) + " |" for t in result.timings]
    repeats = result.timings[0].repeats
    lines.append(f"\nEach method merged through the engine on the LoRA experts with its "
                 f"low-rank rule and with low_rank=False (task vectors materialized, dense "
                 f"rule), interleaved; seconds: the fastest of {repeats} merges each. "
                 "max rel diff: max over tensors of max|low-rank - dense| over the larger max "
                 "magnitude of the two (weights; updates: minus the base).")
    return "\n".join(lines)


def timing_csv_text(result: BenchResult) -> str:
    """One line per timed method (the columns of :func:`timing_table`)."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["suite", *TIMING_COLUMNS, "repeats"])
    for t in result.timings:
        writer.writerow([result.suite, t.method, t.low_rank_seconds, t.dense_seconds,
                         t.ratio, t.max_rel_diff, t.max_rel_diff_update, t.repeats])
    return buffer.getvalue()


def csv_text(result: BenchResult) -> str:
    """One line per row and task: accuracy and normalized accuracy."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["suite", "row", "method", "lambda", "task", "accuracy", "normalized"])
    for row in result.rows:
        for task, acc, norm in zip(result.tasks, row.accuracy, row.normalized, strict=True):
            writer.writerow([result.suite, row.label, row.method or "", row.scale or "",
                             task, f"{acc:.6f}", f"{norm:.6f}"])
    return buffer.getvalue()


def plot_normalized(result: BenchResult, path: Path) -> None:
    """Bar chart of the average normalized accuracy per method row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows: list[Row] = [r for r in result.rows if r.label != "individual experts"]
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(rows)), 4))
    colors = ["tab:red" if r.method == "ace" else "tab:gray" if r.method is None
              else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [100 * r.mean_normalized for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), [r.label for r in rows], rotation=60, ha="right",
                  fontsize=8)
    ax.axhline(100, color="black", linestyle="--", linewidth=0.8)
    ax.set_ylabel("normalized accuracy (%)")
    ax.set_title(f"{result.suite}: merged / expert accuracy, mean over tasks")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(result: BenchResult, out: Path, stem: str = "results") -> list[Path]:
    """``{stem}.md``, ``.csv``, ``.json`` and ``{stem}_normalized.png`` under ``out``, and
    ``{stem}_timing.csv`` when the result has low-rank vs dense timings."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem}.md", out / f"{stem}.csv", out / f"{stem}.json",
             out / f"{stem}_normalized.png"]
    paths[0].write_text(markdown_table(result) + "\n")
    paths[1].write_text(csv_text(result))
    paths[2].write_text(result.to_json())
    plot_normalized(result, paths[3])
    if result.timings:
        paths.append(out / f"{stem}_timing.csv")
        paths[-1].write_text(timing_csv_text(result))
    return paths
