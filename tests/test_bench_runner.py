"""The benchmark protocol on a synthetic suite: rows, tuned lambda on validation, reports."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from acemerge.bench.report import write_report
from acemerge.bench.runner import LAMBDA_GRID, run_benchmark, run_sweep
from acemerge.bench.suite import BuiltSuite, Task
from acemerge.inspect import format_layer_table, layer_stats, write_figures
from acemerge.io.readers import open_checkpoint
from acemerge.plan import build_plan

D_IN, HIDDEN = 6, 12


def encoder(state: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x @ state["enc.0.weight"].T + state["enc.0.bias"])


class ToySuite(BuiltSuite):
    """Three linear-label tasks on Gaussian inputs; experts fine-tune the encoder + head."""

    def __init__(self, folder: Path) -> None:
        gen = torch.Generator().manual_seed(0)
        self.data = {}
        self.heads = []
        base = {"enc.0.weight": 0.5 * torch.randn(HIDDEN, D_IN, generator=gen),
                "enc.0.bias": torch.zeros(HIDDEN)}
        save_file(base, str(_mk(folder / "base") / "model.safetensors"))
        experts = []
        for t, steps in enumerate((40, 120, 300)):
            w = torch.randn(D_IN, generator=gen)
            x = torch.randn(600, D_IN, generator=gen) + t
            y = (x @ w > (x @ w).median()).long()
            self.data[t] = {"train": (x[:300], y[:300]), "val": (x[300:450], y[300:450]),
                            "test": (x[450:], y[450:])}
            state, head = self._finetune(base, *self.data[t]["train"], steps)
            self.heads.append(head)
            path = _mk(folder / f"expert{t}")
            save_file(state, str(path / "model.safetensors"))
            experts.append(path)
        tasks = [Task(f"task{t}", "toy", 2) for t in range(3)]
        super().__init__("toy", folder, tasks, folder / "base", experts)

    @staticmethod
    def _finetune(base, x, y, steps):
        state = {k: v.clone().requires_grad_(True) for k, v in base.items()}
        head = torch.nn.Linear(HIDDEN, 2)
        opt = torch.optim.Adam([*state.values(), *head.parameters()], lr=1e-2)
        for _ in range(steps):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(head(encoder(state, x)), y).backward()
            opt.step()
        return {k: v.detach() for k, v in state.items()}, head

    @torch.no_grad()
    def evaluate(self, enc, task, split="test"):
        x, y = self.data[task][split]
        return float((self.heads[task](encoder(enc, x)).argmax(1) == y).float().mean())

    def n_examples(self, task, split="test"):
        return len(self.data[task][split][1])

    def statistics(self, kinds):
        raise NotImplementedError


def _mk(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    torch.manual_seed(0)
    return ToySuite(tmp_path_factory.mktemp("toy"))


def test_rows_experts_normalize_to_one_and_tuned_rows_use_the_grid(toy, tmp_path):
    result = run_benchmark(toy, ["ace", "task_arithmetic", "average"])
    labels = [r.label for r in result.rows]
    assert labels == ["base (zero-shot)", "individual experts", "ace", "task_arithmetic",
                      "task_arithmetic (tuned)", "average"]
    experts = result.rows[1]
    assert experts.normalized == [1.0, 1.0, 1.0]
    assert all(e > b for e, b in zip(experts.accuracy, result.rows[0].accuracy, strict=True))
    tuned = result.rows[4]
    assert tuned.scale in LAMBDA_GRID and result.rows[3].scale == 0.3
    for row in result.rows:
        assert all(abs(n - a / e) < 1e-12 for n, a, e in
                   zip(row.normalized, row.accuracy, experts.accuracy, strict=True))
    paths = write_report(result, tmp_path / "report")
    assert all(p.is_file() and p.stat().st_size > 0 for p in paths)
    saved = json.loads(paths[2].read_text())
    assert saved["rows"][2]["label"] == "ace" and len(saved["rows"][2]["accuracy"]) == 3
    assert "| ace |" in paths[0].read_text()


def test_tuned_lambda_maximizes_validation_accuracy(toy):
    result = run_benchmark(toy, ["task_arithmetic"])
    tuned = result.rows[-1]
    sweep = run_sweep(toy, "task_arithmetic", "scale", list(LAMBDA_GRID))
    from acemerge.bench.runner import Benchmark

    bench = Benchmark(toy)
    val_best = max(sum(bench.score(_merge(bench, lam), "val")) for lam in LAMBDA_GRID)
    assert sum(bench.score(_merge(bench, tuned.scale), "val")) == pytest.approx(val_best)
    assert len(sweep.rows) == 2 + len(LAMBDA_GRID)


def _merge(bench, lam):
    return bench.merge("task_arithmetic", {}, lam)[0]


def test_ablation_sweep_has_a_row_per_rung(toy):
    result = run_sweep(toy, "ace", "ablation", ["E1", "E2", "E3", "E4"])
    assert [r.label for r in result.rows[2:]] == [f"ace ablation=E{i}" for i in range(1, 5)]


def test_inspect_reports_every_matrix_and_writes_figures(toy, tmp_path):
    base = open_checkpoint(toy.base_dir)
    experts = [open_checkpoint(d) for d in toy.expert_dirs]
    plan = build_plan([(n, s, d) for n, (s, d) in base.specs().items()])
    rows = layer_stats(base, experts, plan, tau=0.0)  # tau 0: every layer heterogeneous
    assert [r.name for r in rows] == ["enc.0.weight"] and rows[0].heterogeneous
    assert len(rows[0].energies) == 3
    assert "1 of 1 matrices" in format_layer_table(rows, 0.0)
    paths = write_figures(base, experts, plan, rows, tmp_path / "fig", tau=0.0)
    assert [p.name for p in paths] == ["gamma.png", "spectrum.png"]


def test_bench_command_on_tiny_digits_writes_reports(tmp_path, capsys):
    from acemerge.cli import main

    out = tmp_path / "out"
    code = main(["bench", "digits", "--tiny", "--methods", "ace,average,ties", "--no-tune",
                 "--cache", str(tmp_path / "cache"), "--out", str(out), "-q"])
    assert code == 0
    table = capsys.readouterr().out
    for label in ("| base (zero-shot) |", "| individual experts |", "| ace |", "| ties |"):
        assert label in table
    saved = json.loads((out / "results.json").read_text())
    experts = saved["rows"][1]["accuracy"]
    base = saved["rows"][0]["accuracy"]
    assert all(e > b for e, b in zip(experts, base, strict=True))
    assert {p.name for p in out.iterdir()} >= {"results.md", "results.csv", "gamma.png"}


def test_standard_errors_are_binomial_per_task_combined_over_tasks():
    from acemerge.bench.runner import Row

    row = Row("r", "ace", {}, 1.0, accuracy=[0.8, 0.5], normalized=[0.8 / 0.9, 0.5 / 0.5],
              n_test=[100, 400])
    se_acc = [(0.8 * 0.2 / 100) ** 0.5, (0.5 * 0.5 / 400) ** 0.5]
    assert row.se_mean_accuracy == pytest.approx((se_acc[0] ** 2 + se_acc[1] ** 2) ** 0.5 / 2)
    se_norm = [se_acc[0] / 0.9, se_acc[1] / 0.5]
    assert row.se_mean_normalized == pytest.approx((se_norm[0] ** 2 + se_norm[1] ** 2) ** 0.5 / 2)


def test_wins_count_only_differences_beyond_two_standard_errors():
    from acemerge.bench.report import markdown_table, wins
    from acemerge.bench.runner import BenchResult, Row

    def row(label, acc, method="m"):
        return Row(label, method, {}, None, accuracy=[acc], normalized=[acc], n_test=[400])

    # SE of one task at 0.5 with n=400 is 0.025; the difference's SE ~0.035, 2 SE ~0.071
    result = BenchResult("s", ["t"], [row("ref", 0.1, method=None), row("a", 0.60),
                                       row("b", 0.55), row("c", 0.50)])
    assert wins(result) == {1: 1, 2: 0, 3: 0}
    assert "± 2.5" in markdown_table(result)


def test_eps_study_rows_and_figure(toy, tmp_path):
    from acemerge.bench.eps_study import (
        ABSOLUTE_GRID,
        AUTO_RULES,
        RELATIVE_GRID,
        plot_eps_study,
        run_eps_study,
    )

    study = run_eps_study(toy, compared=("tsv",), tune=False)
    labels = [r.label for r in study.main.rows]
    assert "ace (paper default eps=1e-05)" in labels and "ace eps=paper (= 1e-05)" in labels
    assert all(f"ace eps=auto ({rule})" in labels for rule in AUTO_RULES)
    assert len(study.sweeps.rows) == len(ABSOLUTE_GRID) + len(RELATIVE_GRID)
    oracle = next(r for r in study.main.rows if r.label.startswith("ace oracle-best"))
    absolute = [r for r in study.sweeps.rows if "eps_mode" not in r.params]
    assert oracle.mean_normalized == max(r.mean_normalized for r in absolute)
    assert "ORACLE" in oracle.note and labels[-1] == "tsv"
    assert all(rho > 0 for rho in study.auto_rho.values())
    plot_eps_study(study, tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 10_000


def test_default_methods_leave_out_slerp_but_a_named_one_runs():
    from acemerge.bench.cli import choose_methods

    defaults = choose_methods(None, data_free=True)
    assert "slerp" not in defaults and "ace" in defaults and "regmean" not in defaults
    assert choose_methods("slerp,ace", data_free=False) == ["slerp", "ace"]
