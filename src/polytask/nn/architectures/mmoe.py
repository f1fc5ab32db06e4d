"""Multi-gate Mixture-of-Experts (MMoE).

Ma, Zhao, Yi, Chen, Hong & Chi, "Modeling Task Relationships in Multi-task Learning with Multi-gate
Mixture-of-Experts", KDD 2018. Shared experts read the input; each task mixes them with its own
softmax gate (a linear map of the input) and feeds the mixture to its tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, gate_input, make_expert, make_stem, resolve_hidden
from polytask.nn.heads import SoftmaxGate, TaskHead, ZeroShare, gate_report, reset_gate_statistics
from polytask.tasks import Task

__all__ = ["MMoE"]


@register_model(
    "mmoe",
    paper=(
        "Ma et al., 'Modeling Task Relationships in Multi-task Learning with Multi-gate Mixture-of-Experts', KDD 2018"
    ),
    description="shared experts mixed by one softmax gate per task, one tower per task",
    n_experts=8,
    expert_hidden="auto",
    tower_hidden="auto",
    dropout=0.0,
    emb_dim="auto",
)
class MMoE(MultiTaskModel):
    """Shared stem and experts; per task a :class:`SoftmaxGate` on :func:`gate_input` and a tower.

    Task ``k``'s gate and tower are its task-specific parameters; stem and experts are shared. The
    shared representation is ``[stacked expert outputs (N, E, d)]``. (The gates also read the stem
    output, so for tables the embeddings reach the losses through the gates as well; that path is
    not in the representation, which is the expert features the towers consume.)

    Args:
        n_experts: number of shared experts (8, as in the widely used Census-Income reproduction
            drawbridge/keras-mmoe).
        expert_hidden: expert widths. ``"auto"``: ``(64,)`` MLP for tables; for images a LeNet trunk
            per expert (``()``; non-empty adds fc layers after it).
        tower_hidden: tower widths. ``"auto"``: ``(32,)`` for tables, ``(50,)`` for images.
        dropout: dropout after each hidden fc layer of experts and towers.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`).
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        n_experts: int = 8,
        expert_hidden: Hidden = "auto",
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        expert_h = resolve_hidden(expert_hidden, input_spec, tabular=(64,), image=())
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(32,), image=(50,))
        self.stem = make_stem(input_spec, emb_dim)
        self.experts = nn.ModuleList(
            make_expert(input_spec, self.stem.out_dim, expert_h, dropout) for _ in range(n_experts)
        )
        d = self.experts[0].out_dim
        self.gates = nn.ModuleList(SoftmaxGate(self.stem.out_dim, n_experts) for _ in tasks)
        self.towers = nn.ModuleList(TaskHead(d, t, tower_h, dropout) for t in tasks)
        self.expert_zeros = ZeroShare(n_experts)

    def _forward(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        h = self.stem(x)
        experts = torch.stack([e(h) for e in self.experts], dim=1)  # (N, E, d)
        self.expert_zeros.update(experts)
        g_in = gate_input(h)
        preds, gates = {}, {}
        for task, gate, tower in zip(self.tasks, self.gates, self.towers, strict=True):
            w = gate(g_in)  # (N, E)
            gates[task.name] = w
            preds[task.name] = tower(torch.bmm(w.unsqueeze(1), experts).squeeze(1))
        return preds, experts, gates

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        preds, experts, _ = self._forward(x)
        return preds, [experts]

    def gate_weights(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each task's gate weights over the experts, ``(N, n_experts)`` (rows sum to one)."""
        return self._forward(x)[2]

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        return self._parameter_names_under(f"gates.{i}", f"towers.{i}")

    def diagnostics(self) -> dict[str, Any]:
        """Mean gate weight per expert (``expert_usage``, sums to one) and mean gate entropy in nats
        (``gate_entropy``; ``log(n_experts)`` = uniform) per task, and each expert's share of zero
        outputs (``expert_zero_share``), over eval-mode forward passes since the last
        :meth:`reset_diagnostics`."""
        gates = dict(zip(self.task_names, self.gates, strict=True))
        return gate_report(gates, {"experts": self.expert_zeros})  # type: ignore[arg-type]

    def reset_diagnostics(self) -> None:
        reset_gate_statistics(self)
