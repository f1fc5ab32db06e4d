"""DualProj: the mean gradient projected onto the dual cone of the task gradients.

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, 2024
(the projection of their Section 3.1; for one constraint set it is the update of Lopez-Paz and
Ranzato's GEM, NeurIPS 2017, equation 11).

The average gradient is projected onto ``{d : J d >= 0}``: the closest direction to the mean that
conflicts with no task. Unlike UPGrad it projects once, after averaging. The projection is the box
QP ``min v'Gv s.t. v >= 1/K`` on the Gramian, solved exactly
(:func:`polytask.balance._solvers.dual_cone_projection`), with the same trace normalisation and
``reg_eps`` ridge as the reference implementation.

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import dual_cone_projection, gramian_array
from polytask.tasks import Task

__all__ = ["DualProj", "dualproj_weights"]


def dualproj_weights(gramian: torch.Tensor, reg_eps: float = 1e-4) -> torch.Tensor:
    """Weights of the projection of the mean gradient onto the dual cone of the task gradients."""
    g = gramian_array(gramian)
    k = g.shape[0]
    proj, _ = dual_cone_projection(g, np.full((1, k), 1.0 / k), reg_eps)
    return weights_tensor(proj[0], gramian)


@register_balancer(
    "dualproj",
    paper="Quinton, Rey: Jacobian Descent for Multi-Objective Optimization (arXiv 2406.16232, 2024)",
    description="the mean gradient projected onto the cone of directions that conflict with no task",
    reg_eps=1e-4,
)
class DualProj(GramianBalancer):
    def __init__(self, tasks: list[Task], reg_eps: float = 1e-4) -> None:
        super().__init__(tasks)
        if reg_eps < 0:
            raise ValueError(f"dualproj reg_eps must be non-negative, got {reg_eps}")
        self.reg_eps = float(reg_eps)

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return dualproj_weights(gramian, self.reg_eps)
