"""DARE: drop and rescale task-vector entries, then merge by task arithmetic or TIES.

Yu, Yu, Yu, Huang and Li, "Language Models are Super Mario: Absorbing Abilities from Homologous
Models as a Free Lunch", ICML 2024.

Each entry of each task vector is kept with probability ``density`` (dropped with ``p = 1 - density``)
and, with ``rescale``, divided by ``density`` so that its expectation is unchanged. The sparse task
vectors are then combined by ``combine="task-arithmetic"`` (``theta_0 + lam sum_i w_i tau_i``) or
``combine="ties"`` (TIES sign election and disjoint mean, without TIES' magnitude trim; mergekit's
``dare_ties``). The drop masks depend only on (``seed``, tensor name, model index), so a merge is
reproducible and identical whichever order tensors are processed in.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from polytask.merge._checks import check_fraction, check_int, check_lambda, check_weights
from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge
from polytask.merge.ties import ties_merge_tensor

__all__ = ["COMBINE", "dare", "dare_task_vector"]

COMBINE = ("task-arithmetic", "ties")


def dare_task_vector(tau: torch.Tensor, density: float, rescale: bool, generator: torch.Generator) -> torch.Tensor:
    """Drop entries of ``tau`` (in place) with probability ``1 - density``; rescale survivors by ``1/density``."""
    if density >= 1:
        return tau
    drop = torch.rand(tau.shape, generator=generator, dtype=tau.dtype) >= density
    tau.masked_fill_(drop, 0)
    return tau.div_(density) if rescale else tau


def _check(p: dict[str, Any], n_models: int) -> None:
    check_lambda("dare", p["lam"])
    check_fraction("dare", p["density"])
    check_weights("dare", p["weights"])
    check_int("dare", p["seed"], "seed", lo=0, hi=2**62)
    if p["combine"] not in COMBINE:
        raise ValueError(f"merge method 'dare': combine='{p['combine']}' is not one of {', '.join(COMBINE)}")


@register_merge(
    "dare",
    paper="Yu et al.: Language Models are Super Mario: Absorbing Abilities from Homologous Models (ICML 2024)",
    description="randomly drop task-vector entries and rescale the rest, then task arithmetic or TIES",
    check=_check,
    lam=0.3,
    density=0.5,
    rescale=True,
    combine="task-arithmetic",
    seed=0,
    weights=None,
)
def dare(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    ctx: TensorContext,
    lam: float,
    density: float,
    rescale: bool,
    combine: str,
    seed: int,
    weights: list[float] | None,
) -> torch.Tensor:
    def sparse() -> Iterator[torch.Tensor]:
        for i, m in enumerate(models):
            yield dare_task_vector(m - base, density, rescale, ctx.generator(seed, i))

    if combine == "ties":
        return ties_merge_tensor(base, sparse(), weights, lam)
    out = torch.zeros_like(base)
    for i, tau in enumerate(sparse()):
        out.add_(tau, alpha=1.0 if weights is None else weights[i])
    return out.mul_(lam).add_(base)
