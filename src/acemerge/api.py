"""The Python API: merge in-memory state dicts, or checkpoints on disk into a HF folder."""

from __future__ import annotations

import os
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from acemerge import methods
from acemerge.config import DTYPES, MergeConfig, build_config
from acemerge.engine import MergeStep, Observer, merge_stream, resolve_device
from acemerge.executors.base import Executor
from acemerge.executors.factory import make_executor
from acemerge.executors.local import LocalExecutor
from acemerge.inputs import open_inputs, plan_for, scheduled_params
from acemerge.io.adapter_writer import LoraAdapterWriter
from acemerge.io.model_folder import write_model_folder_extras
from acemerge.io.readers import Checkpoint, StateDictCheckpoint
from acemerge.io.writers import (
    DEFAULT_MAX_SHARD_BYTES,
    ShardedSafetensorsWriter,
    TensorSpec,
    check_output_folder,
    check_output_is_not_input,
    staged_output_folder,
)
from acemerge.plan import Plan
from acemerge.statistics import StatisticsProvider

__all__ = ["MergeResult", "format_plan", "merge", "merge_checkpoints", "merge_from_config",
           "merge_state_dicts", "open_inputs", "plan_for"]


@dataclass
class MergeResult:
    """What a merge on disk produced."""

    out: Path
    plan: Plan
    steps: list[MergeStep]
    seconds: float

    def __repr__(self) -> str:
        counts = self.plan.counts()
        return (f"MergeResult(out={str(self.out)!r}, parameters={len(self.plan.entries)} "
                f"({counts['matrix']} matrix, {counts['other']} other, {counts['keep']} kept), "
                f"seconds={self.seconds:.1f})")


