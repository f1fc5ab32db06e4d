"""Multi-task architectures, one file per method; importing this package registers them all."""

from __future__ import annotations

from polytask.nn.architectures.mmoe import MMoE
from polytask.nn.architectures.ple import CGC, PLE, SHARED_GATE
from polytask.nn.architectures.shared_bottom import SharedBottom
from polytask.nn.architectures.single_task import SingleTask

__all__ = ["CGC", "PLE", "SHARED_GATE", "MMoE", "SharedBottom", "SingleTask"]
