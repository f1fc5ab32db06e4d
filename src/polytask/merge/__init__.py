"""Model merging: task vectors, streaming tensor IO and merge methods (data-free and data-driven).

Every public module in this package is imported, so a new method file registers itself.

    from polytask.merge import merge, merge_checkpoints, merge_state_dicts
    merge("merge.yaml")                                          # the `polytask merge` config file
    merge_checkpoints("ties", "base/", ["ft1/", "ft2/"], "out/", density=0.2, dtype="bf16")
    merged = merge_state_dicts("task-arithmetic", base_sd, [sd1, sd2], lam=0.5)
"""

from __future__ import annotations

import importlib
import pkgutil

from polytask.merge._config import load_merge_config, merge
from polytask.merge._data import MergeData, TaskData
from polytask.merge._engine import TensorContext, layer_index, merge_checkpoints, merge_state_dicts
from polytask.merge._registry import DATA_DRIVEN, MERGE_METHODS, MergeEntry, register_merge

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "DATA_DRIVEN",
    "MERGE_METHODS",
    "MergeData",
    "MergeEntry",
    "TaskData",
    "TensorContext",
    "layer_index",
    "load_merge_config",
    "merge",
    "merge_checkpoints",
    "merge_state_dicts",
    "register_merge",
]
