"""TIES-merging: trim, elect sign, disjoint merge.

Yadav, Tam, Choshen, Raffel and Bansal, "TIES-Merging: Resolving Interference When Merging
Models", NeurIPS 2023 (Algorithm 1).

1. Trim: keep the ``density`` share of largest-magnitude entries of each task vector
   ``tau_i = theta_i - theta_0``, zero the rest. ``topk="model"`` (the paper) ranks over the whole
   model; ``topk="tensor"`` (as mergekit does) ranks within each tensor. Exactly
   ``round(density * n)`` entries are kept up to ties at the threshold (kept too).
2. Elect: per entry, the sign of the (weighted) sum of trimmed task vectors ("sign with the
   larger total mass").
3. Disjoint merge: the (weighted) mean of the trimmed entries that carry the elected sign;
   ``theta = theta_0 + lam * tau_m``. Entries where no model agrees stay at ``theta_0``.

The whole-model thresholds come from a streaming first pass (:mod:`polytask.merge._select`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch

from polytask.merge._checks import check_fraction, check_lambda, check_weights
from polytask.merge._engine import TensorContext
from polytask.merge._registry import register_merge
from polytask.merge._select import SAMPLE, ValuesFn, kth_largest, kth_largest_stream, top_count

__all__ = [
    "BLOCK",
    "TOPK_SCOPES",
    "SignElection",
    "magnitude_thresholds",
    "tensor_thresholds",
    "ties",
    "ties_merge_tensor",
    "ties_tensor",
]

# Elements per block of the merge pass: the accumulators and temporaries of a block (eight buffers of
# 256 kB) stay in a core's L2 cache (2 MB here); 2**18 was 1.5x slower, 2**14 1.2x (N = 4, 4M entries).
BLOCK = 1 << 16

TOPK_SCOPES = ("model", "tensor")


def _abs_task_vectors(base: torch.Tensor, models: list[torch.Tensor]) -> ValuesFn:
    """``|theta_i - theta_0|`` of every model at the asked positions, computed only there."""
    b = base.reshape(-1)
    flat = [m.reshape(-1) for m in models]

    def values(where: torch.Tensor | slice | None) -> list[torch.Tensor]:
        if where is None:
            return [(m - b).abs_() for m in flat]
        bw = b[where]
        return [(m[where] - bw).abs_() for m in flat]

    return values


def tensor_thresholds(base: torch.Tensor, models: list[torch.Tensor], density: float) -> list[float]:
    """Per-tensor top-k thresholds of ``|theta_i - theta_0|`` (0: keep every non-zero entry)."""
    if density >= 1:
        return [0.0] * len(models)
    n = base.numel()
    k = top_count(n, density)
    if n <= 4 * SAMPLE:  # small: kthvalue directly
        return [float(kth_largest(a, k)) for a in _abs_task_vectors(base, models)(None)]
    return kth_largest_stream(lambda: [(n, _abs_task_vectors(base, models))], n, [k] * len(models))


def magnitude_thresholds(stream: Any, n_models: int, numel: int, density: float) -> list[float]:
    """Whole-model top-k thresholds of ``|theta_i - theta_0|``, one per model, by streaming passes."""
    if density >= 1:
        return [0.0] * n_models

    def passes() -> Iterator[tuple[int, ValuesFn]]:
        for _, base, models in stream():
            yield base.numel(), _abs_task_vectors(base, models)

    return kth_largest_stream(passes, numel, [top_count(numel, density)] * n_models)


class SignElection:
    """Accumulates trimmed task vectors for TIES' sign election and disjoint mean, one model at a time.

    An entry survives the trim when ``|tau| >= t``, i.e. ``tau >= t`` (a positive vote) or
    ``tau <= -t`` (a negative one), so with weights ``w_i`` four running sums suffice: the mass
    ``P``/``N`` and the weight ``cP``/``cN`` of the positive/negative survivors. The elected sign is
    that of ``P + N`` and the disjoint mean is ``P / cP`` or ``N / cN``: seven element-wise passes
    per model (no separate magnitude, sign or mask tensors), masks kept as 0/1 floats (comparisons
    into float outputs are vectorised; into bool they are several times slower).
    """

    def __init__(self, like: torch.Tensor) -> None:
        self.p, self.n, self.cp, self.cn = (torch.zeros_like(like) for _ in range(4))
        self._keep = torch.empty_like(like)
        self._other = torch.empty_like(like)
        self._w_min = math.inf  # smallest positive weight added
        self._w_negative = False

    def zero_(self) -> None:
        for t in (self.p, self.n, self.cp, self.cn):
            t.zero_()
        self._w_min, self._w_negative = math.inf, False

    def add(self, tau: torch.Tensor, threshold: float, weight: float = 1.0) -> None:
        """Add ``tau`` trimmed to the entries with ``|tau| >= threshold`` (exact zeros never vote)."""
        if weight > 0:
            self._w_min = min(self._w_min, weight)
        elif weight < 0:
            self._w_negative = True
        keep = self._keep
        if threshold > 0:
            torch.ge(tau, threshold, out=keep)
        else:
            torch.gt(tau, 0, out=keep)
        self.p.addcmul_(tau, keep, value=weight)
        self.cp.add_(keep, alpha=weight)
        if threshold > 0:
            torch.le(tau, -threshold, out=keep)
        else:
            torch.lt(tau, 0, out=keep)
        self.n.addcmul_(tau, keep, value=weight)
        self.cn.add_(keep, alpha=weight)

    def merged(self) -> torch.Tensor:
        """The disjoint mean (0 where no model carries the elected sign); consumes the accumulators."""
        total = torch.add(self.p, self.n, out=self._other)
        if self._w_negative or math.isinf(self._w_min):
            up = total > 0
            num = torch.where(up, self.p, self.n)
            den = torch.where(up, self.cp, self.cn)
            return torch.where((den != 0) & (total != 0), num / den, torch.zeros((), dtype=num.dtype))
        # Weights >= 0: P >= 0 >= N, and P > 0 (N < 0) implies cP (cN) >= the smallest positive weight,
        # so raising cP and cN to at least half that changes no quotient that is used, and 0/1 float
        # masks then select by arithmetic: torch.where with an unpredictable mask runs a branch per entry
        # (~10x slower on CPU). The same numbers as the torch.where form, bit for bit (finite inputs).
        floor = 0.5 * self._w_min
        up = torch.gt(total, 0, out=self._keep)
        down = torch.lt(total, 0, out=self._other)  # overwrites total, no longer needed
        pos = self.p.div_(self.cp.clamp_(min=floor)).mul_(up)
        return pos.addcmul_(self.n.div_(self.cn.clamp_(min=floor)), down)


def ties_merge_tensor(
    base: torch.Tensor,
    taus: Iterator[torch.Tensor],
    weights: list[float] | None,
    lam: float,
    thresholds: list[float] | None = None,
) -> torch.Tensor:
    """Sign election and disjoint mean over a stream of task vectors, each trimmed at its threshold.

    Without ``thresholds`` every non-zero entry votes (for vectors that are sparse already, e.g. DARE's).
    """
    acc = SignElection(base)
    for i, tau in enumerate(taus):
        acc.add(tau, 0.0 if thresholds is None else thresholds[i], 1.0 if weights is None else weights[i])
    return acc.merged().mul_(lam).add_(base)


def ties_tensor(
    base: torch.Tensor,
    models: list[torch.Tensor],
    density: float,
    thresholds: list[float] | None,
    weights: list[float] | None,
    lam: float,
) -> torch.Tensor:
    """TIES on one tensor: per-tensor thresholds unless given, then block by block over all models."""
    b = base.reshape(-1)
    flat = [m.reshape(-1) for m in models]
    if thresholds is None:
        thresholds = tensor_thresholds(base, models, density)
    out = torch.empty_like(b)
    acc: SignElection | None = None
    for start in range(0, b.numel(), BLOCK):
        sl = slice(start, start + BLOCK)
        bb = b[sl]
        if acc is None or bb.numel() != acc.p.numel():
            acc = SignElection(bb)
            tau = torch.empty_like(bb)
        else:
            acc.zero_()
        for i, m in enumerate(flat):
            torch.sub(m[sl], bb, out=tau)
            acc.add(tau, thresholds[i], 1.0 if weights is None else weights[i])
        torch.add(bb, acc.merged(), alpha=lam, out=out[sl])
    return out.view(base.shape)


def _check(p: dict[str, Any], n_models: int) -> None:
    check_lambda("ties", p["lam"])
    check_fraction("ties", p["density"])
    check_weights("ties", p["weights"])
    if p["topk"] not in TOPK_SCOPES:
        raise ValueError(f"merge method 'ties': topk='{p['topk']}' is not one of {', '.join(TOPK_SCOPES)}")


def _stats(stream: Any, *, n_models: int, numel: int, density: float, topk: str, **_: Any) -> list[float] | None:
    return magnitude_thresholds(stream, n_models, numel, density) if topk == "model" else None


@register_merge(
    "ties",
    paper="Yadav et al.: TIES-Merging: Resolving Interference When Merging Models (NeurIPS 2023)",
    description="trim each task vector to its top-k magnitudes, elect signs by mass, average agreeing entries",
    check=_check,
    statistics=_stats,
    lam=1.0,
    density=0.2,
    topk="model",
    weights=None,
)
def ties(
    base: torch.Tensor,
    models: list[torch.Tensor],
    *,
    ctx: TensorContext,
    lam: float,
    density: float,
    topk: str,
    weights: list[float] | None,
) -> torch.Tensor:
    return ties_tensor(base, models, density, ctx.stats, weights, lam)
