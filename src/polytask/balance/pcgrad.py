"""PCGrad: projecting conflicting gradients.

Yu, Kumar, Gupta, Levine, Hausman and Finn, "Gradient Surgery for Multi-Task Learning",
NeurIPS 2020 (Algorithm 1).

For every task i, in a random order of the other tasks j: if ``g_i^PC . g_j < 0``, remove from
``g_i^PC`` its component along ``g_j``. The update is ``sum_i g_i^PC``.

Every ``g_i^PC`` stays a linear combination ``sum_k C_ik g_k`` of the original gradients, and the
inner products it needs are ``C_i G``, so the whole surgery runs on the K x K Gramian by tracking
the coefficients C; the update is ``J^T w`` with ``w = C^T 1``. The order is drawn with
``torch.randperm`` (one permutation of all K tasks per task i, i itself skipped) from torch's global
generator, so a seed reproduces it.

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import gramian_array

__all__ = ["PCGrad", "pcgrad_weights"]


def pcgrad_weights(gramian: torch.Tensor) -> torch.Tensor:
    """Weights ``w`` with ``J^T w = sum_i g_i^PC``; draws K permutations from the global generator."""
    g = gramian_array(gramian)
    k = g.shape[0]
    coef = np.eye(k)
    for i in range(k):
        for j in torch.randperm(k, device="cpu").tolist():
            if j == i or g[j, j] <= 0:
                continue
            dot = float(coef[i] @ g[:, j])
            if dot < 0:
                coef[i, j] -= dot / g[j, j]
    return weights_tensor(coef.sum(axis=0), gramian)


@register_balancer(
    "pcgrad",
    paper="Yu et al.: Gradient Surgery for Multi-Task Learning (NeurIPS 2020)",
    description="project each task gradient off the gradients it conflicts with, in random order, and sum",
)
class PCGrad(GramianBalancer):
    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return pcgrad_weights(gramian)
