"""Uncertainty weighting.

Kendall, Gal and Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry
and Semantics", CVPR 2018.

Each task k learns ``s_k = log sigma_k^2``. The objective is ``sum_k c_k exp(-s_k) L_k + s_k / 2``
with ``c_k = 1/2`` for regression (Gaussian likelihood, eq. 5) and ``c_k = 1`` for classification
(softmax likelihood, eq. 10); ``s_k / 2 = log sigma_k``.
"""

from __future__ import annotations

import torch
from torch import nn

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task, TaskKind

__all__ = ["UncertaintyWeighting"]


@register_balancer(
    "uncertainty",
    paper="Kendall, Gal, Cipolla: Multi-Task Learning Using Uncertainty to Weigh Losses for Scene Geometry "
    "and Semantics (CVPR 2018)",
    description="learned homoscedastic-uncertainty weights exp(-s_k) with a log-variance penalty",
    init_log_var=0.0,
)
class UncertaintyWeighting(Balancer):
    def __init__(self, tasks: list[Task], init_log_var: float = 0.0) -> None:
        super().__init__(tasks)
        self.log_var = nn.Parameter(torch.full((len(tasks),), float(init_log_var)))
        self.register_buffer(
            "scale",
            torch.tensor([0.5 if t.kind is TaskKind.REGRESSION else 1.0 for t in tasks]),
            persistent=False,
        )

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        w = self.scale * torch.exp(-self.log_var)
        engine.backward_weighted(dict(zip(self.task_names, w, strict=True)), extra=0.5 * self.log_var.sum())
        return {t: float(v) for t, v in zip(self.task_names, w.detach(), strict=True)}
