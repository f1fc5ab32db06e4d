"""Shared-bottom network: hard parameter sharing.

Caruana, "Multitask Learning", Machine Learning 28(1), 1997. All tasks share the input stem and the
trunk; each task has its own tower.
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

__all__ = ["SharedBottom"]


@register_model(
    "shared-bottom",
    paper="Caruana, 'Multitask Learning', Machine Learning 28(1), 1997",
    description="hard parameter sharing: shared stem + trunk, one tower per task",
    hidden="auto",
    tower_hidden="auto",
    dropout=0.0,
    emb_dim="auto",
)
class SharedBottom(MultiTaskModel):
    """Shared stem and trunk, a :class:`TaskHead` per task.

    The shared representation is ``[trunk output (N, d)]``: every task reads it and nothing else, so
    it separates the shared parameters from the task-specific ones exactly.

    Args:
        hidden: trunk widths. ``"auto"``: ``(128, 64)`` MLP for tables; for images the LeNet trunk
            alone (``()``; non-empty adds fc layers after it).
        tower_hidden: tower widths. ``"auto"``: ``(32,)`` for tables, ``(50,)`` for images.
        dropout: dropout after each hidden fc layer of trunk and towers.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`).
    """

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
        self.stem = make_stem(input_spec, emb_dim)
        self.trunk = make_expert(input_spec, self.stem.out_dim, trunk_h, dropout)
        self.towers = nn.ModuleList(TaskHead(self.trunk.out_dim, t, tower_h, dropout) for t in tasks)

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        z = self.trunk(self.stem(x))
        return {t.name: tower(z) for t, tower in zip(self.tasks, self.towers, strict=True)}, [z]

    def task_parameter_names(self, task: str) -> list[str]:
        return self._parameter_names_under(f"towers.{self._task_index(task)}")
