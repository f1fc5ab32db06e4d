"""In-memory multi-task data: inputs, labels and label masks as tensors with one leading row axis.

Batches are taken by indexing every tensor with one index tensor, so drawing a mini-batch costs a
handful of tensor gathers and no per-sample Python.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Batch", "InputSpec", "TaskTensors"]


@dataclass(frozen=True)
class InputSpec:
    """What the model's input looks like; architectures build their encoders from it.

    ``kind == "tabular"``: ``x["num"]`` float ``(N, n_numeric)`` and ``x["cat"]`` long
    ``(N, len(cardinalities))`` where ``cardinalities[j]`` counts category ids of column j
    (id 0 is the unknown/missing bucket).
    ``kind == "image"``: ``x["image"]`` float ``(N, channels, height, width)``.
    ``kind == "text"``: long ``x["input_ids"]``, ``x["attention_mask"]`` (and ``x["token_type_ids"]``)
    ``(N, max_length)`` from a Hugging Face tokenizer (see :mod:`polytask.data.glue`); ``encoder`` is
    the local Hugging Face folder whose tokenizer made them, and whose encoder the text stems load
    (``""``: the installed all-MiniLM-L6-v2).
    """

    kind: str
    n_numeric: int = 0
    cardinalities: tuple[int, ...] = ()
    channels: int = 0
    height: int = 0
    width: int = 0
    encoder: str = ""

    @property
    def vector_stem(self) -> bool:
        """True when the stem returns one feature vector per row (tables, text), False for images."""
        return self.kind in ("tabular", "text")

    def __post_init__(self) -> None:
        if self.kind not in ("tabular", "image", "text"):
            raise ValueError(f"input kind must be 'tabular', 'image' or 'text', got '{self.kind}'")
        object.__setattr__(self, "cardinalities", tuple(int(c) for c in self.cardinalities))

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_numeric": self.n_numeric,
            "cardinalities": list(self.cardinalities),
            "channels": self.channels,
            "height": self.height,
            "width": self.width,
            **({"encoder": self.encoder} if self.kind == "text" else {}),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputSpec:
        return cls(**d)


@dataclass
class Batch:
    """A mini-batch: ``x`` inputs by name, ``y`` labels and ``mask`` present-label masks by task."""

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]

    def __len__(self) -> int:
        return next(iter(self.x.values())).shape[0]

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        return Batch(
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.x.items()},
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.y.items()},
            {k: v.to(device, non_blocking=non_blocking) for k, v in self.mask.items()},
        )


@dataclass
class TaskTensors:
    """A split held in memory. Every tensor's first axis is the row axis.

    Missing labels carry ``mask == False``; their ``y`` value is arbitrary (it is never read).
    Task-column data (each row belongs to one task) is the case where each row has exactly one
    task present.
    """

    x: dict[str, torch.Tensor]
    y: dict[str, torch.Tensor]
    mask: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = {k: v.shape[0] for k, v in {**self.x, **self.y, **self.mask}.items()}
        if len(set(n.values())) > 1:
            raise ValueError(f"all tensors must have the same number of rows, got {n}")
        if set(self.y) != set(self.mask):
            raise ValueError(f"labels and masks name different tasks: {sorted(self.y)} vs {sorted(self.mask)}")

    def __len__(self) -> int:
        return next(iter(self.x.values())).shape[0]

    @property
    def task_names(self) -> list[str]:
        return list(self.y)

    def take(self, index: torch.Tensor) -> Batch:
        return Batch(
            {k: v[index] for k, v in self.x.items()},
            {k: v[index] for k, v in self.y.items()},
            {k: v[index] for k, v in self.mask.items()},
        )

    def subset(self, index: torch.Tensor, tasks: list[str] | None = None) -> TaskTensors:
        b = self.take(index)
        keep = tasks if tasks is not None else list(b.y)
        return TaskTensors(b.x, {t: b.y[t] for t in keep}, {t: b.mask[t] for t in keep}, dict(self.meta))

    def select_tasks(self, tasks: list[str]) -> TaskTensors:
        missing = [t for t in tasks if t not in self.y]
        if missing:
            raise KeyError(f"unknown task(s) {missing}; this data has {self.task_names}")
        return TaskTensors(self.x, {t: self.y[t] for t in tasks}, {t: self.mask[t] for t in tasks}, dict(self.meta))

    def label_counts(self) -> dict[str, int]:
        return {t: int(m.sum()) for t, m in self.mask.items()}
