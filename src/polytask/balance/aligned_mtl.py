"""Aligned-MTL: aligning the principal components of the gradient system.

Senushkin, Patakin, Kuznetsov and Konushin, "Independent Component Alignment for Multi-Task
Learning", CVPR 2023 (Algorithm 1).

Conflicts and dominance show up as a large condition number of the gradient matrix. Aligned-MTL
replaces J by the closest matrix with orthogonal rows of equal norm (all singular values set to the
smallest non-zero one, ``sqrt(lambda_min)``), which on the Gramian ``G = V Lambda V^T`` is the
weighting ``alpha = B w`` with ``B = sqrt(lambda_min) V Lambda^(-1/2) V^T`` (restricted to the
numerical rank; eigenvalues below ``lambda_max K eps`` are dropped, as in the reference code). ``w``
are the task preferences, uniform ``1/K``. ``scale_mode`` picks the common singular value:
``"min"`` (the paper), ``"median"`` or ``"rmse"`` (mean eigenvalue, the original implementation's
option). A task without gradient lies outside the range of G and gets weight 0 (with no gradient
at all the weights are the preferences).

Path: Gramian -> weights (``apply_shared_weights``).
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import GramianBalancer, weights_tensor
from polytask.balance._base import register_balancer
from polytask.balance._solvers import eig_rtol, gramian_array, nonzero_rows
from polytask.tasks import Task

__all__ = ["AlignedMTL", "aligned_mtl_weights"]

_SCALES = ("min", "median", "rmse")


def aligned_mtl_weights(gramian: torch.Tensor, scale_mode: str = "min") -> torch.Tensor:
    """Weights ``B (1/K)`` of the aligned gradient system."""
    if scale_mode not in _SCALES:
        raise ValueError(f"aligned-mtl scale_mode must be one of {_SCALES}, got {scale_mode!r}")
    g = gramian_array(gramian)
    k = g.shape[0]
    pref = np.full(k, 1.0 / k)
    rows = nonzero_rows(g)
    if not rows.any():
        return weights_tensor(pref, gramian)
    lam, v = np.linalg.eigh(g[np.ix_(rows, rows)])  # zero rows lie outside the range of G: weight 0
    keep = lam > lam.max() * eig_rtol(gramian.dtype, k)
    lam, v = lam[keep], v[:, keep]
    scale = {"min": lam.min(), "median": float(np.median(lam)), "rmse": lam.mean()}[scale_mode]
    w = np.zeros(k)
    w[rows] = np.sqrt(scale) * (v / np.sqrt(lam)) @ (v.T @ pref[rows])
    return weights_tensor(w, gramian)


@register_balancer(
    "aligned-mtl",
    paper="Senushkin, Patakin, Kuznetsov, Konushin: Independent Component Alignment for Multi-Task Learning "
    "(CVPR 2023)",
    description="replace the gradient system by its closest orthogonal one with equal singular values",
    scale_mode="min",
)
class AlignedMTL(GramianBalancer):
    def __init__(self, tasks: list[Task], scale_mode: str = "min") -> None:
        super().__init__(tasks)
        if scale_mode not in _SCALES:
            raise ValueError(f"aligned-mtl scale_mode must be one of {_SCALES}, got {scale_mode!r}")
        self.scale_mode = scale_mode

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return aligned_mtl_weights(gramian, self.scale_mode)
