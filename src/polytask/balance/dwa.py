"""Dynamic Weight Average.

Liu, Johns and Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019 (eq. 7).

``w_k(t) = K exp(r_k(t-1) / T) / sum_i exp(r_i(t-1) / T)`` with ``r_k(t-1) = L_k(t-1) / L_k(t-2)``,
the ratio of the task's mean training losses over the two previous epochs; ``w_k = 1`` for the
first two epochs.
"""

from __future__ import annotations

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["DynamicWeightAverage"]


@register_balancer(
    "dwa",
    paper="Liu, Johns, Davison: End-to-End Multi-Task Learning with Attention (CVPR 2019)",
    description="weights from the rate of change of each task's epoch loss, softened by temperature T",
    temperature=2.0,
)
class DynamicWeightAverage(Balancer):
    def __init__(self, tasks: list[Task], temperature: float = 2.0) -> None:
        super().__init__(tasks)
        if not temperature > 0:
            raise ValueError(f"dwa temperature must be positive, got {temperature}")
        self.temperature = float(temperature)
        k = len(tasks)
        # Epoch losses of the two previous epochs; buffers so that resume restores them.
        self.register_buffer("history", torch.full((2, k), float("nan"), dtype=torch.float64))
        self.register_buffer("w", torch.ones(k, dtype=torch.float64))

    def epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        current = torch.tensor(
            [train_losses[t] for t in self.task_names], dtype=torch.float64, device=self.history.device
        )
        self.history = torch.stack([self.history[1], current])
        prev2, prev1 = self.history
        if torch.isnan(prev2).any():
            return
        # A task with zero loss (e.g. no labels) keeps ratio 1 instead of dividing by zero.
        ratio = torch.where(prev2 > 0, prev1 / prev2.clamp_min(1e-12), torch.ones_like(prev1))
        self.w = len(self.task_names) * torch.softmax(ratio / self.temperature, dim=0)

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        weights = {t: float(w) for t, w in zip(self.task_names, self.w, strict=True)}
        engine.backward_weighted(weights)
        return weights
