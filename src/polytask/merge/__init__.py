"""Model merging: task vectors, streaming tensor IO and merge methods (data-free and data-driven).

Every public module in this package is imported, so a new method file registers itself.
"""

from __future__ import annotations

import importlib
import pkgutil

from polytask.merge._registry import DATA_DRIVEN, MERGE_METHODS, MergeEntry, register_merge

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["DATA_DRIVEN", "MERGE_METHODS", "MergeEntry", "register_merge"]
