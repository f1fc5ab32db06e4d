"""Task-owned output modules: the tower that ends in a task's logits, and the softmax gate of
mixture-of-experts models (which records its own routing statistics for diagnostics)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polytask.nn.encoders import MLP
from polytask.tasks import Task

__all__ = ["SoftmaxGate", "TaskHead", "WeightStatistics", "ZeroShare", "gate_report", "reset_gate_statistics"]


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


class ZeroShare(nn.Module):
    """Share of exactly-zero entries in each expert's output (dead ReLU units: HoME's "expert
    collapse" symptom), accumulated over eval-mode forward passes like :class:`SoftmaxGate`."""

    zero_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.register_buffer("zero_sum", torch.zeros(n_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    def update(self, outputs: Sequence[torch.Tensor] | torch.Tensor) -> None:
        """Record one batch: a list of ``n_experts`` tensors ``(N, ...)`` or one ``(N, n_experts, ...)``."""
        if self.training:
            return
        with torch.no_grad():
            if isinstance(outputs, torch.Tensor):
                outputs = outputs.unbind(1)
            if len(outputs) != self.n_experts:
                raise ValueError(f"expected {self.n_experts} expert outputs, got {len(outputs)}")
            n = outputs[0].shape[0]
            shares = torch.stack([(o.detach() == 0).flatten(1).double().mean(1).sum() for o in outputs])
            self.zero_sum += shares.to(self.zero_sum.device)
            self.count += n

    def reset_statistics(self) -> None:
        self.zero_sum.zero_()
        self.count.zero_()

    def statistics(self) -> list[float] | None:
        n = int(self.count)
        return None if n == 0 else (self.zero_sum / n).tolist()


class WeightStatistics(nn.Module):
    """Eval-mode statistics of non-negative gate weights ``(N, E)`` that need not be a softmax.

    Rows are normalised to sum to one before recording, so :meth:`statistics` has the meaning and
    layout of :meth:`polytask.nn.heads.SoftmaxGate.statistics` (mean share per expert, mean entropy
    in nats) and plugs into :func:`polytask.nn.heads.gate_report`. It also keeps the mean raw row sum
    (:meth:`mass`: 1 for distributions, the mean sigmoid for a single sigmoid gate) and the mean
    number of experts with a non-zero weight (:meth:`support`). Buffers are not saved.
    """

    usage_sum: torch.Tensor
    entropy_sum: torch.Tensor
    mass_sum: torch.Tensor
    support_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, n_experts: int) -> None:
        super().__init__()
        self.n_experts = n_experts
        self.register_buffer("usage_sum", torch.zeros(n_experts, dtype=torch.float64), persistent=False)
        self.register_buffer("entropy_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("mass_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("support_sum", torch.zeros((), dtype=torch.float64), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    def update(self, w: torch.Tensor) -> None:
        if self.training:
            return
        with torch.no_grad():
            w = w.detach().double()
            mass = w.sum(1, keepdim=True)
            share = w / mass.clamp_min(torch.finfo(w.dtype).tiny)
            self.usage_sum += share.sum(0).to(self.usage_sum.device)
            self.entropy_sum += torch.special.entr(share).sum().to(self.entropy_sum.device)
            self.mass_sum += mass.sum().to(self.mass_sum.device)
            self.support_sum += (w > 0).sum().to(self.support_sum.device)
            self.count += w.shape[0]

    def reset_statistics(self) -> None:
        for b in (self.usage_sum, self.entropy_sum, self.mass_sum, self.support_sum, self.count):
            b.zero_()

    def statistics(self) -> tuple[list[float], float] | None:
        """(mean share per expert, mean entropy of the shares in nats) over the recorded rows."""
        n = int(self.count)
        if n == 0:
            return None
        return (self.usage_sum / n).tolist(), float(self.entropy_sum) / n

    def mass(self) -> float | None:
        n = int(self.count)
        return None if n == 0 else float(self.mass_sum) / n

    def support(self) -> float | None:
        n = int(self.count)
        return None if n == 0 else float(self.support_sum) / n


def gate_report(gates: Mapping[str, SoftmaxGate], zero_shares: Mapping[str, ZeroShare] | None = None) -> dict[str, Any]:
    """``{"expert_usage": {gate: [share per expert]}, "gate_entropy": {gate: mean entropy},
    "expert_zero_share": {group: [share of zero outputs per expert]}}`` over what has recorded rows."""
    usage: dict[str, list[float]] = {}
    entropy: dict[str, float] = {}
    for name, gate in gates.items():
        stats = gate.statistics()
        if stats is not None:
            usage[name], entropy[name] = stats
    report: dict[str, Any] = {"expert_usage": usage, "gate_entropy": entropy}
    zeros = {name: z.statistics() for name, z in (zero_shares or {}).items()}
    zeros = {name: v for name, v in zeros.items() if v is not None}
    if zeros:
        report["expert_zero_share"] = zeros
    return report


def reset_gate_statistics(module: nn.Module) -> None:
    """Zero the statistics of every gate recorder and :class:`ZeroShare` inside ``module``."""
    for m in module.modules():
        if isinstance(m, SoftmaxGate | WeightStatistics | ZeroShare):
            m.reset_statistics()
