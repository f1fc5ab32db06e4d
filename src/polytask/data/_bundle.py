"""A data set ready for training: three splits, the task specs and what the model's input looks like."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from polytask.data._tensors import InputSpec, TaskTensors
from polytask.tasks import Task

__all__ = ["DataBundle", "DATASETS", "DatasetEntry", "load_dataset", "register_dataset"]


@dataclass
class DataBundle:
    """Train/val/test splits with their tasks.

    ``encoder`` is the fitted table encoder (``polytask.data.TableEncoder``) for table data, saved
    in checkpoints so that ``predict`` can encode new files; ``None`` for built-in image sets.
    """

    name: str
    tasks: list[Task]
    input_spec: InputSpec
    train: TaskTensors
    val: TaskTensors
    test: TaskTensors | None = None
    encoder: Any = None
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def encoded(cls, name: str, encoder: Any, train: Any, val: Any, test: Any, meta: dict[str, Any]) -> DataBundle:
        """The bundle of three table splits (data frames) encoded by a ``TableEncoder`` fitted on train."""
        return cls(
            name=name,
            tasks=encoder.tasks,
            input_spec=encoder.input_spec,
            train=encoder.transform(train),
            val=encoder.transform(val),
            test=encoder.transform(test),
            encoder=encoder,
            meta=meta,
        )

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise KeyError(f"unknown task '{name}'; this data set has {[t.name for t in self.tasks]}")

    def labelled_rows_only(self) -> DataBundle:
        """The same bundle without the rows that carry no label of its tasks (after :meth:`select_tasks`
        on task-column data such as GLUE, the other tasks' rows), so no step is spent on them."""

        def keep(split: Any) -> Any:
            if split is None or not split.mask:
                return split
            rows = torch.stack(list(split.mask.values())).any(0)
            return split if bool(rows.all()) else split.subset(torch.nonzero(rows).flatten())

        return DataBundle(
            self.name,
            self.tasks,
            self.input_spec,
            keep(self.train),
            keep(self.val),
            keep(self.test),
            self.encoder,
            dict(self.meta),
        )

    def select_tasks(self, names: list[str]) -> DataBundle:
        tasks = [self.task(n) for n in names]
        return DataBundle(
            self.name,
            tasks,
            self.input_spec,
            self.train.select_tasks(names),
            self.val.select_tasks(names),
            self.test.select_tasks(names) if self.test is not None else None,
            self.encoder,
            dict(self.meta),
        )


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Callable[..., DataBundle]
    description: str
    source: str


DATASETS: dict[str, DatasetEntry] = {}


def register_dataset(
    name: str, description: str, source: str
) -> Callable[[Callable[..., DataBundle]], Callable[..., DataBundle]]:
    """Register a built-in data set loader under ``name`` (used by ``polytask fit NAME``)."""

    def deco(fn: Callable[..., DataBundle]) -> Callable[..., DataBundle]:
        if name in DATASETS:
            raise ValueError(f"data set '{name}' is registered twice")
        DATASETS[name] = DatasetEntry(name, fn, description, source)
        return fn

    return deco


def load_dataset(name: str, **kwargs: Any) -> DataBundle:
    if name not in DATASETS:
        raise KeyError(f"unknown data set '{name}'; built-in data sets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name].loader(**kwargs)
