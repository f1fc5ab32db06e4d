"""Tasks: what is predicted, how it is scored, and how its loss treats missing labels.

A :class:`Task` is a small, serialisable spec. It owns its loss on ``(prediction, label, mask)``
and names its metrics with their direction. Missing labels are normal: every loss averages over
present labels only, and a batch in which a task has no label returns an exact zero that is still
attached to the graph, so its gradient is zero and never NaN.

Tensor layout per kind (N = rows in the batch):

=============  ======================  ======================  ===================
kind           prediction              label ``y``             mask
=============  ======================  ======================  ===================
binary         logits ``(N,)``         float 0/1 ``(N,)``      bool ``(N,)``
multiclass     logits ``(N, C)``       long ``(N,)``           bool ``(N,)``
multilabel     logits ``(N, L)``       float 0/1 ``(N, L)``    bool ``(N, L)``
regression     value ``(N,)``          float ``(N,)``          bool ``(N,)``
=============  ======================  ======================  ===================

Regression labels are trained standardised (``(y - y_mean) / y_std``, fitted on the training
split); :meth:`Task.decode` maps predictions back to the original units.

This module imports nothing of the package.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "METRIC_HIGHER_IS_BETTER",
    "Task",
    "TaskKind",
    "missing_mask",
    "parse_task_spec",
]


class TaskKind(StrEnum):
    BINARY = "binary"
    MULTICLASS = "multiclass"
    MULTILABEL = "multilabel"
    REGRESSION = "regression"


# Direction of every metric the package computes (True: higher is better).
METRIC_HIGHER_IS_BETTER: dict[str, bool] = {
    "auc": True,
    "accuracy": True,
    "macro_f1": True,
    "logloss": False,
    "rmse": False,
    "mae": False,
    "r2": True,
    # GLUE's official scores (polytask.evaluate.metrics.glue_score), reported for text tasks
    "mcc": True,
    "f1": True,
    "pearson": True,
    "spearman": True,
}

_METRICS: dict[TaskKind, tuple[str, ...]] = {
    TaskKind.BINARY: ("auc", "accuracy", "logloss"),
    TaskKind.MULTICLASS: ("accuracy", "macro_f1", "logloss"),
    TaskKind.MULTILABEL: ("auc", "macro_f1", "logloss"),
    TaskKind.REGRESSION: ("rmse", "mae", "r2"),
}

# The metric used for model selection; all are higher-is-better and scale-free, so a mean over
# tasks of mixed kinds stays meaningful.
_PRIMARY: dict[TaskKind, str] = {
    TaskKind.BINARY: "auc",
    TaskKind.MULTICLASS: "accuracy",
    TaskKind.MULTILABEL: "auc",
    TaskKind.REGRESSION: "r2",
}


@dataclass(frozen=True)
class Task:
    """One prediction task.

    Args:
        name: unique task name (a column name for tables).
        kind: binary, multiclass, multilabel or regression.
        n_classes: classes (multiclass) or labels (multilabel); ignored otherwise.
        classes: original label values in index order (for decoding predictions); for binary,
            ``classes[1]`` is the positive class.
        y_mean, y_std: standardisation of regression labels (fitted on the training split).
        weight: static loss weight used by balancers that accept fixed weights.
    """

    name: str
    kind: TaskKind
    n_classes: int = 0
    classes: tuple[str, ...] = field(default_factory=tuple)
    y_mean: float = 0.0
    y_std: float = 1.0
    weight: float = 1.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", TaskKind(self.kind))
        object.__setattr__(self, "classes", tuple(str(c) for c in self.classes))
        if not self.name:
            raise ValueError("task name must be a non-empty string")
        if self.kind in (TaskKind.MULTICLASS, TaskKind.MULTILABEL) and self.n_classes < 2:
            raise ValueError(f"task '{self.name}': {self.kind.value} needs n_classes >= 2, got {self.n_classes}")
        if self.kind is TaskKind.REGRESSION and not (self.y_std > 0 and math.isfinite(self.y_std)):
            raise ValueError(f"task '{self.name}': y_std must be positive and finite, got {self.y_std}")

    # ----------------------------------------------------------------- shapes and metrics
    @property
    def out_dim(self) -> int:
        """Width of the head's output for this task."""
        return self.n_classes if self.kind in (TaskKind.MULTICLASS, TaskKind.MULTILABEL) else 1

    @property
    def metrics(self) -> tuple[str, ...]:
        return _METRICS[self.kind]

    @property
    def primary_metric(self) -> str:
        return _PRIMARY[self.kind]

    @staticmethod
    def higher_is_better(metric: str) -> bool:
        return METRIC_HIGHER_IS_BETTER[metric]

    # ----------------------------------------------------------------- loss
    def loss(self, pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss over present labels; an attached exact zero when none is present."""
        pred = _squeeze_scalar_head(pred, self)
        if mask is None:
            mask = missing_mask(y, self) if y.is_floating_point() else torch.ones_like(y, dtype=torch.bool)
        mask = mask.to(torch.bool)
        # Missing labels may hold NaN or -1: replace them before the loss so that neither the value
        # nor its derivative is NaN (0 * NaN would poison the gradient).
        safe_y = torch.where(mask, y, torch.zeros((), dtype=y.dtype, device=y.device))
        if self.kind is TaskKind.BINARY or self.kind is TaskKind.MULTILABEL:
            elem = F.binary_cross_entropy_with_logits(pred, safe_y.to(pred.dtype), reduction="none")
        elif self.kind is TaskKind.MULTICLASS:
            elem = F.cross_entropy(pred, safe_y.long(), reduction="none")
        else:
            target = (safe_y.to(pred.dtype) - self.y_mean) / self.y_std
            elem = (pred - target) ** 2
        elem = torch.where(mask, elem, torch.zeros((), dtype=elem.dtype, device=elem.device))
        count = mask.sum()
        return elem.sum() / count.clamp(min=1).to(elem.dtype)

    # ----------------------------------------------------------------- predictions
    def decode(self, pred: torch.Tensor) -> torch.Tensor:
        """Model output -> probabilities (classification) or values in original units."""
        pred = _squeeze_scalar_head(pred, self)
        if self.kind is TaskKind.BINARY or self.kind is TaskKind.MULTILABEL:
            return torch.sigmoid(pred)
        if self.kind is TaskKind.MULTICLASS:
            return torch.softmax(pred, dim=-1)
        return pred * self.y_std + self.y_mean

    # ----------------------------------------------------------------- (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["kind"] = self.kind.value
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Task:
        d = dict(d)
        d["classes"] = tuple(d.get("classes", ()))
        return cls(**d)


def _squeeze_scalar_head(pred: torch.Tensor, task: Task) -> torch.Tensor:
    if task.out_dim == 1 and pred.dim() == 2 and pred.shape[1] == 1:
        return pred[:, 0]
    return pred


def missing_mask(y: torch.Tensor, task: Task) -> torch.Tensor:
    """Present-label mask from a label tensor that marks missing labels by NaN or -1."""
    present = torch.ones_like(y, dtype=torch.bool)
    if y.is_floating_point():
        present &= ~torch.isnan(y)
    if task.kind is not TaskKind.REGRESSION:
        present &= y != -1
    return present


def parse_task_spec(spec: str) -> tuple[str, TaskKind | None, int]:
    """Parse ``NAME:KIND`` or ``NAME:multiclass(N)`` as written on the command line.

    The kind may be omitted (``NAME``), in which case it is inferred later from the data.
    Returns ``(name, kind or None, n_classes)``; raises ``ValueError`` with the valid forms.
    """
    name, sep, kind = spec.rpartition(":")
    if not sep:
        name, kind = spec, ""
    name = name.strip()
    kind = kind.strip().lower()
    n = 0
    if "(" in kind and kind.endswith(")"):
        kind, _, num = kind[:-1].partition("(")
        if not num.isdigit():
            raise ValueError(f"task spec '{spec}': class count '{num}' is not an integer")
        n = int(num)
    if not name:
        raise ValueError(f"task spec '{spec}' has no name; write NAME:KIND, e.g. income:binary")
    if kind and kind not in {k.value for k in TaskKind}:
        valid = ", ".join(k.value for k in TaskKind)
        raise ValueError(f"task spec '{spec}': unknown kind '{kind}'; valid kinds: {valid}")
    return name, (TaskKind(kind) if kind else None), n
