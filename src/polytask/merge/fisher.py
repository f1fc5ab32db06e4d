"""Fisher merging: a per-weight average weighted by each model's diagonal Fisher information.

Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022. The merged weight
is ``theta = sum_k s_k F_k theta_k / sum_k s_k F_k`` (elementwise), where ``F_k`` is the diagonal of
model ``k``'s Fisher information on its own task's inputs,
``F_k = mean_x E_{y ~ p_k(y|x)} [(d log p_k(y|x) / d theta)^2]``, with the expectation over the
model's own predictive distribution (the paper's choice; labels are not needed): for a softmax it
is the probability-weighted sum over classes, for a binary logit ``z`` it is ``p (1 - p) (dz)^2``,
and for regression (unit-variance Gaussian) ``(dy_hat)^2``. Squared gradients are taken per example
(``batch_size=1``, the definition) or per group of ``batch_size`` examples (cheaper, coarser).
``eps`` is added to every Fisher so that weights no task's data touches fall back to the weighted
average; tensors without gradient (buffers) are averaged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from polytask.merge._data import Inputs, MergeData, check_models, float_keys
from polytask.merge._registry import register_merge
from polytask.tasks import TaskKind

__all__ = ["diagonal_fisher", "fisher_average", "fisher_merging"]


def _rows(x: Inputs, sl: slice) -> Inputs:
    if isinstance(x, Mapping):
        return {k: v[sl] for k, v in x.items()}
    return x[sl]


def _n_rows(x: Inputs) -> int:
    return int(next(iter(x.values())).shape[0]) if isinstance(x, Mapping) else int(x.shape[0])


def diagonal_fisher(
    data: MergeData,
    k: int,
    params: Mapping[str, torch.Tensor],
    *,
    batch_size: int = 1,
    max_examples: int | None = None,
    keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of the skeleton's parameters under ``params`` on task ``k``'s inputs
    (only of the parameters in ``keys`` when given)."""
    if batch_size < 1:
        raise ValueError(f"fisher batch_size must be >= 1, got {batch_size}")
    names = [n for n in data.parameter_names() if n in params and params[n].is_floating_point()]
    if keys is not None:
        names = [n for n in names if n in keys]
    live = {n: params[n].detach().float().clone().requires_grad_() for n in names}
    if not live:
        return {}
    fixed = {n: v for n, v in params.items() if n not in live}
    task = data.tasks[k].task
    fisher = {n: torch.zeros_like(v) for n, v in live.items()}
    seen = 0
    for x, _ in data.tasks[k].batches:
        n = _n_rows(x)
        for s in range(0, n, batch_size):
            if max_examples is not None and seen >= max_examples:
                break
            xb = _rows(x, slice(s, s + batch_size))
            pred = data.predict({**fixed, **live}, k, xb)
            for weight, out in _fisher_outputs(pred, task.kind if task is not None else None):
                grads = torch.autograd.grad(out, list(live.values()), retain_graph=True, allow_unused=True)
                for name, g in zip(live, grads, strict=True):
                    if g is not None:
                        fisher[name] += weight * g.square()
            seen += _n_rows(xb)
    if seen == 0:
        raise ValueError(f"task '{data.tasks[k].name}': no examples to estimate the Fisher information")
    return {n: f / seen for n, f in fisher.items()}


def _fisher_outputs(pred: torch.Tensor, kind: TaskKind | None) -> list[tuple[float | torch.Tensor, torch.Tensor]]:
    """``(weight, scalar)`` pairs whose weighted squared gradients sum to the expected Fisher of a group."""
    if kind is TaskKind.REGRESSION:
        return [(1.0, pred.sum())]
    if pred.dim() == 2 and pred.shape[1] > 1 and kind is not TaskKind.MULTILABEL:
        logp = torch.log_softmax(pred, dim=-1)
        p = logp.detach().exp().mean(0)  # groups > 1 example use the group's mean probabilities
        return [(p[c], logp[:, c].sum()) for c in range(pred.shape[1])]
    z = pred.reshape(pred.shape[0], -1)
    p = torch.sigmoid(z.detach()).mean(0)
    return [(p[j] * (1 - p[j]), z[:, j].sum()) for j in range(z.shape[1])]


@register_merge(
    "fisher",
    "Matena and Raffel, Merging Models with Fisher-Weighted Averaging, NeurIPS 2022",
    "per-weight average weighted by each model's diagonal Fisher information on its task's data",
    data_driven=True,
    weights=None,
    batch_size=1,
    max_examples=None,
    eps=1e-8,
)
def fisher_merging(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    data: MergeData | None = None,
    weights: Sequence[float] | None = None,
    batch_size: int = 1,
    max_examples: int | None = None,
    eps: float = 1e-8,
) -> dict[str, torch.Tensor]:
    """``weights``: per-model weights ``s_k`` (default all 1)."""
    data = check_models(base, models, data, "fisher")
    s = [1.0] * len(models) if weights is None else [float(v) for v in weights]
    if len(s) != len(models) or any(v < 0 for v in s) or sum(s) <= 0:
        raise ValueError(f"merge method 'fisher': weights must be {len(models)} non-negative numbers, got {weights}")
    if not eps > 0:
        raise ValueError(f"merge method 'fisher': eps must be positive, got {eps}")
    # Where every model holds the same tensor (e.g. frozen embeddings) any weighting gives it back:
    # no Fisher needed there.
    moved = {key for key in float_keys(base) if any(not torch.equal(m[key], models[0][key]) for m in models[1:])}
    fishers = [
        diagonal_fisher(data, k, m, batch_size=batch_size, max_examples=max_examples, keys=moved)
        for k, m in enumerate(models)
    ]
    return fisher_average(base, models, fishers, s, eps)


def fisher_average(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    fishers: Sequence[Mapping[str, torch.Tensor]],
    scaling: Sequence[float],
    eps: float,
) -> dict[str, torch.Tensor]:
    """``sum_k s_k (F_k + eps) theta_k / sum_k s_k (F_k + eps)``; tensors without Fisher: weighted mean."""
    out: dict[str, torch.Tensor] = {}
    total = sum(scaling)
    float_set = set(float_keys(base))
    for key, b in base.items():
        if key not in float_set:
            out[key] = b.clone()
            continue
        if all(key in f for f in fishers):
            w = [s * (f[key].float() + eps) for s, f in zip(scaling, fishers, strict=True)]
            num = sum(wk * m[key].float() for wk, m in zip(w, models, strict=True))
            merged = num / sum(w)
        else:
            merged = sum(s * m[key].float() for s, m in zip(scaling, models, strict=True)) / total
        out[key] = merged.to(b.dtype)
    return out
