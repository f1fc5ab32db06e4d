"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone and Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (Algorithm 1).

CAGrad looks, within a ball of radius ``c ||g_0||`` around the average gradient ``g_0``, for the
direction that maximises the worst task's improvement. Its dual is
``min_{w in simplex} g_w . g_0 + c ||g_0|| ||g_w||`` (``g_w = J^T w``) and the update is
``d = g_0 + (c ||g_0|| / ||g_w||) g_w``, a combination of the task gradients with weights
``1/K + (c ||g_0|| / ||g_w||) w``. The official code divides d by ``1 + c^2`` (``rescale=1``, its
default); ``rescale=0`` is the paper's formula, ``rescale=2`` divides by ``1 + c``. ``c = 0`` is the
average gradient.

The dual is solved exactly on the Gramian (:func:`polytask.balance._solvers.cagrad_dual`) instead
of by SLSQP. Tasks without gradient this step (no labels) take no part in the worst-case (their
improvement is 0 whatever the direction, which would reduce the update to ``g_0``); ``g_0`` remains the
average over all K tasks. When ``g_w`` vanishes (0 is in the convex hull of the gradients) the update
is ``g_0``, as in the official code, whose ``1e-8`` guards give the same.

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import cagrad_dual, gramian_array, nonzero_rows
from polytask.tasks import Task

__all__ = ["CAGrad", "cagrad_weights"]

_RESCALE = {0: lambda c: 1.0, 1: lambda c: 1.0 + c * c, 2: lambda c: 1.0 + c}


def cagrad_weights(gramian: torch.Tensor, c: float = 0.4, rescale: int = 1) -> torch.Tensor:
    """Weights ``w`` such that ``J^T w`` is the CAGrad update."""
    if c < 0 or rescale not in _RESCALE:
        raise ValueError(f"cagrad needs c >= 0 and rescale in (0, 1, 2); got c={c}, rescale={rescale}")
    g = gramian_array(gramian)
    k = g.shape[0]
    w = np.full(k, 1.0 / k)
    rows = nonzero_rows(g)
    if c > 0 and rows.any():
        gn = g / float(np.trace(g))
        s = c * math.sqrt(max(float(gn.mean()), 0.0))  # c ||g_0|| / sqrt(tr G)
        if s > 1e-12:
            b = gn.mean(axis=1)  # g_k . g_0
            ww, rho, _ = cagrad_dual(gn[np.ix_(rows, rows)], b[rows], s)
            if rho > 1e-7:  # below: g_w = 0 up to float64 rounding of the Gramian
                w[rows] += (s / rho) * ww
    return weights_tensor(w / _RESCALE[rescale](c), gramian)


@register_balancer(
    "cagrad",
    paper="Liu, Liu, Jin, Stone, Liu: Conflict-Averse Gradient Descent for Multi-task Learning (NeurIPS 2021)",
    description="best worst-task improvement within a ball of radius c ||g_0|| around the mean gradient",
    c=0.4,
    rescale=1,
)
class CAGrad(GramianBalancer):
    def __init__(self, tasks: list[Task], c: float = 0.4, rescale: int = 1) -> None:
        super().__init__(tasks)
        if c < 0 or rescale not in _RESCALE:
            raise ValueError(f"cagrad needs c >= 0 and rescale in (0, 1, 2); got c={c}, rescale={rescale}")
        self.c = float(c)
        self.rescale = int(rescale)

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return cagrad_weights(gramian, self.c, self.rescale)
