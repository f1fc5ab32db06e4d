"""AdaMerging: task arithmetic with merging coefficients learned by entropy minimisation.

Yang, Wang, Shen, Liu, Guo, Wang and Tao, "AdaMerging: Adaptive Model Merging for Multi-Task
Learning", ICLR 2024. The merged model is ``base + sum_k lambda_k tau_k`` (``granularity="task"``,
*task-wise AdaMerging*) or ``base + sum_k lambda_{k,l} tau_{k,l}`` with one coefficient per task and
tensor (``granularity="layer"``, *layer-wise AdaMerging*, the paper's stronger variant). The
coefficients start at ``init`` (the paper: 0.3), are trained with Adam to minimise the summed mean
Shannon entropy of every task's predictions on its *unlabelled* inputs (labels, if present, are
ignored), and are clipped to ``[0, 1]`` after each step as in the authors' code. Regression tasks
have no predictive distribution and add no entropy term; their task vectors are still merged and
their coefficients still move through the other tasks' terms.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from polytask.merge._coeffs import TaskVectors, check_objective, optimise
from polytask.merge._data import MergeData, check_models
from polytask.merge._registry import register_merge

__all__ = ["adamerging", "learn_coefficients"]


def learn_coefficients(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    data: MergeData,
    *,
    granularity: str,
    objective: str,
    init: float,
    lr: float,
    steps: int,
    clip: tuple[float, float] | None,
    method: str,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[float], list[str]]:
    """(merged state dict, coefficients (tasks, blocks), objective per step, block names)."""
    check_objective(data, objective, method)
    tv = TaskVectors(base, models)
    blocks = tv.block_index(granularity)
    n_blocks = max(blocks.values(), default=0) + 1
    lam = torch.full((len(models), n_blocks), float(init), requires_grad=True)

    def project() -> None:
        if clip is not None:
            lam.clamp_(*clip)

    history = optimise(data, lambda: tv.combine(lam, blocks), [lam], objective, steps, lr, project=project)
    with torch.no_grad():
        merged = tv.finish(tv.combine(lam, blocks))
    names = ["all"] if granularity == "task" else list(tv.keys)
    return merged, lam.detach().clone(), history, names


@register_merge(
    "adamerging",
    "Yang et al., AdaMerging: Adaptive Model Merging for Multi-Task Learning, ICLR 2024",
    "task arithmetic with task-wise or layer-wise coefficients learned by entropy minimisation on unlabelled inputs",
    data_driven=True,
    granularity="layer",
    init=0.3,
    lr=1e-3,
    steps=100,
)
def adamerging(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    data: MergeData | None = None,
    granularity: str = "layer",
    init: float = 0.3,
    lr: float = 1e-3,
    steps: int = 100,
) -> dict[str, torch.Tensor]:
    """``granularity``: ``"task"`` (one coefficient per task) or ``"layer"`` (per task and tensor)."""
    data = check_models(base, models, data, "adamerging")
    if granularity not in ("task", "layer"):
        raise ValueError(f"merge method 'adamerging': granularity must be 'task' or 'layer', got '{granularity}'")
    merged, _, _, _ = learn_coefficients(
        base,
        models,
        data,
        granularity=granularity,
        objective="entropy",
        init=init,
        lr=lr,
        steps=steps,
        clip=(0.0, 1.0),
        method="adamerging",
    )
    return merged
