"""DB-MTL: dual balancing of loss scales and gradient magnitudes.

Lin, Ye, Xu, Shi, Zhang and Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023.

Loss scales are balanced by training on ``log L_k``; gradient magnitudes by an exponential moving
average ``g_k`` of each task's gradient of ``log L_k`` (step-dependent rate ``beta / t^sigma``),
rescaled so that every task's average gradient has the largest task's norm:
``d = sum_k (max_j ||g_j|| / ||g_k||) g_k``.

The moving average is over gradient vectors, so this method needs the per-task gradients of the
shared parameters (the engine's Jacobian): it is loss-balancing in purpose but gradient-level in
cost. Task-specific parameters get the gradient of their own ``log L_k``.
"""

from __future__ import annotations

from typing import Any

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["DBMTL"]

_EPS = 1e-8


@register_balancer(
    "db-mtl",
    paper="Lin et al.: Dual-Balancing for Multi-Task Learning (arXiv 2308.12029, 2023)",
    description="log-loss scale balancing + EMA gradients rescaled to the largest task norm",
    beta=0.9,
    beta_sigma=0.5,
)
class DBMTL(Balancer):
    level = "gradient"

    def __init__(self, tasks: list[Task], beta: float = 0.9, beta_sigma: float = 0.5) -> None:
        super().__init__(tasks)
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # (K, P) once the shared parameter count is known; restored from checkpoints at any size.
        self.register_buffer("grad_ema", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "grad_ema")
        if saved is not None and saved.shape != self.grad_ema.shape:
            self.grad_ema = torch.zeros_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        now = torch.stack([losses[t].detach() for t in self.task_names])
        inv = 1.0 / (now + _EPS)  # d log(L_k + eps) / dL_k
        j = engine.jacobian() * inv[:, None].to(engine.jacobian().dtype)
        self.step += 1
        if self.grad_ema.shape != j.shape:
            self.grad_ema = j.detach().clone()
        else:
            rate = self.beta / float(self.step) ** self.beta_sigma
            self.grad_ema = j + rate * (self.grad_ema - j)
        norms = self.grad_ema.norm(dim=1)
        alpha = torch.where(norms > 0, norms.max() / (norms + _EPS), 0.0)
        engine.apply_shared_direction(alpha @ self.grad_ema, own_weights=dict(zip(self.task_names, inv, strict=True)))
        return {t: float(v) for t, v in zip(self.task_names, alpha * inv, strict=True)}
