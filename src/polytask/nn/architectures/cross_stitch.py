"""Cross-stitch networks.

Misra, Shrivastava, Gupta & Hebert, "Cross-stitch Networks for Multi-task Learning", CVPR 2016.
One network ("column") per task; after each stage a *cross-stitch unit* replaces the K columns'
activations ``x_1 .. x_K`` by the linear combinations ``x~_k = sum_j alpha_kj x_j`` with a learned
``K x K`` matrix ``alpha``. ``alpha`` starts as a convex combination with weight ``stitch_self`` on a
column's own activation and ``(1 - stitch_self) / (K - 1)`` on each other column's: the paper's
``(alpha_S, alpha_D) = (0.9, 0.1)`` for two tasks, which keeps activations on their usual scale.
The paper stitches two AlexNets after every pooling and fully connected layer; here a column is

- for tables, the single-task network: its own embeddings, then ``Linear -> ReLU`` layers
  (``hidden``) with a unit after each ("cross-stitch on MLP towers");
- for images, a LeNet split into stages ``conv1 -> pool -> relu``, ``conv2 -> pool -> relu``,
  ``flatten -> fc -> relu`` (plus ``hidden`` fc layers), with a unit after each stage;

and a task's tower reads its column's output of the last unit.

Which parameters are shared? The units mix the columns, so every task's loss reaches every column
below the last unit through them (for any ``alpha_kj != 0``, which training can always make so):
following the data flow, as the rest of the package does, the columns and the units are *shared*
and a task owns only its tower. Declaring column k task k's would break the contract balancers rely
on (a task-specific parameter receives its own task's gradient only); the columns are "task-specific"
in the paper's sense of being initialised for and supervised by one task, not in that one.

Left out: the paper initialises each column from a network trained on its task alone and scales the
units' learning rate up (by orders of magnitude); the trainer here uses one learning rate and
random initialisation. One ``alpha`` per pair of columns and stage (not per channel), as in the
paper's main experiments. With a single task, the unit is the identity.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, LeNetTrunk, make_stem, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.tasks import Task

__all__ = ["CrossStitch", "CrossStitchUnit"]


class CrossStitchUnit(nn.Module):
    """``x~_k = sum_j alpha[k, j] x_j`` over K same-shaped activations ``(N, ...)``."""

    def __init__(self, n_columns: int, stitch_self: float = 0.9) -> None:
        super().__init__()
        if n_columns == 1:
            alpha = torch.ones(1, 1)
        else:
            alpha = torch.full((n_columns, n_columns), (1.0 - stitch_self) / (n_columns - 1))
            alpha.fill_diagonal_(stitch_self)
        self.alpha = nn.Parameter(alpha)

    def forward(self, xs: torch.Tensor) -> torch.Tensor:
        """``(N, K, ...) -> (N, K, ...)``."""
        return torch.einsum("kj,nj...->nk...", self.alpha.to(xs.dtype), xs)


class _Linear(nn.Module):
    """``linear -> ReLU [-> Dropout]``, flattening its input first."""

    def __init__(self, linear: nn.Linear, dropout: float = 0.0) -> None:
        super().__init__()
        self.linear = linear
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(F.relu(self.linear(x.flatten(1))))


class _ConvPool(nn.Module):
    """``conv -> maxpool 2 -> relu``: one LeNet stage."""

    def __init__(self, conv: nn.Conv2d) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.max_pool2d(self.conv(x), 2))


class _Column(nn.Module):
    """One task's network: its stem and its stages (a cross-stitch unit follows each stage)."""

    def __init__(self, input_spec: InputSpec, hidden: Sequence[int], dropout: float, emb_dim: Any) -> None:
        super().__init__()
        self.stem = make_stem(input_spec, emb_dim)
        stages: list[nn.Module] = []
        if input_spec.vector_stem:
            d = self.stem.out_dim
        else:
            # LeNetTrunk builds (and validates) the layers; the column runs them stage by stage
            lenet = LeNetTrunk(input_spec.channels, input_spec.height, input_spec.width)
            stages += [_ConvPool(lenet.conv1), _ConvPool(lenet.conv2), _Linear(lenet.fc)]
            d = lenet.out_dim
        for h in hidden:
            stages.append(_Linear(nn.Linear(d, h), dropout))
            d = h
        self.stages = nn.ModuleList(stages)
        self.out_dim = d

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The column alone, without cross-stitch units."""
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return h


@register_model(
    "cross-stitch",
    paper="Misra et al., 'Cross-stitch Networks for Multi-task Learning', CVPR 2016",
    description="one network per task, activations mixed by learned cross-stitch units after every stage",
    hidden="auto",
    tower_hidden="auto",
    stitch_self=0.9,
    dropout=0.0,
    emb_dim="auto",
)
class CrossStitch(MultiTaskModel):
    """K columns with a :class:`CrossStitchUnit` after every stage and a :class:`TaskHead` per task.

    Task ``t`` owns ``towers.t``; the columns and units are shared (see the module docstring). The
    shared representation is ``[the last unit's output (N, K, d)]``; tower ``t`` reads row ``t``.

    Args:
        hidden: fc widths of each column. ``"auto"``: ``(128, 64)`` for tables (the single-task and
            shared-bottom trunk); ``()`` for images, whose columns are LeNets (three stages); widths
            add fc stages after the LeNet.
        tower_hidden: tower widths. ``"auto"``: ``(32,)`` for tables, ``(50,)`` for images.
        stitch_self: initial weight of a column on its own activation (``0 <= stitch_self <= 1``);
            the rest is spread evenly over the other columns. 1 starts from independent columns.
        dropout: dropout after each hidden fc layer of columns and towers.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`).
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        hidden: Hidden = "auto",
        tower_hidden: Hidden = "auto",
        stitch_self: float = 0.9,
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        if not 0.0 <= stitch_self <= 1.0:
            raise ValueError(f"stitch_self must be in [0, 1], got {stitch_self}")
        column_h = resolve_hidden(hidden, input_spec, tabular=(128, 64), image=())
        if input_spec.vector_stem and not column_h:
            raise ValueError(f"a {input_spec.kind} cross-stitch network needs at least one hidden layer to stitch")
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(32,), image=(50,))
        self.columns = nn.ModuleList(_Column(input_spec, column_h, dropout, emb_dim) for _ in tasks)
        n_stages = len(self.columns[0].stages)
        self.stitches = nn.ModuleList(CrossStitchUnit(len(tasks), stitch_self) for _ in range(n_stages))
        d = self.columns[0].out_dim
        self.towers = nn.ModuleList(TaskHead(d, t, tower_h, dropout) for t in tasks)

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        hs = [column.stem(x) for column in self.columns]
        stitched = torch.empty(0, device=hs[0].device)
        for i, unit in enumerate(self.stitches):
            stitched = unit(torch.stack([column.stages[i](h) for column, h in zip(self.columns, hs, strict=True)], 1))
            hs = list(stitched.unbind(1))
        preds = {t.name: tower(h) for t, tower, h in zip(self.tasks, self.towers, hs, strict=True)}
        return preds, [stitched]

    def task_parameter_names(self, task: str) -> list[str]:
        return self._parameter_names_under(f"towers.{self._task_index(task)}")

    def stitch_weights(self) -> list[torch.Tensor]:
        """Each unit's ``alpha`` (``K x K``, row k: how column k mixes the columns), first stage first."""
        return [unit.alpha.detach().clone() for unit in self.stitches]

    def diagnostics(self) -> dict[str, Any]:
        """``stitch_weights``: every unit's current ``alpha`` as nested lists, rows and columns in
        task order (a learned parameter, not a statistic of recorded passes)."""
        return {"stitch_weights": [a.tolist() for a in self.stitch_weights()], "task_order": self.task_names}
