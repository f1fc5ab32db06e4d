"""aTLAS: task vectors composed with learned anisotropic (block-wise) scaling.

Zhang, Lim, Li, Zhang and Zhou, "Knowledge Composition using Task Vectors with Learned Anisotropic
Scaling", NeurIPS 2024. Every parameter block (here: every tensor) of every task vector gets its
own coefficient, ``theta = base + sum_k sum_b lambda_{k,b} tau_{k,b}``, so a task can contribute its
attention weights but not its feed-forward weights, say. The coefficients are learned by gradient
descent on the tasks' data: ``objective="supervised"`` minimises the summed task losses on labelled
batches (the paper's few-shot setting); ``objective="entropy"`` is an unsupervised variant that
minimises prediction entropy on unlabelled inputs (AdaMerging's criterion, used here instead of the
paper's pseudo-labelling for test-time adaptation). Unlike AdaMerging the coefficients are not
clipped, so a block may be amplified or subtracted.
"""

from __future__ import annotations

import torch

from polytask.merge._data import MergeData, check_models
from polytask.merge._registry import register_merge
from polytask.merge.adamerging import learn_coefficients

__all__ = ["atlas", "atlas_coefficients"]


def atlas_coefficients(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    data: MergeData,
    *,
    objective: str = "supervised",
    init: float = 0.3,
    lr: float = 1e-2,
    steps: int = 50,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[float], list[str]]:
    """(merged state dict, coefficients (tasks, blocks), objective per step, block = tensor names)."""
    data = check_models(base, models, data, "atlas")
    return learn_coefficients(
        base,
        models,
        data,
        granularity="block",
        objective=objective,
        init=init,
        lr=lr,
        steps=steps,
        clip=None,
        method="atlas",
    )


@register_merge(
    "atlas",
    "Zhang et al., Knowledge Composition using Task Vectors with Learned Anisotropic Scaling, NeurIPS 2024",
    "block-wise learned coefficients on task vectors (supervised loss or unsupervised entropy)",
    data_driven=True,
    objective="supervised",
    init=0.3,
    lr=1e-2,
    steps=50,
)
def atlas(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    data: MergeData | None = None,
    objective: str = "supervised",
    init: float = 0.3,
    lr: float = 1e-2,
    steps: int = 50,
) -> dict[str, torch.Tensor]:
    """``objective``: ``"supervised"`` (labelled batches) or ``"entropy"`` (unlabelled inputs)."""
    data = check_models(base, models, data, "atlas")
    return atlas_coefficients(base, models, data, objective=objective, init=init, lr=lr, steps=steps)[0]
