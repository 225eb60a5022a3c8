"""The executor a merge config asks for."""

from __future__ import annotations

from acemerge.config import MergeConfig
from acemerge.errors import AceMergeError
from acemerge.executors.base import Executor
from acemerge.executors.local import LocalExecutor
from acemerge.inputs import InputSource
from acemerge.statistics import StatisticsProvider

RAY_INSTALL = "pip install 'acemerge[ray]'"


def make_executor(cfg: MergeConfig, statistics: StatisticsProvider | None = None) -> Executor:
    """The executor a config asks for; ``statistics``: those given in memory, if any."""
    if cfg.executor == "local":
        return LocalExecutor(overlap={"auto": None, "on": True, "off": False}[cfg.overlap])
    try:
        from acemerge.executors.ray_executor import RayExecutor
    except ImportError as exc:
        if (exc.name or "").partition(".")[0] != "ray":
            raise
        raise AceMergeError(f"executor 'ray' needs Ray, which is not installed: "
                            f"{RAY_INSTALL}") from None
    return RayExecutor(InputSource.of(cfg, statistics), address=cfg.ray_address,
                       workers=cfg.workers, max_in_flight=cfg.max_in_flight, device=cfg.device)
