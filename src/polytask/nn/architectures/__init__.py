"""Multi-task architectures, one file per method; importing this package registers them all.

Every module in this package is imported (so a new architecture file registers itself without an
edit here).
"""

from __future__ import annotations

import importlib
import pkgutil

from polytask.nn.architectures.mmoe import MMoE
from polytask.nn.architectures.ple import CGC, PLE, SHARED_GATE
from polytask.nn.architectures.shared_bottom import SharedBottom
from polytask.nn.architectures.single_task import SingleTask

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["CGC", "PLE", "SHARED_GATE", "MMoE", "SharedBottom", "SingleTask"]
