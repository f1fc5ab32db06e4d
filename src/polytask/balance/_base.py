"""The balancer contract and registry.

A balancer receives the per-task losses and the step's :class:`GradientEngine`, writes the
gradients of all parameters (through the engine) and returns the task weights it applied, which the
trainer logs. Balancers are ``nn.Module`` so that learnable weights (e.g. uncertainty weighting's
log-variances) are optimised with the model and saved in its checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn

from polytask._registry import Entry, Registry
from polytask.balance._engine import GradientEngine
from polytask.tasks import Task

__all__ = ["BALANCERS", "Balancer", "BalancerEntry", "build_balancer", "register_balancer"]


class Balancer(nn.Module):
    """Base class. ``level`` says what the method reads: ``"loss"`` (never a Jacobian),
    ``"gradient"`` (shared-parameter Jacobian/Gramian) or ``"representation"``."""

    level: ClassVar[str] = "loss"

    def __init__(self, tasks: list[Task]) -> None:
        super().__init__()
        self.tasks = list(tasks)
        self.task_names = [t.name for t in tasks]

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        """Write ``.grad`` of every parameter; return the weight applied to each task."""
        raise NotImplementedError

    def epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        """Hook for methods that adapt between epochs (e.g. DWA); nothing by default."""


BalancerEntry = Entry[type[Balancer]]
BALANCERS: Registry[type[Balancer]] = Registry("balancer")


def register_balancer(
    name: str, paper: str, description: str, **defaults: Any
) -> Callable[[type[Balancer]], type[Balancer]]:
    """Class decorator: make a balancer available by ``name`` with its paper and defaults."""
    return BALANCERS.register(name, paper, description, **defaults)


def build_balancer(name: str, tasks: list[Task], **params: Any) -> Balancer:
    """Instantiate the balancer ``name``; unknown names or parameters get a one-line error."""
    cls, kwargs = BALANCERS.resolve(name, params)
    return cls(tasks, **kwargs)
