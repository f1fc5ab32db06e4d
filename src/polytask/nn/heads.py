"""Task-owned output modules: the tower that ends in a task's logits, and the softmax gate of
mixture-of-experts models (which records its own routing statistics for diagnostics)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polytask.nn.encoders import MLP
from polytask.tasks import Task

__all__ = ["SoftmaxGate", "TaskHead", "gate_report", "reset_gate_statistics"]


class TaskHead(nn.Module):
    """MLP tower ending in a linear layer of ``task.out_dim`` outputs.

    Returns ``(N,)`` for a single output (binary, regression) and ``(N, C)`` otherwise, the layouts
    :meth:`Task.loss` expects.
    """

    def __init__(self, in_dim: int, task: Task, hidden: Sequence[int] = (), dropout: float = 0.0) -> None:
        super().__init__()
        self.tower = MLP(in_dim, hidden, dropout)
        self.out = nn.Linear(self.tower.out_dim, task.out_dim)
        self.scalar = task.out_dim == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.out(self.tower(x))
        return y[:, 0] if self.scalar else y


class SoftmaxGate(nn.Module):
    """``softmax(W x + b)`` over ``n_experts`` (Ma et al., KDD 2018, eq. 6).

    In eval mode every forward adds the batch's gate weights and entropies to buffers that are not
    saved in the state dict (``persistent=False``); no host synchronisation happens in forward.
    """

    usage_sum: torch.Tensor
    entropy_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.n_experts = n_experts
        self.register_buffer("usage_sum", torch.zeros(n_experts), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros(()), persistent=False)
        # integer, so that .half()/.to(dtype) cannot make it lose counts
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = torch.softmax(self.linear(x), dim=-1)
        if not self.training:
            with torch.no_grad():
                wd = w.detach()
                self.usage_sum += wd.sum(0).to(self.usage_sum.dtype)
                self.entropy_sum += torch.special.entr(wd).sum().to(self.entropy_sum.dtype)
                self.count += wd.shape[0]
        return w

    def reset_statistics(self) -> None:
        self.usage_sum.zero_()
        self.entropy_sum.zero_()
        self.count.zero_()

    def statistics(self) -> tuple[list[float], float] | None:
        """(mean weight per expert, mean entropy in nats) over the recorded rows; None if none."""
        n = int(self.count)
        if n == 0:
            return None
        return (self.usage_sum.double() / n).tolist(), float(self.entropy_sum) / n


def gate_report(gates: Mapping[str, SoftmaxGate]) -> dict[str, Any]:
    """``{"expert_usage": {name: [share per expert]}, "gate_entropy": {name: mean entropy}}`` over the
    gates that have recorded rows."""
    usage: dict[str, list[float]] = {}
    entropy: dict[str, float] = {}
    for name, gate in gates.items():
        stats = gate.statistics()
        if stats is not None:
            usage[name], entropy[name] = stats
    return {"expert_usage": usage, "gate_entropy": entropy}


def reset_gate_statistics(module: nn.Module) -> None:
    """Zero the statistics of every :class:`SoftmaxGate` inside ``module``."""
    for m in module.modules():
        if isinstance(m, SoftmaxGate):
            m.reset_statistics()
