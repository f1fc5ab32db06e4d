"""Geometric Loss Strategy.

Chennupati, Sistu, Yogamani and Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019.

Minimises the geometric mean ``(prod_k L_k)^(1/K)``; its gradient weights task k by
``G / (K L_k)``, which is what is logged. Tasks whose loss is exactly zero in a batch (no labels)
are left out of the product, which would otherwise vanish.
"""

from __future__ import annotations

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine

__all__ = ["GeometricLossStrategy"]


@register_balancer(
    "gls",
    paper="Chennupati et al.: MultiNet++: Multi-Stream Feature Aggregation and Geometric Loss Strategy "
    "for Multi-Task Learning (CVPR Workshops 2019)",
    description="minimise the geometric mean of the task losses",
)
class GeometricLossStrategy(Balancer):
    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        present = [t for t in self.task_names if float(losses[t].detach()) > 0]
        if not present:
            engine.backward_weighted({t: 0.0 for t in self.task_names})
            return {t: 0.0 for t in self.task_names}
        logs = torch.stack([torch.log(losses[t]) for t in present])
        geo = torch.exp(logs.mean())
        g = float(geo.detach())
        weights = {
            t: (g / (len(present) * float(losses[t].detach())) if t in present else 0.0) for t in self.task_names
        }
        # Backward of the geometric mean itself (exact), not of the linearised weighted sum.
        engine.backward_weighted({t: 0.0 for t in self.task_names}, extra=geo)
        return weights
