"""DSelect-k: a differentiable gate that selects at most k of n experts per task.

Hazimeh, Zhao, Chowdhery, Sathiamoorthy, Chen, Mazumder, Hong & Chi, "DSelect-k: Differentiable
Selection in the Mixture of Experts with Applications to Multi-Task Learning", NeurIPS 2021.

The architecture is MMoE (shared experts, one gate and one tower per task) with the softmax gate
replaced by DSelect-k. A gate holds k *single-expert selectors*. Selector i encodes the index of one
expert in ``m = ceil(log2 n)`` bits; bit j is relaxed to ``S(z_ij)``, where ``S`` is the cubic
smooth-step (0 below ``-gamma/2``, 1 above ``gamma/2``, ``-2t^3/gamma^3 + 3t/(2 gamma) + 1/2``
between), and the selector's weight on the expert with code ``c`` is
``r_i[c] = prod_j (S(z_ij) if bit j of c is 1 else 1 - S(z_ij))``; these weights sum to one over the
``2^m`` codes. The gate returns ``sum_i softmax(w)_i r_i``, again summing to one; once every ``z_ij``
is outside ``(-gamma/2, gamma/2)`` each ``r_i`` is one-hot and at most k experts have a non-zero
weight. Of the paper's two forms (static per task, or per example) the per-example one is used:
``z = W_z x + b_z`` and ``w = W_w x + b_w`` read the input, like MMoE's gates. An entropy penalty
``lambda * sum_i H(r_i)`` (zero exactly at binary selectors) pushes the selectors towards binary
choices; it is returned by :meth:`DSelectK.auxiliary_loss` after each training-mode forward pass.

Choices the paper leaves open or that differ from its reference code (google-research,
``dselect_k_moe``):

- n not a power of two: the reference code keeps the ``2^m - n`` codes that name no expert and adds
  a penalty ``1 / sum(weights on real experts)``. Here code ``c`` is folded onto expert ``c mod n``
  instead, so every gate sums to one exactly and needs no extra penalty (a binary selector still
  names one expert); experts ``0 .. 2^m - n - 1`` then own two codes each.
- the penalty is averaged over the examples of the batch and summed over selectors and tasks (the
  reference code sums over examples too, which ties ``lambda`` to the batch size).
- ``z``'s layer starts at ``U(-gamma/100, gamma/100)`` (weights and bias) as in the reference code,
  so every selector starts in the smooth region with weights close to uniform over the codes.
- ``hard=True`` (or ``gate_weights(x, hard=True)``) evaluates the limit ``gamma -> 0``: ``S`` becomes
  the step ``z > 0``, so every selector is one-hot and at most k experts are used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, gate_input, make_expert, make_stem, resolve_hidden
from polytask.nn.heads import TaskHead, WeightStatistics, ZeroShare, gate_report, reset_gate_statistics
from polytask.tasks import Task

__all__ = ["DSelectK", "DSelectKGate", "smooth_step"]

# log(0) guard of the entropy penalty: r * log(max(r, EPS)) is exactly 0 at r = 0 and at r = 1, and
# its gradient stays finite at r = 0 (the reference code uses log(r + 1e-6), which is not 0 at r = 1).
_EPS = 1e-6


def smooth_step(t: torch.Tensor, gamma: float) -> torch.Tensor:
    """The cubic smooth-step: 0 for ``t <= -gamma/2``, 1 for ``t >= gamma/2``, continuously
    differentiable in between (Hazimeh et al., "The Tree Ensemble Layer", ICML 2020)."""
    half = gamma / 2
    tc = t.clamp(-half, half)  # the cubic only on its own interval: no overflow, no stray gradient
    poly = -2.0 / gamma**3 * tc**3 + 1.5 / gamma * tc + 0.5
    # exact 0 and 1 outside, so saturated selectors are exactly binary
    return torch.where(t <= -half, torch.zeros_like(t), torch.where(t >= half, torch.ones_like(t), poly))


class DSelectKGate(nn.Module):
    """Per-example DSelect-k gate over ``n_experts`` with ``k`` single-expert selectors.

    ``forward(x)`` returns ``(weights (N, n_experts), selectors (N, k, n_experts))``: each row of
    ``weights`` and each selector row sums to one. In eval mode the weights are recorded in
    ``stats`` (a :class:`WeightStatistics`).
    """

    codes: torch.Tensor
    fold: torch.Tensor

    def __init__(self, in_dim: int, n_experts: int, k: int, gamma: float = 1.0, hard: bool = False) -> None:
        super().__init__()
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > n_experts:
            raise ValueError(f"k must be <= n_experts, got k={k} > n_experts={n_experts}")
        if not gamma > 0:
            raise ValueError(f"gamma must be positive, got {gamma}")
        self.n_experts, self.k, self.gamma, self.hard = n_experts, k, float(gamma), hard
        # at least one bit, so that a single expert needs no special case (both codes fold onto it)
        self.n_bits = max(1, math.ceil(math.log2(n_experts)))
        n_codes = 2**self.n_bits
        bits = [[(c >> (self.n_bits - 1 - j)) & 1 for j in range(self.n_bits)] for c in range(n_codes)]
        self.register_buffer("codes", torch.tensor(bits, dtype=torch.bool), persistent=False)
        fold = torch.zeros(n_codes, n_experts)
        fold[torch.arange(n_codes), torch.arange(n_codes) % n_experts] = 1.0
        self.register_buffer("fold", fold, persistent=False)
        self.z = nn.Linear(in_dim, k * self.n_bits)
        nn.init.uniform_(self.z.weight, -self.gamma / 100, self.gamma / 100)
        nn.init.uniform_(self.z.bias, -self.gamma / 100, self.gamma / 100)
        self.w = nn.Linear(in_dim, k)
        self.stats = WeightStatistics(n_experts)

    def forward(self, x: torch.Tensor, hard: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        hard = self.hard if hard is None else hard
        z = self.z(x).view(x.shape[0], self.k, 1, self.n_bits)
        s = (z > 0).to(z.dtype) if hard else smooth_step(z, self.gamma)
        r = torch.where(self.codes, s, 1 - s).prod(-1)  # (N, k, 2^m): one distribution over codes
        selectors = r @ self.fold.to(r.dtype)  # (N, k, n)
        a = torch.softmax(self.w(x), dim=-1)  # (N, k)
        weights = (a.unsqueeze(-1) * selectors).sum(1)
        self.stats.update(weights)
        return weights, selectors


def selector_entropy(selectors: torch.Tensor) -> torch.Tensor:
    """Mean over examples of ``sum_i H(r_i)`` (nats); exactly zero when every selector is one-hot."""
    return -(selectors * selectors.clamp_min(_EPS).log()).sum(-1).sum(-1).mean()


@register_model(
    "dselect-k",
    paper=(
        "Hazimeh et al., 'DSelect-k: Differentiable Selection in the Mixture of Experts with Applications to "
        "Multi-Task Learning', NeurIPS 2021"
    ),
    description="shared experts, one differentiable sparse gate (at most k experts) and one tower per task",
    n_experts=8,
    k=2,
    gamma=1.0,
    entropy_reg=0.01,
    hard=False,
    expert_hidden="auto",
    tower_hidden="auto",
    dropout=0.0,
    emb_dim="auto",
)
class DSelectK(MultiTaskModel):
    """Shared stem and experts; per task a :class:`DSelectKGate` on :func:`gate_input` and a tower.

    Task ``t``'s gate and tower are its task-specific parameters; stem and experts are shared. The
    shared representation is ``[stacked expert outputs (N, E, d)]``, as for MMoE.

    Args:
        n_experts: number of shared experts (>= 1).
        k: most experts a task may use per example (``1 <= k <= n_experts``).
        gamma: width of the smooth-step's cubic region; smaller is closer to a hard choice.
        entropy_reg: weight of the selector-entropy penalty (the auxiliary loss); 0 turns it off.
        hard: evaluate the gates as hard choices (``gamma -> 0``) in every forward pass, e.g. to
            serve a trained model with exactly binary selectors.
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
        k: int = 2,
        gamma: float = 1.0,
        entropy_reg: float = 0.01,
        hard: bool = False,
        expert_hidden: Hidden = "auto",
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        if n_experts < 1:
            raise ValueError(f"n_experts must be >= 1, got {n_experts}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if k > n_experts:
            raise ValueError(f"k must be <= n_experts, got k={k} > n_experts={n_experts}")
        if entropy_reg < 0:
            raise ValueError(f"entropy_reg must be >= 0, got {entropy_reg}")
        expert_h = resolve_hidden(expert_hidden, input_spec, tabular=(64,), image=())
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(32,), image=(50,))
        self.k = k
        self.entropy_reg = float(entropy_reg)
        self.stem = make_stem(input_spec, emb_dim)
        self.experts = nn.ModuleList(
            make_expert(input_spec, self.stem.out_dim, expert_h, dropout) for _ in range(n_experts)
        )
        d = self.experts[0].out_dim
        self.gates = nn.ModuleList(DSelectKGate(self.stem.out_dim, n_experts, k, gamma, hard) for _ in tasks)
        self.towers = nn.ModuleList(TaskHead(d, t, tower_h, dropout) for t in tasks)
        self.expert_zeros = ZeroShare(n_experts)
        self._aux: torch.Tensor | None = None

    def _forward(
        self, x: dict[str, torch.Tensor], hard: bool | None = None
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]]:
        h = self.stem(x)
        experts = torch.stack([e(h) for e in self.experts], dim=1)  # (N, E, d)
        self.expert_zeros.update(experts)
        g_in = gate_input(h)
        preds, gates, penalty = {}, {}, []
        for task, gate, tower in zip(self.tasks, self.gates, self.towers, strict=True):
            w, selectors = gate(g_in, hard)
            gates[task.name] = w
            penalty.append(selector_entropy(selectors))
            preds[task.name] = tower(torch.bmm(w.unsqueeze(1), experts).squeeze(1))
        if self.training and self.entropy_reg > 0:
            self._aux = self.entropy_reg * torch.stack(penalty).sum()
        return preds, experts, gates

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        preds, experts, _ = self._forward(x)
        return preds, [experts]

    def gate_weights(self, x: dict[str, torch.Tensor], hard: bool | None = None) -> dict[str, torch.Tensor]:
        """Each task's weights over the experts, ``(N, n_experts)``: rows sum to one and, with
        ``hard=True`` or once the selectors are binary, have at most ``k`` non-zero entries."""
        return self._forward(x, hard)[2]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``entropy_reg * sum over tasks and selectors of the mean selector entropy`` from the last
        training-mode forward pass (None before one, or when ``entropy_reg == 0``)."""
        return self._aux

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        return self._parameter_names_under(f"gates.{i}", f"towers.{i}")

    def diagnostics(self) -> dict[str, Any]:
        """Per task the mean gate weight per expert (``expert_usage``, sums to one), the mean gate
        entropy in nats (``gate_entropy``) and the mean number of experts with a non-zero weight
        (``expert_support``, at most ``k`` once the selectors are binary); each expert's share of
        zero outputs (``expert_zero_share``). Over eval-mode forward passes since the last
        :meth:`reset_diagnostics`."""
        stats = {t: gate.stats for t, gate in zip(self.task_names, self.gates, strict=True)}
        report = gate_report(stats, {"experts": self.expert_zeros})  # type: ignore[arg-type]
        support = {t: s.support() for t, s in stats.items()}
        report["expert_support"] = {t: v for t, v in support.items() if v is not None}
        return report

    def reset_diagnostics(self) -> None:
        reset_gate_statistics(self)
        for m in self.modules():
            if isinstance(m, WeightStatistics):
                m.reset_statistics()
