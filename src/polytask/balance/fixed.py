"""Fixed loss weights: the linear scalarisation sum_k w_k L_k with user-chosen weights."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["FixedWeights"]


@register_balancer(
    "fixed",
    paper="(baseline) linear scalarisation with fixed weights",
    description="sum_k w_k L_k; weights by task name, else each task's Task.weight",
    weights=None,
)
class FixedWeights(Balancer):
    def __init__(self, tasks: list[Task], weights: Mapping[str, float] | None = None) -> None:
        super().__init__(tasks)
        given = dict(weights or {})
        unknown = sorted(set(given) - set(self.task_names))
        if unknown:
            raise ValueError(f"fixed weights name unknown task(s) {unknown}; tasks: {self.task_names}")
        self.weights = {t.name: float(given.get(t.name, t.weight)) for t in tasks}
        bad = {k: v for k, v in self.weights.items() if not v >= 0}
        if bad:
            raise ValueError(f"fixed weights must be >= 0, got {bad}")

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        engine.backward_weighted(self.weights)
        return dict(self.weights)
