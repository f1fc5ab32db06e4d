"""FairGrad: alpha-fair resource allocation between tasks.

Ban and Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024 (Algorithm 1, equation 4).

Treating each task's improvement ``g_k . d`` as a utility, FairGrad maximises the alpha-fair sum
``sum_k (g_k . d)^(1 - alpha) / (1 - alpha)``. With ``d = J^T w`` the optimality condition is
``G w = w^(-1/alpha)`` elementwise; ``alpha = 1`` is proportional fairness (Nash-MTL's condition),
``alpha -> infinity`` max-min fairness, ``alpha = 0`` the plain average. The official code solves the
condition with ``scipy.optimize.least_squares``; it is the minimiser of a strictly convex function,
so damped Newton solves it to machine precision (:func:`polytask.balance._solvers.alpha_fair`),
warm-started from the previous step's weights (kept in a buffer). As in the official code the shared
update is clipped to ``max_norm`` (0 disables), computed from the Gramian so the clipped update is
still ``J^T w``. Tasks without gradient this step get weight 0.

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, clip_factor, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import alpha_fair, gramian_array, nonzero_rows
from polytask.tasks import Task

__all__ = ["FairGrad", "fairgrad_weights"]


def fairgrad_weights(
    gramian: torch.Tensor, alpha: float = 1.0, init: torch.Tensor | None = None, max_iter: int = 50
) -> torch.Tensor:
    """``w > 0`` with ``G w = w^(-1/alpha)`` on the tasks that have a gradient (0 elsewhere), before
    clipping; ``alpha = 0`` gives the uniform weights ``1/K``. ``init`` warm-starts the solver."""
    if alpha < 0:
        raise ValueError(f"fairgrad alpha must be non-negative, got {alpha}")
    g = gramian_array(gramian)
    k = g.shape[0]
    if alpha == 0:
        return weights_tensor(np.full(k, 1.0 / k), gramian)
    p = 1.0 / alpha
    w = np.zeros(k)
    rows = nonzero_rows(g)
    if rows.any():
        x0 = None
        if init is not None:
            prev = init.detach().to("cpu", torch.float64).numpy()[rows]
            x0 = np.where(prev > 0, prev, 1.0)
        w[rows], _ = alpha_fair(g[np.ix_(rows, rows)], p, x0, max_iter=max_iter)
    return weights_tensor(w, gramian)


@register_balancer(
    "fairgrad",
    paper="Ban, Ji: Fair Resource Allocation in Multi-Task Learning (ICML 2024)",
    description="alpha-fair weights solving G w = w^(-1/alpha), update clipped to max_norm",
    alpha=1.0,
    max_norm=1.0,
)
class FairGrad(GramianBalancer):
    def __init__(self, tasks: list[Task], alpha: float = 1.0, max_norm: float = 1.0) -> None:
        super().__init__(tasks)
        if alpha < 0 or max_norm < 0:
            raise ValueError(f"fairgrad needs alpha >= 0 and max_norm >= 0; got {alpha}, {max_norm}")
        self.alpha = float(alpha)
        self.max_norm = float(max_norm)
        self.register_buffer("w", torch.ones(len(tasks), dtype=torch.float64))

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        w = fairgrad_weights(gramian, self.alpha, self.w).to(torch.float64)
        self.w = w
        return w * clip_factor(gramian, w, self.max_norm)
