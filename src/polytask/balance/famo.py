"""FAMO: Fast Adaptive Multitask Optimization.

Liu, Liu, Jin, Stone and Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023.

Task weights ``z = softmax(xi)`` are chosen so that all log-losses fall at the same rate. The model
minimises ``sum_k z_k log(L_k - L_k*) / c`` with ``c = sum_k z_k / (L_k - L_k*)`` (so the applied
weight on ``L_k`` is ``z_k / (c (L_k - L_k*))``), and ``xi`` follows the observed decrease of each
log-loss, ``delta_k = log(L_k^prev) - log(L_k^now)``, through ``grad_xi = J_softmax(xi)^T delta``
with Adam and weight decay ``gamma`` (Algorithm 1).

The paper's code re-evaluates the same batch after the step to get ``L^now``; here ``L^now`` is the
next step's loss (on the next batch), which removes the extra forward pass per step. This is the
cheap variant; with batches drawn i.i.d. it follows the same expected update.
"""

from __future__ import annotations

import math

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["FAMO"]

_EPS = 1e-8


@register_balancer(
    "famo",
    paper="Liu et al.: FAMO: Fast Adaptive Multitask Optimization (NeurIPS 2023)",
    description="weights that equalise the rate of decrease of the log-losses; O(1) extra cost per step",
    w_lr=0.025,
    gamma=0.001,
)
class FAMO(Balancer):
    def __init__(self, tasks: list[Task], w_lr: float = 0.025, gamma: float = 0.001) -> None:
        super().__init__(tasks)
        k = len(tasks)
        self.w_lr, self.gamma = float(w_lr), float(gamma)
        # Logits and their Adam moments are buffers: updated by FAMO's own rule, saved in checkpoints.
        self.register_buffer("xi", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_m", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_v", torch.zeros(k, dtype=torch.float64))
        self.register_buffer("adam_t", torch.zeros((), dtype=torch.float64))
        self.register_buffer("prev_loss", torch.full((k,), float("nan"), dtype=torch.float64))

    def _update_logits(self, now: torch.Tensor) -> None:
        prev = self.prev_loss
        # Tasks absent from either batch (zero loss) carry no rate information this step.
        valid = (prev > 0) & (now > 0)
        delta = torch.where(valid, torch.log(prev.clamp_min(_EPS)) - torch.log(now.clamp_min(_EPS)), 0.0)
        z = torch.softmax(self.xi, 0)
        grad = z * (delta - (z * delta).sum())  # J_softmax(xi)^T delta
        grad = grad + self.gamma * self.xi  # Adam with L2 weight decay, as torch.optim.Adam(weight_decay)
        b1, b2 = 0.9, 0.999
        self.adam_t += 1
        self.adam_m.mul_(b1).add_(grad, alpha=1 - b1)
        self.adam_v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        t = float(self.adam_t)
        m_hat = self.adam_m / (1 - b1**t)
        v_hat = self.adam_v / (1 - b2**t)
        self.xi -= self.w_lr * m_hat / (v_hat.sqrt() + 1e-8)

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        now = torch.stack([losses[t].detach() for t in self.task_names]).to(torch.float64)
        if not torch.isnan(self.prev_loss).any():
            self._update_logits(now)
        self.prev_loss = now.clone()
        z = torch.softmax(self.xi, 0)
        present = now > 0
        d = now + _EPS
        c = float((torch.where(present, z / d, 0.0)).sum())
        if c == 0.0 or not math.isfinite(c):
            engine.backward_weighted({t: 0.0 for t in self.task_names})
            return {t: 0.0 for t in self.task_names}
        # d/dL_k [z_k log(L_k) / c] = z_k / (c L_k): one ordinary weighted backward.
        w = torch.where(present, z / (c * d), 0.0)
        weights = {t: float(v) for t, v in zip(self.task_names, w, strict=True)}
        engine.backward_weighted(weights)
        return weights
