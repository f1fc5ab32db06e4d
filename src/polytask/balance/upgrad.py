"""UPGrad: unconflicting projection of gradients.

Quinton and Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232, 2024
(Section 3.1).

Each task gradient is projected onto the dual cone ``{d : J d >= 0}`` of all task gradients (the
directions that conflict with no task), and the projections are averaged. The result never
conflicts with any task (``J d >= 0``), equals the mean gradient when no two gradients conflict, and
is invariant to the order of the tasks. By their Proposition 1 the projection of ``J^T u`` is
``J^T v`` with ``v = argmin v'Gv s.t. v >= u``, a K x K box-constrained QP solved exactly here by an
active-set method (:func:`polytask.balance._solvers.dual_cone_projection`), with the authors'
normalisation (G divided by its trace) and ``reg_eps = 1e-4`` ridge. A task without gradient puts no
constraint on the cone and projects to zero.

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import dual_cone_projection, gramian_array
from polytask.tasks import Task

__all__ = ["UPGrad", "upgrad_weights"]


def upgrad_weights(gramian: torch.Tensor, reg_eps: float = 1e-4) -> torch.Tensor:
    """Weights of the mean of the projections of the task gradients onto their dual cone."""
    g = gramian_array(gramian)
    k = g.shape[0]
    proj, _ = dual_cone_projection(g, np.eye(k) / k, reg_eps)
    return weights_tensor(proj.sum(axis=0), gramian)


@register_balancer(
    "upgrad",
    paper="Quinton, Rey: Jacobian Descent for Multi-Objective Optimization (arXiv 2406.16232, 2024)",
    description="mean of the task gradients each projected onto the cone of non-conflicting directions",
    reg_eps=1e-4,
)
class UPGrad(GramianBalancer):
    def __init__(self, tasks: list[Task], reg_eps: float = 1e-4) -> None:
        super().__init__(tasks)
        if reg_eps < 0:
            raise ValueError(f"upgrad reg_eps must be non-negative, got {reg_eps}")
        self.reg_eps = float(reg_eps)

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return upgrad_weights(gramian, self.reg_eps)
