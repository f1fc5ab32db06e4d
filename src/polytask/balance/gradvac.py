"""GradVac: Gradient Vaccine.

Wang, Tsvetkov, Firat and Cao, "Gradient Vaccine: Investigating and Improving Multi-task
Optimization in Massively Multilingual Models", ICLR 2021 (Algorithm 1).

PCGrad only acts when two gradients conflict (cosine < 0). GradVac keeps, for every ordered pair
(i, j), an exponential moving average ``phi_hat_ij`` of their cosine similarity and, whenever the
current cosine ``phi_ij`` of ``g_i^PC`` with ``g_j`` falls below it, adds the multiple of ``g_j`` that
raises the cosine exactly to ``phi_hat_ij``:

    g_i^PC += ||g_i^PC|| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (||g_j|| sqrt(1 - phi_hat^2)) g_j

then ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi_ij`` (every step, as in the paper's algorithm).
With targets at 0 this is PCGrad. The update is ``sum_i g_i^PC``.

As for PCGrad, the coefficients of ``g_i^PC`` in the original gradients are tracked on the Gramian.
The order of the other tasks is one ``torch.randperm(K - 1)`` per task from torch's global
generator. The targets live in a buffer (``targets``), so a checkpoint restores them; pairs where a
task has no gradient this step (no labels) leave their target unchanged. ``beta = 0.01`` is the
paper's setting (LibMTL and torchjd default to 0.5).

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import gramian_array
from polytask.tasks import Task

__all__ = ["GradVac", "gradvac_weights"]


def gradvac_weights(
    gramian: torch.Tensor, targets: torch.Tensor, beta: float = 0.01
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``w`` with ``J^T w = sum_i g_i^PC``, and the updated ``(K, K)`` cosine targets."""
    g = gramian_array(gramian)
    k = g.shape[0]
    phi_hat = targets.detach().to("cpu", torch.float64).numpy().copy()
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    coef = np.eye(k)
    for i in range(k):
        others = [j for j in range(k) if j != i]
        cg = coef[i] @ g  # inner products of g_i^PC with every original gradient
        for idx in torch.randperm(k - 1, device="cpu").tolist():
            j = others[idx]
            norm_i = math.sqrt(max(float(cg @ coef[i]), 0.0))
            if norm_i <= 0 or norms[j] <= 0:
                continue
            phi = min(max(float(cg[j]) / (norm_i * norms[j]), -1.0), 1.0)
            target = float(phi_hat[i, j])
            if phi < target:
                s_phi = math.sqrt(max(1.0 - phi * phi, 0.0))
                s_hat = math.sqrt(max(1.0 - target * target, 0.0))
                if s_hat > 0:
                    step = norm_i * (target * s_phi - phi * s_hat) / (norms[j] * s_hat)
                    coef[i, j] += step
                    cg = cg + step * g[j]
            phi_hat[i, j] = (1.0 - beta) * target + beta * phi
    new_targets = torch.as_tensor(phi_hat, dtype=targets.dtype, device=targets.device)
    return weights_tensor(coef.sum(axis=0), gramian), new_targets


@register_balancer(
    "gradvac",
    paper="Wang, Tsvetkov, Firat, Cao: Gradient Vaccine: Investigating and Improving Multi-task Optimization in "
    "Massively Multilingual Models (ICLR 2021)",
    description="raise each pairwise gradient cosine to its moving-average target, then sum",
    beta=0.01,
)
class GradVac(GramianBalancer):
    def __init__(self, tasks: list[Task], beta: float = 0.01) -> None:
        super().__init__(tasks)
        if not 0.0 <= beta <= 1.0:
            raise ValueError(f"gradvac beta must be in [0, 1], got {beta}")
        self.beta = float(beta)
        k = len(tasks)
        self.register_buffer("targets", torch.zeros(k, k, dtype=torch.float64))

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        w, self.targets = gradvac_weights(gramian, self.targets, self.beta)
        return w
