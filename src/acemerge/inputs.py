"""A merge's inputs from its config: opened here, or described for opening elsewhere.

``InputSource`` is what a worker process needs to open the same inputs itself: the config
(with absolute paths) and any statistics given in memory rather than as files.
"""

from __future__ import annotations

from dataclasses import dataclass

from acemerge import methods
from acemerge.config import MergeConfig
from acemerge.errors import AceMergeError
from acemerge.io.adapters import open_expert
from acemerge.io.readers import Checkpoint, open_checkpoint
from acemerge.methods.registry import MethodParams
from acemerge.plan import Plan, build_plan
from acemerge.statistics import StatisticsProvider
from acemerge.work import MergeInputs, TensorParams


def open_inputs(cfg: MergeConfig) -> tuple[Checkpoint, list[Checkpoint]]:
    """Open the base and the experts named by a config (headers only; an expert may be a
    LoRA adapter folder on the base)."""
    base = open_checkpoint(cfg.base_model)
    return base, [open_expert(p, base, cfg.allow_base_mismatch) for p in cfg.expert_paths]


def plan_for(cfg: MergeConfig, base: Checkpoint) -> Plan:
    """The plan for a config's base checkpoint."""
    specs = base.specs()
    return build_plan(
        [(name, shape, dtype) for name, (shape, dtype) in specs.items()],
        config=base.config, exclude=cfg.exclude, default_excludes=cfg.default_excludes,
        conv1d_as_stored=cfg.conv1d_as_stored,
    )


def scheduled_params(cfg: MergeConfig, base: Checkpoint) -> TensorParams:
    """Per-tensor (params, scale) of a mergekit config: its filters and gradients resolved
    for each tensor, ``lambda`` as the scale (validated once per distinct setting)."""
    from acemerge.mergekit_schema import schedule_of

    method = methods.get(cfg.merge_method)
    schedule = schedule_of(cfg, base.config)
    cache: dict[str, tuple[MethodParams, float]] = {}

    def params_for(name: str) -> tuple[MethodParams, float]:
        values = schedule.for_tensor(name)
        scale = float(values.pop("lambda", 1.0))
        key = repr(sorted(values.items())) + f"|{scale}"
        if key not in cache:
            try:
                cache[key] = (method.validate(values), scale)
            except AceMergeError as exc:
                raise AceMergeError(f"{exc} (tensor {name})") from None
        return cache[key]

    return params_for


@dataclass(frozen=True)
class InputSource:
    """How to open a merge's inputs in any process (picklable)."""

    config: MergeConfig
    #: Statistics given in memory (None: the config's statistics files, if any).
    statistics: StatisticsProvider | None = None

    @classmethod
    def of(cls, cfg: MergeConfig, statistics: StatisticsProvider | None = None
           ) -> InputSource:
        """The source of a config, its local paths made absolute (the same on any node)."""
        absolute = cfg.with_absolute_paths()
        if cfg.mergekit:
            from acemerge.mergekit_schema import absolute_document

            absolute = absolute.model_copy(update={"mergekit": absolute_document(cfg.mergekit)})
        return cls(absolute, statistics)

    def open(self) -> MergeInputs:
        """The inputs opened in this process: checkpoints, statistics, per-tensor params."""
        base, experts = open_inputs(self.config)
        stats: StatisticsProvider | None = self.statistics or self.config.load_statistics()
        tensor_params = scheduled_params(self.config, base) if self.config.mergekit else None
        return MergeInputs(base, experts, stats, tensor_params)
