"""Simple and weighted weight averaging ("model soups").

Wortsman, Ilharco, Gadre, Roelofs, Gontijo-Lopes, Morcos, Namkoong, Farhadi, Carmon, Kornblith and
Schmidt, "Model soups: averaging weights of multiple fine-tuned models improves accuracy without
increasing inference time", ICML 2022 (the uniform soup).

``theta = sum_i w_i theta_i / sum_i w_i`` (``normalize=False``: no division); uniform weights by
default. The base model is only the reference for names and shapes; it is not averaged in.
"""

from __future__ import annotations

from typing import Any

import torch

from polytask.merge._checks import check_weights
from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge

__all__ = ["average"]


def _check(p: dict[str, Any], n_models: int) -> None:
    check_weights("average", p["weights"])
    if p["normalize"] and p["weights"] is not None and sum(p["weights"]) == 0:
        raise ValueError("merge method 'average': weights sum to 0; they cannot be normalised (normalize=false)")


@register_merge(
    "average",
    paper="Wortsman et al.: Model soups (ICML 2022)",
    description="(weighted) mean of the fine-tuned weights",
    check=_check,
    weights=None,
    normalize=True,
)
def average(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    ctx: TensorContext,
    weights: list[float] | None,
    normalize: bool,
) -> torch.Tensor:
    w = [1.0] * len(models) if weights is None else weights
    out = models[0] * w[0]
    for m, wi in zip(models[1:], w[1:], strict=True):
        out.add_(m, alpha=wi)
    return out.div_(sum(w)) if normalize else out
