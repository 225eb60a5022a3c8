"""acemerge: data-free model merging (ACE-Merging and its baselines) over real checkpoints."""

__version__ = "0.1.0"

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
