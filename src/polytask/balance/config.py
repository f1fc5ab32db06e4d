"""ConFIG: conflict-free inverse gradients.

Liu, Chu, Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
ICLR 2025 (equation 2).

ConFIG takes the direction whose cosine with every task gradient is the same: with ``U`` the unit
task gradients, ``d_u = normalise(U^+ 1)`` (``U d_u`` is then constant), scaled by the sum of the
projections of the gradients on it, ``d = (sum_k g_k . d_u) d_u``. Since
``U^+ 1 = J^T D^+ C^+ 1`` with ``D = diag ||g_k||`` and ``C = D^+ G D^+`` the cosine matrix, the
direction is ``J^T w`` with ``w = (1'Gv / v'Gv) v`` and ``v = D^+ C^+ 1``: the Gramian suffices.
Tasks without gradient get weight 0; with linearly dependent gradients the pseudo-inverse gives the
least-squares compromise, as in the reference code.

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import eig_rtol, gramian_array, psd_pinv

__all__ = ["ConFIG", "config_weights"]


def config_weights(gramian: torch.Tensor) -> torch.Tensor:
    """Weights ``w`` such that ``J^T w`` is the ConFIG update."""
    g = gramian_array(gramian)
    k = g.shape[0]
    norms = np.sqrt(np.clip(np.diag(g), 0.0, None))
    inv = np.divide(1.0, norms, out=np.zeros(k), where=norms > 0)
    cos = g * inv[:, None] * inv[None, :]
    v = inv * (psd_pinv(cos, eig_rtol(gramian.dtype, k)) @ np.ones(k))
    gv = g @ v
    vgv = float(v @ gv)
    if not vgv > 1e-30 * max(float(np.trace(g)), 1e-300) * float(v @ v):
        return weights_tensor(np.zeros(k), gramian)
    return weights_tensor(float(gv.sum()) / vgv * v, gramian)


@register_balancer(
    "config",
    paper="Liu, Chu, Thuerey: ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks (ICLR 2025)",
    description="the direction with equal cosine to every task gradient, scaled by their summed projections",
)
class ConFIG(GramianBalancer):
    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return config_weights(gramian)
