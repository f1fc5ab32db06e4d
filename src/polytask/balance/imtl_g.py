"""IMTL-G: the gradient-balancing half of Impartial Multi-Task Learning.

Liu, Li, Kuang, Xue, Chen, Yang, Liao and Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
(Section 3.3).

IMTL-G picks the combination ``d = J^T w`` with ``sum_k w_k = 1`` whose projection on every unit task
gradient ``u_k = g_k / ||g_k||`` is the same, so no task is favoured: ``J d = c ||g||``. On the
Gramian this is ``w ∝ G^+ n`` with ``n_k = ||g_k|| = sqrt(G_kk)``, normalised to sum to one; the
pseudo-inverse is the generalisation of Quinton & Rey (2024) that also covers linearly dependent
gradients (the paper's closed form needs them independent). A task without gradient gets weight 0
(its row of G^+ vanishes); when ``sum(G^+ n)`` vanishes the weights are 0.

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import eig_rtol, gramian_array, psd_pinv

__all__ = ["IMTLG", "imtl_g_weights"]


def imtl_g_weights(gramian: torch.Tensor) -> torch.Tensor:
    """Weights (summing to 1) of the combination with equal projections on every task gradient."""
    g = gramian_array(gramian)
    k = g.shape[0]
    t = float(np.trace(g))
    if t <= 0:
        return weights_tensor(np.zeros(k), gramian)
    gn = g / t  # scale-free: the weights do not depend on the scale of G
    v = psd_pinv(gn, eig_rtol(gramian.dtype, k)) @ np.sqrt(np.clip(np.diag(gn), 0.0, None))
    total = float(v.sum())
    w = v / total if abs(total) > 1e-12 * np.abs(v).sum() and total != 0 else np.zeros(k)
    return weights_tensor(w, gramian)


@register_balancer(
    "imtl-g",
    paper="Liu et al.: Towards Impartial Multi-task Learning (ICLR 2021), gradient balance",
    description="the combination of task gradients (weights summing to 1) with equal projection on each",
)
class IMTLG(GramianBalancer):
    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return imtl_g_weights(gramian)
