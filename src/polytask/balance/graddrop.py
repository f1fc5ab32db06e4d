"""GradDrop: gradient sign dropout.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai and Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (Algorithm 1, lines 10-15).

Per coordinate, the positive sign purity ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)`` is compared with
one uniform draw U: if ``P > U`` only the positive task-gradient entries are kept, if ``P < U`` only
the negative ones. With leak ``l_i`` a task keeps the fraction ``l_i`` of its gradient regardless.
The update is ``sum_i (l_i + (1 - l_i) M_i) * g_i``.

The paper applies the masks at an activation layer; like the common reimplementations, this applies
them to the flattened shared-parameter gradients. The mask is elementwise, so this is not a
combination of the task gradients with one weight per task: it needs the Jacobian.
``torch.rand`` draws U from torch's global generator, so a seed reproduces it. The weights returned
for logging are the fraction of each task's squared gradient norm that survives,
``(kept_i . g_i) / ||g_i||^2`` (0 for a task without gradient).

Path: per-parameter Jacobian blocks -> direction (``apply_shared_direction``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from polytask.balance._aggregate import check_task_order
from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["GradDrop", "graddrop_direction"]


def graddrop_direction(jacobian: torch.Tensor, leak: float | Sequence[float] | torch.Tensor = 0.0) -> torch.Tensor:
    """The GradDrop update ``(P,)`` for a ``(K, P)`` Jacobian; one ``torch.rand(P)`` draw."""
    k = jacobian.shape[0]
    lk = torch.as_tensor(leak, dtype=jacobian.dtype, device=jacobian.device).expand(k)
    return _graddrop_block(jacobian.detach(), lk)[0]


def _graddrop_block(g: torch.Tensor, leak: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GradDrop on one block of coordinates ``g`` (K, n): the update (n,), each task's kept squared
    norm ``kept_k . g_k`` (K,) and squared norm (K,).

    Written with the positive and negative parts only: ``sum_k |g_k| = pos - neg`` and the kept
    entries sum to ``pos`` or ``neg``, so no (K, n) mask or product is formed.
    """
    if g.numel() == 0:
        z = torch.zeros(g.shape[0], dtype=g.dtype, device=g.device)
        return torch.zeros(g.shape[1], dtype=g.dtype, device=g.device), z, z
    pos_part = g.clamp_min(0)
    neg_part = g - pos_part
    pos, neg = pos_part.sum(0), neg_part.sum(0)
    # purity > U  <=>  sum > (2U - 1) * sum|g|: no division, no special case for all-zero columns
    # (their update is zero whichever sign is kept).
    threshold = torch.rand(pos.shape, dtype=g.dtype, device=g.device).mul_(2.0).sub_(1.0).mul_(pos - neg)
    total = pos + neg
    # Float masks: multiplying by them is several times faster on CPU than torch.where on bools.
    take_pos, take_neg = (total > threshold).to(g.dtype), (total < threshold).to(g.dtype)
    leak = leak.to(g.dtype)
    if bool((leak == 0).all()):
        direction = pos.mul_(take_pos).addcmul_(neg, take_neg)
    else:
        keep = 1.0 - leak
        direction = (leak @ g).addcmul_(keep @ pos_part, take_pos).addcmul_(keep @ neg_part, take_neg)
    pos_sq, neg_sq = pos_part.square_(), neg_part.square_()
    return direction, pos_sq @ take_pos + neg_sq @ take_neg, pos_sq.sum(1) + neg_sq.sum(1)


@register_balancer(
    "graddrop",
    paper="Chen et al.: Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign Dropout (NeurIPS 2020)",
    description="per coordinate, keep only the positive or only the negative gradient entries, drawn by sign purity",
    leak=0.0,
)
class GradDrop(Balancer):
    level = "gradient"

    def __init__(self, tasks: list[Task], leak: float | Sequence[float] = 0.0) -> None:
        super().__init__(tasks)
        values = [float(leak)] * len(tasks) if isinstance(leak, int | float) else [float(v) for v in leak]
        if len(values) != len(tasks) or not all(0.0 <= v <= 1.0 for v in values):
            raise ValueError(f"graddrop leak must be in [0, 1], one value or one per task; got {leak}")
        self.register_buffer("leak", torch.tensor(values, dtype=torch.float64), persistent=False)

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        check_task_order(self, engine)
        # Block by block (one parameter tensor at a time): no (K, P) Jacobian is concatenated, and
        # successive draws of U equal one torch.rand(P) draw on CPU.
        parts, kept, sq = [], 0.0, 0.0
        for block in engine.per_task_gradients():
            d, kept_b, sq_b = _graddrop_block(block, self.leak)
            parts.append(d)
            kept, sq = kept + kept_b, sq + sq_b
        engine.apply_shared_direction(parts)
        leak = self.leak.to(sq.dtype)
        share = torch.where(sq > 0, (leak * sq + (1.0 - leak) * kept) / sq.clamp_min(torch.finfo(sq.dtype).tiny), 0.0)
        return dict(zip(engine.task_names, share.tolist(), strict=True))
