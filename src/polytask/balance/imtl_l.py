"""IMTL-L: the loss-balancing half of Impartial Multi-Task Learning.

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
(Section 3.2).

Each task learns a scale ``s_k`` and the objective is ``sum_k (e^{s_k} L_k - s_k)``; at the optimum
``e^{s_k} L_k = 1``, so every task's scaled loss is driven to the same value.
"""

from __future__ import annotations

import torch
from torch import nn

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["IMTLL"]


@register_balancer(
    "imtl-l",
    paper="Liu et al.: Towards Impartial Multi-task Learning (ICLR 2021), loss balance",
    description="learned scales e^{s_k} that equalise the scaled task losses",
)
class IMTLL(Balancer):
    def __init__(self, tasks: list[Task]) -> None:
        super().__init__(tasks)
        self.s = nn.Parameter(torch.zeros(len(tasks)))

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        scale = torch.exp(self.s)
        engine.backward_weighted(dict(zip(self.task_names, scale, strict=True)), extra=-self.s.sum())
        return {t: float(v) for t, v in zip(self.task_names, scale.detach(), strict=True)}
