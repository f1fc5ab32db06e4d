"""Equal weighting: the plain sum of task losses, the baseline every balancer is compared with."""

from __future__ import annotations

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine

__all__ = ["EqualWeighting"]


@register_balancer("equal", paper="(baseline) sum of task losses", description="every task loss weighted 1")
class EqualWeighting(Balancer):
    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        engine.backward_weighted({t: 1.0 for t in losses})
        return {t: 1.0 for t in losses}
