"""LiNeS: scale the merged task vector linearly with layer depth.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret and Frossard, "LiNeS: Post-training Layer Scaling
Prevents Forgetting and Enhances Model Merging", ICLR 2025.

Shallow layers hold general features that merging should disturb least, so the multi-task vector
``tau`` (task arithmetic's ``sum_i w_i tau_i``, or TIES' merged vector with ``on="ties"``) is
scaled per layer ``l`` of ``L`` by ``lam(l) = alpha + beta * l / (L - 1)``:
``theta = theta_0 + lam(l) * tau``.

Depth is read from parameter names: the first dotted component that is an integer
(``encoder.layer.3.…`` -> 3, ``model.layers.10.…`` -> 10, ``transformer.h.2.…`` -> 2), and ``L`` is
one more than the largest such index. Models whose names carry no block index (a small CNN:
``trunk.conv1``, ``trunk.conv2``, ``trunk.fc``), or carry one that is not depth, name their layers
with ``layers``: name prefixes from shallowest to deepest (the longest matching prefix gives a
tensor's depth, ``L`` is their number). Parameters without a depth (embeddings, final norms, heads)
get ``alpha`` with ``unindexed="first"`` (default: treated as shallowest) or ``alpha + beta`` with
``unindexed="last"``. The paper tunes ``alpha`` and ``beta`` on validation data; the defaults here
are only a starting point.
"""

from __future__ import annotations

from typing import Any

import torch

from polytask.merge._checks import check_fraction, check_real, check_weights
from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge
from polytask.merge.task_arithmetic import task_vector_sum
from polytask.merge.ties import TOPK_SCOPES, ties_tensor
from polytask.merge.ties import _stats as _ties_stats

__all__ = ["ON", "lines", "lines_scale", "prefix_depth"]

ON = ("task-arithmetic", "ties")
UNINDEXED = ("first", "last")


def lines_scale(layer: int | None, n_layers: int, alpha: float, beta: float, unindexed: str = "first") -> float:
    """``alpha + beta * l / (L - 1)``; a model with a single indexed layer gets ``alpha``."""
    if layer is None:
        return alpha if unindexed == "first" else alpha + beta
    return alpha if n_layers <= 1 else alpha + beta * layer / (n_layers - 1)


def prefix_depth(name: str, layers: list[str]) -> int | None:
    """Index in ``layers`` of the longest prefix that ``name`` starts with (on a dot boundary)."""
    best, depth = -1, None
    for i, prefix in enumerate(layers):
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best:
            best, depth = len(prefix), i
    return depth


def _check(p: dict[str, Any], n_models: int) -> None:
    check_real("lines", p["alpha"], "alpha")
    check_real("lines", p["beta"], "beta")
    check_weights("lines", p["weights"])
    check_fraction("lines", p["density"])
    for key, allowed in (("on", ON), ("unindexed", UNINDEXED), ("topk", TOPK_SCOPES)):
        if p[key] not in allowed:
            raise ValueError(f"merge method 'lines': {key}='{p[key]}' is not one of {', '.join(allowed)}")
    layers = p["layers"]
    if layers is not None:
        if isinstance(layers, str) or not all(isinstance(v, str) and v for v in layers) or not layers:
            raise ValueError(
                f"merge method 'lines': layers must be a list of tensor-name prefixes, shallowest first, got {layers!r}"
            )
        if len(set(layers)) != len(layers):
            raise ValueError(f"merge method 'lines': layers names a prefix twice: {list(layers)}")
        p["layers"] = list(layers)


def _stats(stream: Any, *, names: list[str], **p: Any) -> Any:
    for prefix in p["layers"] or ():
        if not any(prefix_depth(n, [prefix]) is not None for n in names):
            shown = ", ".join(f"'{n}'" for n in names[:3])
            raise ValueError(
                f"merge method 'lines': layers entry '{prefix}' matches no tensor of the models "
                f"(their names look like {shown}, ...)"
            )
    return _ties_stats(stream, **p) if p["on"] == "ties" else None


@register_merge(
    "lines",
    paper="Wang et al.: LiNeS: Post-training Layer Scaling Prevents Forgetting and Enhances Model Merging (ICLR 2025)",
    description="task arithmetic or TIES with the task vector scaled linearly from alpha (first layer) to alpha+beta",
    check=_check,
    statistics=_stats,
    alpha=0.3,
    beta=0.3,
    on="task-arithmetic",
    unindexed="first",
    density=0.2,
    topk="model",
    weights=None,
    layers=None,
)
def lines(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    ctx: TensorContext,
    alpha: float,
    beta: float,
    on: str,
    unindexed: str,
    density: float,
    topk: str,
    weights: list[float] | None,
    layers: list[str] | None,
) -> torch.Tensor:
    if layers is None:
        scale = lines_scale(ctx.layer, ctx.n_layers, alpha, beta, unindexed)
    else:
        scale = lines_scale(prefix_depth(ctx.name, layers), len(layers), alpha, beta, unindexed)
    if on == "ties":
        tau = ties_tensor(base, models, density, ctx.stats, weights, 1.0).sub_(base)
    else:
        tau = task_vector_sum(base, models, weights)
    return tau.mul_(scale).add_(base)
