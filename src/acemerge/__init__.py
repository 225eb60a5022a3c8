"""acemerge: data-free model merging (ACE-Merging and its baselines) over real checkpoints."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse on a shared CPU when another process
# competes for the cores; passive waiting does not, but costs a third on an idle machine.
# GNU OpenMP (torch's on Linux) then spins briefly (GOMP_SPINCOUNT 1000) before sleeping:
# within 8% of the default idle and under 2x it loaded (scripts/bench_threads.py, measured
# in docs/benchmarks.md). Set before torch loads its OpenMP runtime, so it applies to the
# CLI and to programs that import acemerge before torch; an explicit OMP_WAIT_POLICY wins
# (and then GOMP_SPINCOUNT is left as it is).
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")

from acemerge import methods  # noqa: E402
from acemerge.api import (  # noqa: E402
    MergeResult,
    merge,
    merge_checkpoints,
    merge_state_dicts,
)
from acemerge.errors import AceMergeError  # noqa: E402

__all__ = ["AceMergeError", "MergeResult", "__version__", "merge", "merge_checkpoints",
           "merge_state_dicts", "methods"]
