"""Customized Gate Control (CGC) and Progressive Layered Extraction (PLE).

Tang, Liu, Zhao & Gong, "Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model
for Personalized Recommendations", RecSys 2020.

Each level has shared experts and, per task, task-specific experts. Task k's gate mixes its own and the
shared experts. Below the last level a shared gate mixes *all* experts of the level and feeds the next
level's shared experts, while task k's mixture feeds task k's experts and gate at the next level
(paper, Section 4.3). CGC is PLE with one level.

Parameter ownership follows the data flow: a parameter is task k's only if nothing but task k's loss
reaches it. Task gates and the last level's task experts qualify; the task experts of lower levels do
not, because the shared gate passes their outputs to every task, so they are declared shared.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import MLP, Hidden, gate_input, make_expert, make_stem, resolve_hidden
from polytask.nn.heads import SoftmaxGate, TaskHead, ZeroShare, gate_report, reset_gate_statistics
from polytask.tasks import Task

__all__ = ["CGC", "PLE", "SHARED_GATE"]

#: Key of the shared gate in :meth:`PLE.gate_weights` (levels below the last only).
SHARED_GATE = "<shared>"

_PAPER = (
    "Tang et al., 'Progressive Layered Extraction (PLE): A Novel Multi-Task Learning (MTL) Model for "
    "Personalized Recommendations', RecSys 2020"
)


def _mix(w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``sum_e w[:, e] * experts[:, e]``: ``(N, E) x (N, E, d) -> (N, d)``."""
    return torch.bmm(w.unsqueeze(1), experts).squeeze(1)


class _Level(nn.Module):
    """One extraction level: experts, task gates and (unless last) the shared gate."""

    def __init__(
        self,
        n_tasks: int,
        n_task_experts: int,
        n_shared_experts: int,
        make: Callable[[], nn.Module],
        gate_dim: int,
        shared_gate: bool,
    ) -> None:
        super().__init__()
        self.task_experts = nn.ModuleList(nn.ModuleList(make() for _ in range(n_task_experts)) for _ in range(n_tasks))
        self.shared_experts = nn.ModuleList(make() for _ in range(n_shared_experts))
        self.task_gates = nn.ModuleList(
            SoftmaxGate(gate_dim, n_task_experts + n_shared_experts) for _ in range(n_tasks)
        )
        self.shared_gate = SoftmaxGate(gate_dim, n_tasks * n_task_experts + n_shared_experts) if shared_gate else None
        self.out_dim: int = self.shared_experts[0].out_dim
        # zero-output shares in expert_names order: every task's own experts, then the shared ones
        self.expert_zeros = ZeroShare(n_tasks * n_task_experts + n_shared_experts)

    def forward(
        self,
        task_in: Sequence[torch.Tensor],
        shared_in: torch.Tensor,
        task_gate_in: Sequence[torch.Tensor],
        shared_gate_in: torch.Tensor,
    ) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        """Returns (task mixtures, shared mixture or None, stacked shared experts (N, S, d),
        task gate weights, shared gate weights or None)."""
        shared = torch.stack([e(shared_in) for e in self.shared_experts], dim=1)
        own = [[e(h) for e in experts] for experts, h in zip(self.task_experts, task_in, strict=True)]
        self.expert_zeros.update([o for group in own for o in group] + list(shared.unbind(1)))
        outs, weights = [], []
        for k, gate in enumerate(self.task_gates):
            pool = torch.cat([torch.stack(own[k], dim=1), shared], dim=1) if own[k] else shared
            w = gate(task_gate_in[k])
            weights.append(w)
            outs.append(_mix(w, pool))
        shared_out = shared_w = None
        if self.shared_gate is not None:
            pool = torch.cat([*(torch.stack(o, dim=1) for o in own if o), shared], dim=1)
            shared_w = self.shared_gate(shared_gate_in)
            shared_out = _mix(shared_w, pool)
        return outs, shared_out, shared, weights, shared_w


