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

Path: Jacobian -> direction (``apply_shared_direction``).
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
    return _graddrop(jacobian, leak)[0]


def _graddrop(
    jacobian: torch.Tensor, leak: float | Sequence[float] | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    j = jacobian.detach()
    k = j.shape[0]
    lk = torch.as_tensor(leak, dtype=j.dtype, device=j.device).expand(k).reshape(k, 1)
    if j.numel() == 0:
        return torch.zeros(j.shape[1], dtype=j.dtype, device=j.device), torch.zeros(k, dtype=j.dtype)
    total = j.abs().sum(dim=0)
    purity = 0.5 * (1.0 + torch.where(total > 0, j.sum(dim=0) / total.clamp_min(torch.finfo(j.dtype).tiny), 0.0))
    u = torch.rand(purity.shape, dtype=j.dtype, device=j.device)
    keep = ((purity > u) & (j > 0)) | ((purity < u) & (j < 0))
    kept = (lk + (1.0 - lk) * keep) * j
    sq = (j * j).sum(dim=1)
    share = torch.where(sq > 0, (kept * j).sum(dim=1) / sq.clamp_min(torch.finfo(j.dtype).tiny), 0.0)
    return kept.sum(dim=0), share


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
        direction, share = _graddrop(engine.jacobian(), self.leak)
        engine.apply_shared_direction(direction)
        return dict(zip(engine.task_names, share.tolist(), strict=True))
