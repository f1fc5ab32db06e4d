"""Model Stock: interpolate between the average of fine-tuned models and the pretrained model, per layer.

Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024 (Eq. 7).

Per tensor, with ``cos`` the mean pairwise cosine between task vectors ``tau_i = theta_i - theta_0``
over all ``i < j``, the interpolation ratio is ``t = N cos / (1 + (N - 1) cos)`` and
``theta = t * mean_i(theta_i) + (1 - t) * theta_0``. A tensor where some task vector is zero has
no defined angle; it keeps ``theta_0`` (``t = 0``). Needs at least two fine-tuned models.
"""

from __future__ import annotations

from typing import Any

import torch

from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge

__all__ = ["model_stock", "model_stock_ratio"]


def model_stock_ratio(base: torch.Tensor, models: list[torch.Tensor]) -> float:
    """``t = N cos / (1 + (N - 1) cos)`` from the mean pairwise cosine of the task vectors."""
    n = len(models)
    taus = torch.stack([(m - base).reshape(-1) for m in models])
    dots = (taus @ taus.T).double()
    norms = dots.diagonal().sqrt()
    if bool((norms == 0).any()):
        return 0.0
    gram = dots / (norms[:, None] * norms[None, :])
    cos = float((gram.sum() - gram.diagonal().sum()) / (n * (n - 1)))
    return n * cos / (1 + (n - 1) * cos)


def _check(p: dict[str, Any], n_models: int) -> None:
    if n_models < 2:
        raise ValueError("merge method 'model-stock' needs at least two fine-tuned models (it measures their angle)")


@register_merge(
    "model-stock",
    paper="Jang et al.: Model Stock: All we need is just a few fine-tuned models (ECCV 2024)",
    description="per layer, move from the pretrained weights towards the fine-tuned mean by a ratio set by their angle",
    check=_check,
)
def model_stock(base: torch.Tensor, models: list[torch.Tensor], *, ctx: TensorContext) -> torch.Tensor:
    t = model_stock_ratio(base, models)
    mean = torch.stack(models).mean(0)
    return mean.mul_(t).add_(base, alpha=1 - t)