def merge_state_dicts(
    base: dict[str, torch.Tensor],
    experts: list[dict[str, torch.Tensor]],
    method: str = "ace",
    scale: float | None = None,
    *,
    exclude: tuple[str, ...] = (),
    config: dict | None = None,
    compute_dtype: str = "float32",
    device: str = "auto",
    observer: Observer | None = None,
    statistics: StatisticsProvider | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge in-memory state dicts; returns the merged state dict (base dtypes).

    ``scale`` is the scaling coefficient lambda (None: the method's default, 1.0 for ACE).

    2-D ``*.weight`` tensors are treated as (d_out, d_in) linear weights unless a
    ``config`` (a ``config.json`` dict) tells the architecture; ``exclude`` adds patterns
    of parameters kept at their base value. ``statistics`` feeds data-dependent methods
    (RegMean, Fisher), see :mod:`acemerge.statistics`.
    """
    base_ckpt = StateDictCheckpoint(base, "base")
    base_ckpt.config = config
    expert_ckpts: list[Checkpoint] = [
        StateDictCheckpoint(sd, f"expert {i}") for i, sd in enumerate(experts)
    ]
    return merge_checkpoints(base_ckpt, expert_ckpts, method, scale, exclude=exclude,
                             compute_dtype=compute_dtype, device=device, observer=observer,
                             statistics=statistics, **params)


def merge_checkpoints(
    base: Checkpoint,
    experts: list[Checkpoint],
    method: str = "ace",
    scale: float | None = None,
    *,
    exclude: tuple[str, ...] = (),
    compute_dtype: str = "float32",
    device: str = "auto",
    low_rank: bool = True,
    observer: Observer | None = None,
    statistics: StatisticsProvider | None = None,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge opened checkpoints (LoRA adapters from :func:`open_expert` included) into an
    in-memory state dict; ``base.config`` tells the architecture. ``low_rank=False``
    materializes LoRA task vectors for the dense rule (see ``MergeConfig.low_rank``);
    the rest is as in :func:`merge_state_dicts`."""
    cfg = build_config(
        merge_method=method, base_model="<memory>",
        models=[f"<memory {i}>" for i in range(len(experts))],
        parameters=params, scale=scale, compute_dtype=compute_dtype, device=device,
        exclude=list(exclude), low_rank=low_rank,
    )
    merged: dict[str, torch.Tensor] = {}
    _run(cfg, base, experts, merged.__setitem__, observer=observer, statistics=statistics)
    return merged


def merge(
    base: str | os.PathLike,
    experts: list[str | os.PathLike],
    out: str | os.PathLike,
    method: str = "ace",
    scale: float | None = None,
    *,
    overwrite: bool = False,
    progress: bool = False,
    statistics: StatisticsProvider | None = None,
    **options: Any,
) -> MergeResult:
    """Merge checkpoints on disk into a Hugging Face model folder at ``out``.

    ``options`` holds the method's parameters and any of the config fields ``dtype``,
    ``compute_dtype``, ``device``, ``exclude``, ``default_excludes``, ``conv1d_as_stored``,
    and how to run: ``executor`` ("local" or "ray"), ``workers``, ``max_in_flight``,
    ``ray_address``. ``statistics`` feeds data-dependent methods (RegMean, Fisher).
    """
    config_fields = set(MergeConfig.model_fields) - {"merge_method", "base_model", "models"}
    fields = {k: options.pop(k) for k in list(options) if k in config_fields}
    cfg = build_config(
        merge_method=method, base_model=str(base), models=[str(e) for e in experts],
        parameters=options, scale=scale, **fields,
    )
    return merge_from_config(cfg, out, overwrite=overwrite, progress=progress,
                             statistics=statistics)


def merge_from_config(
    cfg: MergeConfig,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: bool = False,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    observer: Observer | None = None,
    statistics: StatisticsProvider | None = None,
    other_inputs: Iterable[str | os.PathLike] = (),
    copy_tokenizer: bool = True,
    write_card: bool = True,
    executor: Executor | None = None,
) -> MergeResult:
    """Run a validated config into ``out`` (written to a staging folder, then moved).

    ``out`` may not be, contain or lie inside any input (checkpoints, statistics files,
    ``other_inputs`` such as the config file), whatever ``overwrite`` says. ``executor``
    runs the per-parameter work (default: the one ``cfg.executor`` names; a given one is
    used as it is and closed by the caller).
    """
    import time

    out = Path(out)
    start = time.perf_counter()
    base, experts = open_inputs(cfg)
    inputs = [*base.sources(), *(p for e in experts for p in e.sources()),
              *map(Path, cfg.statistics), *map(Path, other_inputs)]
    check_output_is_not_input(out, inputs)
    check_output_folder(out, overwrite)
    given_statistics = statistics
    statistics = statistics or cfg.load_statistics()
    plan = plan_for(cfg, base)
    out_dtype = DTYPES[cfg.dtype] if cfg.dtype else None
    specs = [
        TensorSpec(e.name, e.shape, out_dtype if out_dtype and e.dtype.is_floating_point
                   else e.dtype)
        for e in plan.entries
    ]
    with staged_output_folder(out, overwrite) as staging:
        lora = cfg.out_format == "lora"
        writer: LoraAdapterWriter | ShardedSafetensorsWriter
        if lora:
            rank = None if cfg.out_rank in (None, "exact") else int(cfg.out_rank)
            writer = LoraAdapterWriter(staging, plan, base, cfg.base_model, rank)
        else:
            writer = ShardedSafetensorsWriter(staging, specs, max_shard_bytes)
        with nullcontext(executor) if executor else make_executor(cfg, given_statistics) as ex:
            steps = _run(cfg, base, experts, writer.add, plan=plan, progress=progress,
                         observer=observer, statistics=statistics, emit_updates=lora,
                         executor=ex)
        writer.close()
        write_model_folder_extras(
            staging, base, cfg, plan, copy_tokenizer=copy_tokenizer, write_card=write_card,
            adapter_energy=writer.energy if isinstance(writer, LoraAdapterWriter) else None)
    return MergeResult(out=out, plan=plan, steps=steps, seconds=time.perf_counter() - start)


def _run(
    cfg: MergeConfig,
    base: Checkpoint,
    experts: list[Checkpoint],
    emit: Any,
    *,
    plan: Plan | None = None,
    progress: bool = False,
    observer: Observer | None = None,
    statistics: StatisticsProvider | None = None,
    emit_updates: bool = False,
    executor: Executor | None = None,
) -> list[MergeStep]:
    """The merge of opened inputs through the engine (``executor``: default local)."""
    method = methods.get(cfg.merge_method)
    params = method.for_model(method.validate(cfg.parameters), base.config)
    plan = plan or plan_for(cfg, base)
    local = executor is None or isinstance(executor, LocalExecutor)
    return merge_stream(
        base, experts, method, params, plan, emit,
        scale=cfg.resolved_scale, compute_dtype=DTYPES[cfg.compute_dtype],
        device=resolve_device(cfg.device) if local else cfg.device,
        dtype=DTYPES[cfg.dtype] if cfg.dtype else None,
        progress=progress, observer=observer, stats=statistics,
        tensor_params=scheduled_params(cfg, base) if cfg.mergekit else None,
        emit_updates=emit_updates, low_rank=cfg.low_rank, executor=executor,
    )


def format_plan(plan: Plan, method_name: str) -> str:
    """The plan as a table: parameter, shape, treatment (for ``--dry-run``)."""
    method = methods.get(method_name)
    labels = {"matrix": method.name, "other": method.other_rule_name, "keep": "keep base"}
    width = max((len(e.name) for e in plan.entries), default=10)
    lines = [f"profile: {plan.profile}; exclude: {', '.join(plan.exclude) or 'none'}"]
    for e in plan.entries:
        shape = "x".join(map(str, e.shape)) or "scalar"
        lines.append(f"{e.name:<{width}}  {shape:>14}  {labels[e.treatment.value]:<9}  {e.reason}")
    counts = plan.counts()
    lines.append(
        f"{len(plan.entries)} parameters ({plan.total_numel:,} values): "
        f"{counts['matrix']} {method.name}, {counts['other']} {method.other_rule_name}, "
        f"{counts['keep']} kept"
    )
    return "\n".join(lines)