@register_model(
    "ple",
    paper=_PAPER,
    description="progressive layered extraction: stacked levels of shared + task-specific experts with gates",
    n_levels=2,
    n_shared_experts=4,
    n_task_experts=2,
    expert_hidden="auto",
    tower_hidden="auto",
    dropout=0.0,
    emb_dim="auto",
)
class PLE(MultiTaskModel):
    """PLE with ``n_levels`` extraction levels (``n_levels=1`` is CGC).

    Level 1 experts read the stem output and its gates read :func:`gate_input`; at level l > 1 task
    k's experts and gate read task k's level l-1 mixture and the shared experts and shared gate read
    the shared mixture. The shared representation is ``[the last level's stacked shared-expert
    outputs (N, S, d)]``, the shared features the last task gates mix (for CGC: all shared experts).

    Args:
        n_levels: extraction levels (>= 1).
        n_shared_experts: shared experts per level (>= 1).
        n_task_experts: experts per task per level (>= 0). The defaults (4 shared, 2 per task) give
            8 experts per level for two tasks, MMoE's default count.
        expert_hidden: expert widths. ``"auto"``: ``(64,)`` for tables; for images the level-1 experts
            are LeNet trunks (``()``; non-empty adds fc layers after it). At levels > 1 experts are
            MLPs on the previous level's d-dim features with these widths, or ``(d,)`` if empty.
        tower_hidden: tower widths. ``"auto"``: ``(32,)`` for tables, ``(50,)`` for images.
        dropout: dropout after each hidden fc layer of experts and towers.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`).
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        n_levels: int = 2,
        n_shared_experts: int = 4,
        n_task_experts: int = 2,
        expert_hidden: Hidden = "auto",
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        if n_levels < 1 or n_shared_experts < 1 or n_task_experts < 0:
            raise ValueError(
                "need n_levels >= 1, n_shared_experts >= 1 and n_task_experts >= 0, got "
                f"{n_levels}, {n_shared_experts}, {n_task_experts}"
            )
        expert_h = resolve_hidden(expert_hidden, input_spec, tabular=(64,), image=())
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(32,), image=(50,))
        self.n_task_experts = n_task_experts
        self.n_shared_experts = n_shared_experts
        self.stem = make_stem(input_spec, emb_dim)
        levels: list[_Level] = []
        in_dim = self.stem.out_dim  # what the level's experts and gates read (flattened, for level 1)
        for lvl in range(n_levels):
            make: Callable[[], nn.Module]
            if lvl == 0:
                make = partial(make_expert, input_spec, in_dim, expert_h, dropout)
            else:  # an MLP without hidden layers would be the identity, hence (in_dim,)
                make = partial(MLP, in_dim, expert_h or (in_dim,), dropout)
            level = _Level(len(tasks), n_task_experts, n_shared_experts, make, in_dim, shared_gate=lvl < n_levels - 1)
            levels.append(level)
            in_dim = level.out_dim
        self.levels = nn.ModuleList(levels)
        self.towers = nn.ModuleList(TaskHead(levels[-1].out_dim, t, tower_h, dropout) for t in tasks)

    def _forward(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[dict[str, torch.Tensor]]]:
        h = self.stem(x)
        k = len(self.tasks)
        task_in, shared_in = [h] * k, h
        task_g, shared_g = [gate_input(h)] * k, gate_input(h)
        all_weights: list[dict[str, torch.Tensor]] = []
        shared = h
        for level in self.levels:
            outs, shared_out, shared, weights, shared_w = level(task_in, shared_in, task_g, shared_g)
            lw = dict(zip(self.task_names, weights, strict=True))
            if shared_w is not None:
                lw[SHARED_GATE] = shared_w
            all_weights.append(lw)
            task_in = task_g = outs
            if shared_out is not None:
                shared_in = shared_g = shared_out
        preds = {t.name: tower(z) for t, tower, z in zip(self.tasks, self.towers, task_in, strict=True)}
        return preds, shared, all_weights

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        preds, shared, _ = self._forward(x)
        return preds, [shared]

    def gate_weights(self, x: dict[str, torch.Tensor], level: int = -1) -> dict[str, torch.Tensor]:
        """Gate weights at ``level``: per task ``(N, n_task_experts + n_shared_experts)`` over [own
        experts, shared experts]; below the last level also :data:`SHARED_GATE` over [every task's
        experts in task order, shared experts]. Rows sum to one."""
        return self._forward(x)[2][level]

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        last = len(self.levels) - 1
        prefixes = [f"levels.{lvl}.task_gates.{i}" for lvl in range(len(self.levels))]
        # lower levels' task experts also feed the shared gate, hence every task: they are shared
        prefixes += [f"levels.{last}.task_experts.{i}", f"towers.{i}"]
        return self._parameter_names_under(*prefixes)

    def diagnostics(self) -> dict[str, Any]:
        """``expert_usage`` / ``gate_entropy`` per task at the last level (the gates that feed the
        towers), ordered as ``expert_names``; ``levels`` holds the same per level, with the shared
        gate under :data:`SHARED_GATE`. Recorded over eval-mode forward passes."""
        per_level = []
        for level in self.levels:
            gates = dict(zip(self.task_names, level.task_gates, strict=True))
            if level.shared_gate is not None:
                gates[SHARED_GATE] = level.shared_gate
            per_level.append(gate_report(gates, {"experts": level.expert_zeros}))  # type: ignore[arg-type]
        last = {
            key: {t: v for t, v in per_level[-1][key].items() if t != SHARED_GATE}
            for key in ("expert_usage", "gate_entropy")
        }
        if "expert_zero_share" in per_level[-1]:
            # every expert of the last level: each task's own experts in task order, then shared
            last["expert_zero_share"] = per_level[-1]["expert_zero_share"]
        names = {
            t: [f"{t}:{j}" for j in range(self.n_task_experts)] + [f"shared:{j}" for j in range(self.n_shared_experts)]
            for t in self.task_names
        }
        return {**last, "expert_names": names, "levels": per_level}

    def reset_diagnostics(self) -> None:
        reset_gate_statistics(self)


@register_model(
    "cgc",
    paper=_PAPER,
    description="customized gate control (single-level PLE): shared + task-specific experts, task gates",
    n_shared_experts=4,
    n_task_experts=2,
    expert_hidden="auto",
    tower_hidden="auto",
    dropout=0.0,
    emb_dim="auto",
)
class CGC(PLE):
    """Customized Gate Control: :class:`PLE` with a single level (no shared gate)."""

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        n_shared_experts: int = 4,
        n_task_experts: int = 2,
        expert_hidden: Hidden = "auto",
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(
            tasks,
            input_spec,
            n_levels=1,
            n_shared_experts=n_shared_experts,
            n_task_experts=n_task_experts,
            expert_hidden=expert_hidden,
            tower_hidden=tower_hidden,
            dropout=dropout,
            emb_dim=emb_dim,
        )
