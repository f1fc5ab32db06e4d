"""PCB-merging: parameter competition balancing.

Du, Lee, Li, Jiang, Guo, Yu, Liu, Goh, Tang, He and Zhang, "Parameter Competition Balancing for
Model Merging", NeurIPS 2024.

For task vectors ``tau_i`` (``N`` tasks), as in the authors' released implementation, with the
normalisations and quantiles taken over each task's whole flattened task vector:

1. clamp ``|tau_i|`` to its [0.01%, 99.99%] quantiles (``a_i``; the clamped vector keeps its sign);
2. intra-balancing (self-awareness): ``exp(N * Norm(a_i)^2)`` with ``Norm`` the min-max scaling over
   the task's entries (the numerator of the paper's ``Softmax(N * Norm(tau_i * tau_i))``);
3. inter-balancing (cross-awareness): ``tanh(tau_i * sum_j tau_j)``, how much entry agrees with the
   other tasks;
4. ``beta_i`` = product of the two; drop: clamp below at its ``1 - ratio`` quantile and min-max
   scale, so only the top ``ratio`` share keeps a positive weight;
5. ``theta = theta_0 + lam * sum_i beta_i sign(tau_i) a_i / sum_i beta_i``.

The per-task quantiles, minima and maxima are whole-model statistics: two streaming stages (each a
sampled pass plus one full pass, :func:`polytask.merge._select.kth_largest_stream`) before the merge
pass, so the models are never materialised.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from polytask.merge._checks import check_fraction, check_lambda
from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge
from polytask.merge._select import ValuesFn, kth_largest_stream

__all__ = ["CLAMP", "pcb", "pcb_scores"]

CLAMP = 1e-4  # share clamped at each end of |tau_i| (the authors' value)


def _rank_k(d: int, ascending_index: int) -> int:
    """k of the k-th largest for a 0-based position in the ascending order."""
    return d - ascending_index


def _scale01(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Min-max scaling to [0, 1]; a constant vector (hi == lo) maps to 0."""
    return (x.clamp(lo, hi) - lo).div_(hi - lo) if hi > lo else torch.zeros_like(x)


def pcb_scores(taus: list[torch.Tensor], abs_bounds: list[tuple[float, float]]) -> list[torch.Tensor]:
    """The balancing scores ``exp(N Norm(a_i)^2) * tanh(tau_i * sum_j tau_j)`` of every task."""
    n = len(taus)
    total = torch.stack(taus).sum(0)
    out = []
    for tau, (lo, hi) in zip(taus, abs_bounds, strict=True):
        self_aware = _scale01(tau.abs(), lo, hi).square_().mul_(n).exp_()
        out.append(self_aware.mul_(torch.tanh(tau * total)))
    return out


def _stats(stream: Any, *, n_models: int, numel: int, ratio: float, **_: Any) -> dict[str, list]:
    d = numel

    def taus(base: torch.Tensor, models: list[torch.Tensor], idx: torch.Tensor | slice | None) -> list[torch.Tensor]:
        b = base.reshape(-1)
        if idx is None:
            return [m.reshape(-1) - b for m in models]
        bi = b[idx]
        return [m.reshape(-1)[idx] - bi for m in models]

    def stage1() -> Iterator[tuple[int, ValuesFn]]:
        for _, base, models in stream():

            def values(idx: torch.Tensor | slice | None, base: torch.Tensor = base, models: list = models) -> list:
                a = [t.abs_() for t in taus(base, models, idx)]
                return a + a

            yield base.numel(), values

    ks_abs = [_rank_k(d, int(d * CLAMP))] * n_models + [_rank_k(d, int(d * (1 - CLAMP) - 1))] * n_models
    q = kth_largest_stream(stage1, d, ks_abs)
    bounds = list(zip(q[:n_models], q[n_models:], strict=True))

    def stage2() -> Iterator[tuple[int, ValuesFn]]:
        for _, base, models in stream():

            def values(idx: torch.Tensor | slice | None, base: torch.Tensor = base, models: list = models) -> list:
                s = pcb_scores(taus(base, models, idx), bounds)
                return s + s

            yield base.numel(), values

    ks_score = [_rank_k(d, int(d * (1 - ratio)))] * n_models + [1] * n_models
    p = kth_largest_stream(stage2, d, ks_score)
    return {"abs_bounds": bounds, "score_bounds": list(zip(p[:n_models], p[n_models:], strict=True))}


def _check(p: dict[str, Any], n_models: int) -> None:
    check_lambda("pcb", p["lam"])
    check_fraction("pcb", p["ratio"], "ratio")


@register_merge(
    "pcb",
    paper="Du et al.: Parameter Competition Balancing for Model Merging (NeurIPS 2024)",
    description="weight every entry by its importance within its task and agreement across tasks; keep the top ratio",
    check=_check,
    statistics=_stats,
    lam=1.0,
    ratio=0.1,
)
def pcb(
    base: torch.Tensor, models: list[torch.Tensor], *, ctx: TensorContext, lam: float, ratio: float
) -> torch.Tensor:
    taus = [m - base for m in models]
    stats = ctx.stats
    scores = pcb_scores(taus, stats["abs_bounds"])
    num = torch.zeros_like(base)
    den = torch.zeros_like(base)
    for tau, s, (lo, hi), (s_lo, s_hi) in zip(taus, scores, stats["abs_bounds"], stats["score_bounds"], strict=True):
        w = _scale01(s, s_lo, s_hi)
        num.add_(tau.abs().clamp_(lo, hi).mul_(torch.sign(tau)).mul_(w))
        den.add_(w)
    return num.div_(den.clamp_(min=1e-12)).mul_(lam).add_(base)
