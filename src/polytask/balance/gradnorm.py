"""GradNorm: gradient normalisation for adaptive loss balancing.

Chen, Badrinarayanan, Lee and Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018.

Learnable weights ``w_k`` are moved so that each task's weighted gradient norm
``G_k = ||grad_W w_k L_k||`` approaches ``mean(G) * r_k^alpha``, where ``r_k`` is the task's inverse
training rate ``(L_k / L_k(0)) / mean_j (L_j / L_j(0))``; after every step the weights are
renormalised to sum to K. The paper takes W as "the last shared layer"; here W is the model's shared
representation (the tensor the task heads read), which needs only K backward passes through the
heads and is defined for every architecture.
"""

from __future__ import annotations

import torch
from torch import nn

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["GradNorm"]


@register_balancer(
    "gradnorm",
    paper="Chen et al.: GradNorm: Gradient Normalization for Adaptive Loss Balancing in Deep Multitask "
    "Networks (ICML 2018)",
    description="learned weights that equalise task gradient norms at the shared representation",
    alpha=1.5,
)
class GradNorm(Balancer):
    level = "representation"

    def __init__(self, tasks: list[Task], alpha: float = 1.5) -> None:
        super().__init__(tasks)
        self.alpha = float(alpha)
        self.w = nn.Parameter(torch.ones(len(tasks)))
        self.register_buffer("initial_loss", torch.full((len(tasks),), float("nan")))

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        k = len(self.task_names)
        with torch.no_grad():  # the renormalisation of the paper, after the previous step
            self.w.mul_(k / self.w.sum().clamp_min(1e-12))
        now = torch.stack([losses[t].detach() for t in self.task_names])
        self.initial_loss = torch.where(torch.isnan(self.initial_loss) & (now > 0), now, self.initial_loss)
        norms = engine.representation_jacobian().norm(dim=1)  # ||grad_z L_k||, no graph
        present = (now > 0) & ~torch.isnan(self.initial_loss)
        if bool(present.any()):
            g = self.w * norms  # G_k as a function of w
            ratio = torch.where(present, now / self.initial_loss, 0.0)
            r = ratio / ratio[present].mean()
            target = (g[present].mean() * r.pow(self.alpha)).detach()
            grad_loss = (g - target).abs()[present].sum()
            (self.w.grad,) = torch.autograd.grad(grad_loss, self.w)
        weights = self.w.detach().clone()
        engine.backward_weighted(dict(zip(self.task_names, weights, strict=True)))
        return {t: float(v) for t, v in zip(self.task_names, weights, strict=True)}
