"""Model Breadcrumbs: drop both the largest (outlier) and the smallest task-vector entries per layer.

Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024.

Within each tensor of each task vector, rank entries by magnitude: the top ``gamma`` share
(outliers) and everything below the top ``gamma + density`` share are zeroed, so a ``density``
share survives in the middle band. ``theta = theta_0 + lam sum_i w_i (mask_i * tau_i)``.
Thresholds are exact (:func:`polytask.merge._select.kth_largest`); ties at a threshold side with
the band below it.
"""

from __future__ import annotations

from typing import Any

import torch

from polytask.merge._checks import check_fraction, check_lambda, check_weights
from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge
from polytask.merge._select import kth_largest, top_count

__all__ = ["breadcrumbs", "breadcrumbs_mask"]


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """The two-sided mask: entries whose magnitude rank is below the top ``gamma`` and within ``gamma + density``."""
    a = tau.reshape(-1).abs()
    n = a.numel()
    k_lo = top_count(n, min(1.0, gamma + density))
    keep = a >= kth_largest(a, k_lo)
    k_hi = top_count(n, gamma)
    if k_hi:
        keep &= a < kth_largest(a, k_hi)
    return keep.view(tau.shape)


def _check(p: dict[str, Any], n_models: int) -> None:
    check_lambda("breadcrumbs", p["lam"])
    check_fraction("breadcrumbs", p["density"])
    check_fraction("breadcrumbs", p["gamma"], "gamma", zero_ok=True)
    check_weights("breadcrumbs", p["weights"])
    if p["gamma"] + p["density"] > 1:
        raise ValueError(
            f"merge method 'breadcrumbs': gamma + density = {p['gamma'] + p['density']} exceeds 1; lower one of them"
        )


@register_merge(
    "breadcrumbs",
    paper="Davari and Belilovsky: Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks (ECCV 2024)",
    description="per layer, drop the largest gamma share and the smallest entries of each task vector; sum",
    check=_check,
    lam=0.3,
    density=0.8,
    gamma=0.01,
    weights=None,
)
def breadcrumbs(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    ctx: TensorContext,
    lam: float,
    density: float,
    gamma: float,
    weights: list[float] | None,
) -> torch.Tensor:
    out = torch.zeros_like(base)
    for i, m in enumerate(models):
        tau = m - base
        tau.masked_fill_(~breadcrumbs_mask(tau, density, gamma), 0)
        out.add_(tau, alpha=1.0 if weights is None else weights[i])
    return out.mul_(lam).add_(base)
