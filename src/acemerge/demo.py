"""``acemerge demo``: merge small generated GPT-2 checkpoints with ACE and show per-layer stats.

The experts are the base plus low-rank task updates whose energies are alike in the
attention layers and spread over two orders of magnitude in the MLP layers, so both of
ACE's branches show up.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from acemerge.config import build_config
from acemerge.methods.ace import heterogeneity
from acemerge.plan import PlanEntry

N_EXPERTS = 4


def make_checkpoints(folder: Path, seed: int = 0) -> tuple[Path, list[Path]]:
    """Save a tiny GPT-2 base and ``N_EXPERTS`` experts as HF folders under ``folder``."""
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=128, n_head=4, n_positions=64, vocab_size=256,
                        bos_token_id=0, eos_token_id=0)
    base = GPT2LMHeadModel(config)
    base.save_pretrained(folder / "base")
    experts = []
    for task in range(N_EXPERTS):
        expert = GPT2LMHeadModel(config)
        expert.load_state_dict(base.state_dict())
        with torch.no_grad():
            for name, param in expert.named_parameters():
                param.add_(task_update(name, param.shape, task))
        expert.save_pretrained(folder / f"expert{task}")
        experts.append(folder / f"expert{task}")
    return folder / "base", experts


def task_update(name: str, shape: torch.Size, task: int) -> torch.Tensor:
    """A rank-4 update; MLP updates get task-dependent magnitudes (heterogeneous)."""
    if len(shape) != 2 or "wte" in name or "wpe" in name:
        return 1e-3 * torch.randn(shape)
    magnitude = 10.0 ** (task - 1) if ".mlp." in name else 1.0 + 0.1 * task
    left, right = torch.randn(shape[0], 4), torch.randn(4, shape[1])
    return magnitude * 1e-2 * (left @ right) / shape[1] ** 0.5


def run_demo(seed: int = 0) -> None:
    """Generate, merge with ACE, and print gamma, branch and time per merged matrix."""
    from acemerge.api import merge_from_config

    rows: list[tuple[str, str, float, str, float]] = []

    def observe(entry: PlanEntry, task_vectors: list[torch.Tensor], _: torch.Tensor,
                seconds: float) -> None:
        if task_vectors[0].dim() == 2 and entry.treatment.value == "matrix":
            stats = heterogeneity(task_vectors, tau=0.3)
            shape = "x".join(map(str, task_vectors[0].shape))
            branch = "heterogeneous" if stats.heterogeneous else "homogeneous"
            rows.append((entry.name, shape, stats.gamma, branch, seconds))

    with tempfile.TemporaryDirectory(prefix="acemerge-demo-") as tmp:
        base, experts = make_checkpoints(Path(tmp), seed)
        cfg = build_config(merge_method="ace", base_model=str(base),
                           models=[str(p) for p in experts])
        result = merge_from_config(cfg, Path(tmp) / "merged", observer=observe)
    width = max(len(r[0]) for r in rows)
    print(f"ACE-Merging of {N_EXPERTS} generated GPT-2 experts (tau = 0.3, eps = 1e-5)")
    print(f"{'parameter':<{width}}  {'d_out x d_in':>12}  {'gamma':>8}  {'branch':<13}  ms")
    for name, shape, gamma, branch, seconds in rows:
        print(f"{name:<{width}}  {shape:>12}  {gamma:8.3f}  {branch:<13}  {seconds * 1e3:.1f}")
    print(f"total: {len(result.plan.entries)} parameters in {result.seconds:.2f} s")
