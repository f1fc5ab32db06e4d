"""Multi-Task Attention Network (MTAN).

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019. A single shared
network holds a global feature pool; each task has one soft-attention module per stage of it. At stage
``j`` task ``i``'s module reads the stage's intermediate features ``u_j`` (concatenated, for j > 1, with
its previous module's output passed through ``f_{j-1}``) and produces a mask
``a_ij = sigmoid(BN(conv1x1(relu(BN(conv1x1(.))))))`` that selects from the stage output ``p_j``:
``ahat_ij = a_ij * p_j`` (element-wise). ``f_j`` (3x3 convolution, batch norm, ReLU, then pooling to
the next stage's resolution) carries the attended features to the next module; it has no task index
and is shared by all tasks, as in the authors' code (lorenmt/mtan, ``encoder_block_att``). Each task's
head reads its last attended features.

Choices for this image-classification version, made here:

* The shared network is the small :class:`~polytask.nn.resnet.ResNetTrunk` (the paper builds MTAN on
  SegNet for dense prediction and on a Wide ResNet for Visual Decathlon classification). ``p_j`` is
  stage ``j``'s output and ``u_j`` the inner activation of the stage's last basic block (after its
  first convolution, same shape as ``p_j``), the analogue of SegNet's "first convolution of the block"
  in the authors' code.
* ``f_j`` pools with a 2x2 max pool in ``ceil`` mode, so it matches the trunk's stride-2 stages for odd
  sizes too (7 -> 4). The attention modules' hidden width equals the stage width, as in the
  authors' code.
* Heads: ``ahat_iJ`` average-pooled to a 2x2 grid (``pool_size``; see :mod:`polytask.nn.resnet`) and
  a :class:`TaskHead` (a linear layer by default).
* The shared representation is ``[p_J]``, the trunk's last feature map, which every head reads through
  its mask. The attention modules also read the earlier stages' ``u_j``/``p_j``; those paths are not
  in the representation (as MMoE's gate inputs are not).
* Parameter split: trunk and the ``f_j`` are shared; task ``i``'s attention modules and head are its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, make_stem, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.nn.resnet import ResNetTrunk, require_image
from polytask.tasks import Task

__all__ = ["MTAN", "AttentionModule"]


class AttentionModule(nn.Module):
    """``[conv1x1 -> BN -> ReLU] -> [conv1x1 -> BN -> sigmoid]``: a soft mask in (0, 1) per element."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(c_in, c_out, kernel_size=1),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
            nn.Conv2d(c_out, c_out, kernel_size=1),
            nn.BatchNorm2d(c_out),
            nn.Sigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _SharedExtractor(nn.Module):
    """``f_j``: 3x3 conv -> BN -> ReLU -> 2x2 max pool (ceil), from stage j's to stage j+1's shape."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.bn(self.conv(x))), 2, ceil_mode=True)


@register_model(
    "mtan",
    paper="Liu, Johns & Davison, 'End-to-End Multi-Task Learning with Attention', CVPR 2019",
    description="shared ResNet trunk with per-task soft-attention masks at every stage (images)",
    widths=(16, 32, 64),
    blocks_per_stage=2,
    pool_size=2,
    tower_hidden=(),
    dropout=0.0,
)
class MTAN(MultiTaskModel):
    """Shared :class:`ResNetTrunk`, per task one :class:`AttentionModule` per stage and a head.

    Args:
        widths: filters per residual stage (one attention module per stage and task).
        blocks_per_stage: basic blocks per stage (one int, or one per stage).
        pool_size: the head's input is its map average-pooled to this grid and flattened.
        tower_hidden: hidden widths of each head (``()``: a linear classifier on the pooled features).
        dropout: dropout after each hidden layer of the heads.
    """

    mask_sum: torch.Tensor
    mask_count: torch.Tensor

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
        require_image("mtan", input_spec)
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(), image=())
        self.stem = make_stem(input_spec)
        self.trunk = ResNetTrunk(
            input_spec.channels, input_spec.height, input_spec.width, widths, blocks_per_stage, pool_size
        )
        ws = self.trunk.widths
        self.extractors = nn.ModuleList(_SharedExtractor(ws[j], ws[j + 1]) for j in range(len(ws) - 1))
        # stage 1 reads u_1 alone; later stages read [u_j, f_{j-1}(previous attended)] (2 * C_j channels)
        self.attention = nn.ModuleList(
            nn.ModuleList(AttentionModule(c if j == 0 else 2 * c, c) for j, c in enumerate(ws)) for _ in tasks
        )
        self.towers = nn.ModuleList(TaskHead(self.trunk.out_dim, t, tower_h, dropout) for t in tasks)
        # mean mask value per task and stage over eval-mode passes (diagnostics), not saved
        self.register_buffer("mask_sum", torch.zeros(len(tasks), len(ws), dtype=torch.float64), persistent=False)
        self.register_buffer("mask_count", torch.zeros((), dtype=torch.long), persistent=False)

    def _forward(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, list[torch.Tensor]], dict[str, torch.Tensor]]:
        """(predictions, last trunk map p_J, masks per task and stage, last attended map per task)."""
        stages = self.trunk.forward_stages_with_hidden(self.stem(x))
        preds: dict[str, torch.Tensor] = {}
        masks: dict[str, list[torch.Tensor]] = {}
        attended: dict[str, torch.Tensor] = {}
        for task, modules, tower in zip(self.tasks, self.attention, self.towers, strict=True):
            carried: torch.Tensor | None = None
            task_masks = []
            for j, ((p, u), module) in enumerate(zip(stages, modules, strict=True)):
                mask = module(u if carried is None else torch.cat([u, carried], dim=1))
                a = mask * p
                task_masks.append(mask)
                if j < len(self.extractors):
                    carried = self.extractors[j](a)
            masks[task.name], attended[task.name] = task_masks, a
            preds[task.name] = tower(self.trunk.pool(a))
        if not self.training:
            with torch.no_grad():
                sums = [torch.stack([m.detach().double().mean(dim=(1, 2, 3)).sum() for m in masks[t]]) for t in masks]
                self.mask_sum += torch.stack(sums).to(self.mask_sum.device)
                self.mask_count += stages[0][0].shape[0]
        return preds, stages[-1][0], masks, attended

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        preds, last, _, _ = self._forward(x)
        return preds, [last]

    def attention_masks(self, x: dict[str, torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Each task's masks, one ``(N, C_j, H_j, W_j)`` per stage, values in (0, 1)."""
        return self._forward(x)[2]

    def task_features(self, x: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """(each task's last attended map ``a_J * p_J``, the trunk's last map ``p_J``)."""
        _, last, _, attended = self._forward(x)
        return attended, last

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        return self._parameter_names_under(f"attention.{i}", f"towers.{i}")

    def diagnostics(self) -> dict[str, Any]:
        """``attention_mean``: per task, the mean mask value at each stage (1 = the shared features pass
        unchanged), over eval-mode forward passes since the last :meth:`reset_diagnostics`."""
        n = int(self.mask_count)
        if n == 0:
            return {"attention_mean": {}}
        means = (self.mask_sum / n).tolist()
        return {"attention_mean": dict(zip(self.task_names, means, strict=True))}

    def reset_diagnostics(self) -> None:
        self.mask_sum.zero_()
        self.mask_count.zero_()
