"""Consensus merging with TALL masks: keep only the entries that at least ``k`` tasks rely on.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret and Frossard, "Localizing Task Information for Improved
Model Merging and Compression", ICML 2024.

With the multi-task vector ``tau_MTL = sum_i tau_i``, the TALL mask of task i marks the entries
where the task's own vector outweighs what the others add: ``|tau_i| > tall_lambda * |tau_MTL - tau_i|``
(strict, as in the authors' code). The consensus mask keeps entries set in at least ``k`` TALL
masks (``k = 2`` drops "selfish" weights used by one task only, and "catastrophic" ones used by
none); ``theta = theta_0 + lam * (consensus * tau_MTL)``. The paper picks ``tall_lambda`` per task
on validation data; here one value serves all tasks. Every step is element-wise, so no
whole-model statistics are needed.
"""

from __future__ import annotations

from typing import Any

import torch

from polytask.merge._checks import check_int, check_lambda, check_real
from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge

__all__ = ["consensus", "consensus_count", "tall_masks"]


def tall_masks(base: torch.Tensor, models: list[torch.Tensor], tall_lambda: float) -> list[torch.Tensor]:
    """One boolean TALL mask per task."""
    taus = [m - base for m in models]
    total = torch.stack(taus).sum(0)
    return [t.abs() > (total - t).abs().mul_(tall_lambda) for t in taus]


def consensus_count(base: torch.Tensor, models: list[torch.Tensor], tall_lambda: float) -> torch.Tensor:
    """How many tasks' TALL masks contain each entry."""
    count = torch.zeros(base.shape, dtype=torch.int32)
    for mask in tall_masks(base, models, tall_lambda):
        count += mask
    return count


def _check(p: dict[str, Any], n_models: int) -> None:
    check_lambda("consensus", p["lam"])
    check_real("consensus", p["tall_lambda"], "tall_lambda", lo=0.0)
    check_int("consensus", p["k"], "k", lo=0, hi=n_models)


@register_merge(
    "consensus",
    paper="Wang et al.: Localizing Task Information for Improved Model Merging and Compression (ICML 2024)",
    description="task arithmetic restricted to entries that at least k tasks' TALL masks select",
    check=_check,
    lam=0.3,
    k=2,
    tall_lambda=0.6,
)
def consensus(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    ctx: TensorContext,
    lam: float,
    k: int,
    tall_lambda: float,
) -> torch.Tensor:
    keep = consensus_count(base, models, tall_lambda) >= k
    total = torch.zeros_like(base)
    for m in models:
        total.add_(m).sub_(base)
    return total.masked_fill_(~keep, 0).mul_(lam).add_(base)
