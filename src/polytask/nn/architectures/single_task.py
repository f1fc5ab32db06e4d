"""Single-task baseline: one complete, independent network per task.

Not a multi-task method but the reference every result is compared with: the multi-task gain Δm
(Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019) is measured
against it. Each task gets its own stem, trunk and tower with the same shapes as the shared-bottom
model, so the two differ only in what is shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, make_expert, make_stem, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.tasks import Task

__all__ = ["SingleTask"]


class _Net(nn.Module):
    def __init__(self, stem: nn.Module, trunk: nn.Module, head: TaskHead) -> None:
        super().__init__()
        self.stem, self.trunk, self.head = stem, trunk, head

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.head(self.trunk(self.stem(x)))


@register_model(
    "single",
    paper="single-task baseline (the reference of Δm; Maninis et al., CVPR 2019)",
    description="one independent network (stem + trunk + tower) per task; shares nothing",
    hidden="auto",
    tower_hidden="auto",
    dropout=0.0,
    emb_dim="auto",
)
class SingleTask(MultiTaskModel):
    """K independent networks; every parameter belongs to exactly one task.

    Args:
        hidden: trunk widths. ``"auto"``: ``(128, 64)`` MLP for tables; for images the LeNet trunk
            alone (``()``; non-empty adds fc layers after it).
        tower_hidden: tower widths before the output layer. ``"auto"``: ``(32,)`` for tables,
            ``(50,)`` for images (Sener & Koltun's MultiLeNet head).
        dropout: dropout after each hidden fc layer of trunk and tower.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`).
    """

    independent = True

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        hidden: Hidden = "auto",
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        trunk_h = resolve_hidden(hidden, input_spec, tabular=(128, 64), image=())
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(32,), image=(50,))
        nets = []
        for task in tasks:
            stem = make_stem(input_spec, emb_dim)
            trunk = make_expert(input_spec, stem.out_dim, trunk_h, dropout)
            nets.append(_Net(stem, trunk, TaskHead(trunk.out_dim, task, tower_h, dropout)))
        self.nets = nn.ModuleList(nets)

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        # nothing is shared, so there is no shared representation
        return {t.name: net(x) for t, net in zip(self.tasks, self.nets, strict=True)}, []

    def task_parameter_names(self, task: str) -> list[str]:
        return self._parameter_names_under(f"nets.{self._task_index(task)}")
