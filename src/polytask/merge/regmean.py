"""RegMean: the closed-form merge of every linear layer from its inputs' Gram matrices.

Jin, Ren, Preotiuc-Pietro and Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023. For a linear layer ``y = x W^T`` with weights ``W_k`` in model ``k`` and inputs
``X_k`` (rows: every token that reaches the layer when model ``k`` runs on its task's data), the
weights minimising ``sum_k ||X_k W^T - X_k W_k^T||^2`` are
``W^T = (sum_k G_k)^{-1} sum_k G_k W_k^T`` with ``G_k = X_k^T X_k``. The paper shrinks the
off-diagonal entries, ``G~_k = alpha G_k + (1 - alpha) diag(G_k)`` (``alpha = 1``: the exact
solution; ``alpha = 0``: a per-input-feature weighted average), which keeps the inverse well
conditioned. Gram matrices are means over rows (each task counts the same however many tokens it
has). Every other tensor (biases, norms, embeddings) is the plain average.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import nn

from polytask.merge._data import MergeData, check_models, float_keys
from polytask.merge._registry import register_merge

__all__ = ["gram_matrices", "regmean", "regmean_combine"]


@torch.no_grad()
def gram_matrices(data: MergeData, k: int, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``weight key -> mean x^T x`` over the inputs of every linear layer of the skeleton (float64)."""
    grams: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(key: str) -> Callable[..., None]:
        def fn(_module: nn.Module, args: tuple[torch.Tensor, ...], _out: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            grams[key] = grams.get(key, 0) + x.T @ x
            counts[key] = counts.get(key, 0) + x.shape[0]

        return fn

    for name, mod in data.module.named_modules():
        key = f"{name}.weight" if name else "weight"
        if isinstance(mod, nn.Linear) and key in params:
            handles.append(mod.register_forward_hook(hook(key)))
    try:
        for x, _ in data.tasks[k].batches:
            data.predict(params, k, x)
    finally:
        for h in handles:
            h.remove()
    return {key: g / counts[key] for key, g in grams.items()}


def regmean_combine(weights: Sequence[torch.Tensor], grams: Sequence[torch.Tensor], alpha: float) -> torch.Tensor:
    """RegMean's merged weight ``(out, in)`` of weights ``W_k`` with Gram matrices ``G_k`` ``(in, in)``."""
    shrunk = [alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g)) for g in grams]
    total = sum(shrunk)
    rhs = sum(g @ w.double().T for g, w in zip(shrunk, weights, strict=True))
    try:
        sol = torch.linalg.solve(total, rhs)
    except RuntimeError:  # singular: inputs span fewer dimensions than the layer has; least norm
        sol = torch.linalg.pinv(total) @ rhs
    return sol.T


@register_merge(
    "regmean",
    "Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    "closed-form merge of each linear layer from its inputs' Gram matrices (off-diagonals scaled by alpha); "
    "other tensors averaged",
    data_driven=True,
    alpha=0.9,
)
def regmean(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    data: MergeData | None = None,
    alpha: float = 0.9,
) -> dict[str, torch.Tensor]:
    """``alpha`` in [0, 1] scales the Gram matrices' off-diagonal entries."""
    data = check_models(base, models, data, "regmean")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"merge method 'regmean': alpha must be in [0, 1], got {alpha}")
    grams = [gram_matrices(data, k, m) for k, m in enumerate(models)]
    linear = set.intersection(*(set(g) for g in grams)) if grams else set()
    out: dict[str, torch.Tensor] = {}
    float_set = set(float_keys(base))
    for key, b in base.items():
        if key not in float_set:
            out[key] = b.clone()
        elif key in linear:
            out[key] = regmean_combine([m[key] for m in models], [g[key] for g in grams], alpha).to(b.dtype)
        else:
            out[key] = (sum(m[key].float() for m in models) / len(models)).to(b.dtype)
    return out
