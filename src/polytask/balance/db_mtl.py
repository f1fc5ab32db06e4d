"""DB-MTL: dual balancing of loss scales and gradient magnitudes.

Lin, Ye, Xu, Shi, Zhang and Kwok, "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023.

Loss scales are balanced by training on ``log L_k``; gradient magnitudes by an exponential moving
average ``g_k`` of each task's gradient of ``log L_k`` (step-dependent rate ``beta / t^sigma``),
rescaled so that every task's average gradient has the largest task's norm:
``d = sum_k (max_j ||g_j|| / ||g_k||) g_k``. Task-specific parameters get the gradient of their own
``log L_k``.

``grads`` chooses what ``g_k`` is:

* ``"representation"`` (default): the gradient of ``log L_k`` with respect to the shared
  representation, as in the paper's experiments' efficient variant and LibMTL's ``rep_grad``. The
  moving average is kept over its norm (representations of different batches are different
  samples, so averaging the vectors themselves would mix unrelated rows), and the update is
  ``sum_k alpha_k grad log L_k`` through one ordinary backward pass: loss-level cost, K backward
  passes through the task heads only.
* ``"parameters"``: the paper's exact form on the shared-parameter gradients; the moving average is
  over the (K, P) Jacobian, so it costs what a gradient-level method costs.
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
    grads="representation",
)
class DBMTL(Balancer):
    level = "representation"

    def __init__(
        self, tasks: list[Task], beta: float = 0.9, beta_sigma: float = 0.5, grads: str = "representation"
    ) -> None:
        super().__init__(tasks)
        if grads not in ("representation", "parameters"):
            raise ValueError(f"db-mtl grads must be 'representation' or 'parameters', got {grads!r}")
        self.beta, self.beta_sigma, self.grads = float(beta), float(beta_sigma), grads
        self.level = "gradient" if grads == "parameters" else "representation"
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # (K, P) ("parameters") or (K,) ("representation") once known; restored from checkpoints.
        self.register_buffer("grad_ema", torch.zeros(0))

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "grad_ema")
        if saved is not None and saved.shape != self.grad_ema.shape:
            self.grad_ema = torch.zeros_like(saved)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _average(self, now: torch.Tensor) -> torch.Tensor:
        self.step += 1
        if self.grad_ema.shape != now.shape:
            self.grad_ema = now.detach().clone()
        else:
            rate = self.beta / float(self.step) ** self.beta_sigma
            self.grad_ema = now + rate * (self.grad_ema - now)
        return self.grad_ema

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        now = torch.stack([losses[t].detach() for t in self.task_names])
        inv = 1.0 / (now + _EPS)  # d log(L_k + eps) / dL_k
        own = dict(zip(self.task_names, inv, strict=True))
        if self.grads == "representation":
            norms = self._average(
                engine.representation_jacobian().norm(dim=1) * inv.to(engine.losses[self.task_names[0]].dtype)
            )
        else:
            j = engine.jacobian() * inv[:, None].to(engine.jacobian().dtype)
            norms = self._average(j).norm(dim=1)
        alpha = torch.where(norms > 0, norms.max() / (norms + _EPS), 0.0)
        if self.grads == "representation":
            engine.backward_weighted(dict(zip(self.task_names, alpha * inv, strict=True)), own_weights=own)
        else:
            engine.apply_shared_direction(alpha @ self.grad_ema, own_weights=own)
        return {t: float(v) for t, v in zip(self.task_names, alpha * inv, strict=True)}
