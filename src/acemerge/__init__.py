"""acemerge: data-free model merging (ACE-Merging and its baselines) over real checkpoints."""

import os

__version__ = "0.1.0"

# OpenMP threads that spin while waiting collapse on a shared CPU when another process
# competes for the cores; passive waiting does not (scripts/bench_threads.py, measured in
# docs/benchmarks.md). Set before torch loads its OpenMP runtime, so it applies to the CLI
# and to programs that import acemerge before torch; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

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
