"""Smooth Tchebycheff scalarisation.

Lin, Zhang, Zhang, Liu and Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
Optimization", ICML 2024.

``g_mu(L) = mu log sum_k exp((log L_k - log L_k^nadir) / mu)``: a smooth maximum of the
normalised log-losses, so the update leans on the task that lags most. For multi-task training the
losses are log-normalised by a nadir vector measured during ``warmup_epochs`` (the mean training
loss of each task), during which the plain sum of log-losses is minimised. The applied weights,
logged, are ``softmax((log L - log L^nadir) / mu) / L_k``.
"""

from __future__ import annotations

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["SmoothTchebycheff"]

_EPS = 1e-20


@register_balancer(
    "stch",
    paper="Lin et al.: Smooth Tchebycheff Scalarization for Multi-Objective Optimization (ICML 2024)",
    description="smooth maximum of log-normalised task losses (nadir from warm-up epochs)",
    mu=1.0,
    warmup_epochs=1,
)
class SmoothTchebycheff(Balancer):
    def __init__(self, tasks: list[Task], mu: float = 1.0, warmup_epochs: int = 1) -> None:
        super().__init__(tasks)
        if not mu > 0:
            raise ValueError(f"stch mu must be positive, got {mu}")
        if warmup_epochs < 1:
            raise ValueError(
                f"stch warmup_epochs must be >= 1 (the nadir vector is measured then), got {warmup_epochs}"
            )
        self.mu, self.warmup_epochs = float(mu), int(warmup_epochs)
        k = len(tasks)
        self.register_buffer("nadir", torch.full((k,), float("nan"), dtype=torch.float64))
        self.register_buffer("loss_sum", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("loss_count", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("epochs_seen", torch.zeros((), dtype=torch.int64))

    def epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        self.epochs_seen += 1
        if int(self.epochs_seen) == self.warmup_epochs:
            self.nadir = torch.where(self.loss_count > 0, self.loss_sum / self.loss_count.clamp_min(1), 1.0)

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        stacked = torch.stack([losses[t] for t in self.task_names])
        now = stacked.detach().to(torch.float64)
        present = now > 0
        logs = torch.log(stacked.clamp_min(_EPS))
        if torch.isnan(self.nadir).any():
            self.loss_sum += torch.where(present, now, 0.0)
            self.loss_count += present.to(torch.float64)
            w = torch.where(present, 1.0 / now.clamp_min(_EPS), 0.0)  # d/dL_k sum log L_k
            engine.backward_weighted({t: 0.0 for t in self.task_names}, extra=torch.where(present, logs, 0.0).sum())
            return {t: float(v) for t, v in zip(self.task_names, w, strict=True)}
        z = (logs - torch.log(self.nadir.clamp_min(_EPS)).to(logs.dtype)) / self.mu
        z = torch.where(present, z, torch.full_like(z, -torch.inf))
        if not bool(present.any()):
            engine.backward_weighted({t: 0.0 for t in self.task_names})
            return {t: 0.0 for t in self.task_names}
        objective = self.mu * torch.logsumexp(z, 0)
        soft = torch.softmax(z.detach().to(torch.float64), 0)
        w = torch.where(present, soft / now.clamp_min(_EPS), 0.0)
        engine.backward_weighted({t: 0.0 for t in self.task_names}, extra=objective)
        return {t: float(v) for t, v in zip(self.task_names, w, strict=True)}
