"""The model contract and the architecture registry.

Every architecture maps an input dict to ``{task: prediction}`` and declares which parameters are
task-specific; everything else is shared. Balancers that work on the shared representation read the
tensor(s) that :meth:`MultiTaskModel.forward_with_representation` returns.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from polytask._registry import Entry, Registry
from polytask.data._tensors import InputSpec
from polytask.tasks import Task

__all__ = ["MODELS", "ModelEntry", "MultiTaskModel", "build_model", "register_model"]


class MultiTaskModel(nn.Module):
    """Base class of all architectures.

    Subclasses implement :meth:`forward_with_representation` and :meth:`task_parameter_names`.
    ``independent`` models (the single-task baseline) share nothing; the trainer then selects the
    best epoch per task instead of one epoch for all tasks.
    """

    independent: bool = False

    def __init__(self, tasks: list[Task], input_spec: InputSpec) -> None:
        super().__init__()
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        if not tasks:
            raise ValueError("a model needs at least one task")
        self.tasks = list(tasks)
        self.input_spec = input_spec

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.forward_with_representation(x)[0]

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        """Predictions by task, and the shared representation tensor(s) they were computed from."""
        raise NotImplementedError

    def task_parameter_names(self, task: str) -> list[str]:
        """Names (as in ``named_parameters``) of the parameters that only ``task`` uses."""
        raise NotImplementedError

    # ------------------------------------------------------------- parameter split
    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        params = dict(self.named_parameters())
        for n in self.task_parameter_names(task):
            yield params[n]

    def shared_parameter_names(self) -> list[str]:
        specific = {n for t in self.task_names for n in self.task_parameter_names(t)}
        return [n for n, _ in self.named_parameters() if n not in specific]

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        params = dict(self.named_parameters())
        for n in self.shared_parameter_names():
            yield params[n]

    def task_state_keys(self, task: str) -> list[str]:
        """State-dict keys owned by ``task``: its parameters and the buffers of the same modules
        (e.g. batch-norm statistics), used to keep a best epoch per task for independent models."""
        params = self.task_parameter_names(task)
        modules = {n.rpartition(".")[0] for n in params}
        buffers = [n for n, _ in self.named_buffers() if n.rpartition(".")[0] in modules]
        return params + [b for b in buffers if b in self.state_dict()]

    def diagnostics(self) -> dict[str, Any]:
        """Architecture-specific statistics (e.g. expert usage per task); empty by default."""
        return {}

    def reset_diagnostics(self) -> None:
        """Forget the statistics that :meth:`diagnostics` reports; nothing by default."""

    def auxiliary_loss(self) -> torch.Tensor | None:
        """A training-only loss of the architecture itself, from the last training-mode forward
        pass (e.g. a mixture-of-experts load-balancing loss), or ``None``. The trainer adds its
        gradient to every step's update, whichever balancer combines the task losses."""
        return None

    # ------------------------------------------------------------- helpers for subclasses
    def _task_index(self, task: str) -> int:
        try:
            return self.task_names.index(task)
        except ValueError:
            raise KeyError(f"unknown task '{task}'; this model has {self.task_names}") from None

    def _parameter_names_under(self, *prefixes: str) -> list[str]:
        """Names of the parameters inside the submodules at ``prefixes`` (e.g. ``"towers.0"``)."""
        dotted = tuple(p + "." for p in prefixes)
        return [n for n, _ in self.named_parameters() if n.startswith(dotted)]


ModelEntry = Entry[type[MultiTaskModel]]
MODELS: Registry[type[MultiTaskModel]] = Registry("model")


def register_model(
    name: str, paper: str, description: str, **defaults: Any
) -> Callable[[type[MultiTaskModel]], type[MultiTaskModel]]:
    """Class decorator: make an architecture available by ``name`` with its paper and defaults."""
    return MODELS.register(name, paper, description, **defaults)


def build_model(name: str, tasks: list[Task], input_spec: InputSpec, **params: Any) -> MultiTaskModel:
    """Instantiate the architecture ``name``; unknown names or parameters get a one-line error."""
    cls, kwargs = MODELS.resolve(name, params)
    return cls(tasks, input_spec, **kwargs)
