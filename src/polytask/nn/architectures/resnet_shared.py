"""Shared-bottom network on a residual trunk: hard parameter sharing for images.

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016 (the trunk: see
:mod:`polytask.nn.resnet`), shared as in Caruana, "Multitask Learning", Machine Learning 1997: all tasks
read the globally pooled trunk features, each through its own head.

Choices: the trunk's last map is pooled to a 2x2 grid rather than globally (see
:mod:`polytask.nn.resnet`); each head is a linear layer on the pooled features by default
(``tower_hidden=()``), as the paper's classifier; images only (a tabular input is refused with a
one-line error).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, make_stem, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.nn.resnet import ResNetTrunk, require_image
from polytask.tasks import Task

__all__ = ["ResNetSharedBottom"]


@register_model(
    "resnet-shared-bottom",
    paper="He et al., 'Deep Residual Learning for Image Recognition', CVPR 2016 (trunk); Caruana 1997 (sharing)",
    description="hard parameter sharing on a small ResNet trunk (images), one head per task",
    widths=(16, 32, 64),
    blocks_per_stage=2,
    pool_size=2,
    tower_hidden=(),
    dropout=0.0,
)
class ResNetSharedBottom(MultiTaskModel):
    """A shared :class:`ResNetTrunk` and a :class:`TaskHead` per task.

    The shared representation is ``[pooled trunk features (N, widths[-1] * pool_size**2)]``; every task reads it and
    nothing else, so it separates the shared parameters from the task-specific ones exactly.

    Args:
        widths: filters per residual stage.
        blocks_per_stage: basic blocks per stage (one int, or one per stage).
        pool_size: the last map is average-pooled to this grid and flattened (1: global pooling).
        tower_hidden: hidden widths of each head (``()``: a linear classifier).
        dropout: dropout after each hidden layer of the heads.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        widths: Sequence[int] | int = (16, 32, 64),
        blocks_per_stage: Sequence[int] | int = 2,
        pool_size: int = 2,
        tower_hidden: Hidden = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, input_spec)
        require_image("resnet-shared-bottom", input_spec)
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(), image=())
        self.stem = make_stem(input_spec)
        self.trunk = ResNetTrunk(
            input_spec.channels, input_spec.height, input_spec.width, widths, blocks_per_stage, pool_size
        )
        self.towers = nn.ModuleList(TaskHead(self.trunk.out_dim, t, tower_h, dropout) for t in tasks)

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        z = self.trunk(self.stem(x))
        return {t.name: tower(z) for t, tower in zip(self.tasks, self.towers, strict=True)}, [z]

    def task_parameter_names(self, task: str) -> list[str]:
        return self._parameter_names_under(f"towers.{self._task_index(task)}")
