"""HoME: Hierarchy of Multi-Gate Experts.

Wang, Cao, Fu, Gai & Zhou, "HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at
Kuaishou", arXiv:2408.05430, 2024 (KDD 2025). The paper names three failures of MMoE-style models
and one remedy for each:

- *expert collapse* (expert outputs of very different scale, some with over 90% zero ReLU
  activations, so the gates cannot weigh them fairly): every expert layer is
  ``Swish(Norm(Linear(.)))`` with batch normalisation (``expert_norm="batch"``, the paper's choice;
  ``"layer"`` is offered for small or non-i.i.d. batches);
- *expert degradation* (shared experts taken over by one task): a hierarchy. Tasks are partitioned
  into groups (``task_groups``; the paper groups Kuaishou's behaviours into categories such as
  watch-time and interaction tasks). A first, *meta* layer has shared experts and per-group
  experts; group ``g``'s gate mixes the shared and group-``g`` experts into ``z_g``, and a shared
  gate mixes the shared experts into ``z_shared``. The second, *task* layer has shared experts
  reading ``z_shared`` and per-task experts reading ``z_g`` of the task's group; task ``t``'s gate
  reads ``[z_g, z_shared]`` and mixes the task-layer shared experts with task ``t``'s own experts,
  and task ``t``'s tower reads that mix;
- *expert underfitting* (sparse tasks ignoring their own experts): a *feature-gate* gives every
  meta-layer expert its own view of the input, ``v * 2 sigmoid(v A B)`` with a rank-``r`` LoRA-style
  factorisation ``A B`` (``B`` starts at zero, so the gate is exactly 1 at initialisation and 1 on
  average for centred logits); a *self-gate* adds to each group's and each task's mixture a residual
  term over its *own* experts only, ``sum_j s_j E_j`` with ``s = sigmoid(W x)`` for one own expert
  and ``softmax(W x)`` for several, so those experts always receive their task's gradient.

Choices made here where the paper is specific to Kuaishou's production model or leaves room:

- ``z_shared`` mixes only the shared meta experts (a strict hierarchy mask): a group's experts then
  reach only the tasks of that group, and a group with a single task is owned by that task.
- feature-gates are applied in the meta layer, where experts read the wide raw input; the task
  layer reads the narrow meta representations and has none.
- the main gates are softmax gates (:class:`SoftmaxGate`); the self-gates are sigmoid or softmax as
  above and are recorded by a private recorder that normalises each row to shares summing to one
  (``self_gate`` in :meth:`HoME.diagnostics`, with the mean raw weight as ``weight_mass``).
- the meta and task layers use the same ``n_shared_experts`` and ``expert_hidden``; an expert with
  no hidden width gets one layer as wide as its input, so every expert output is normalised.
- for images each meta expert is a LeNet trunk followed by the normalised Swish layers; the
  feature-gate then weighs pixels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Chain, Hidden, LeNetTrunk, gate_input, make_stem, resolve_hidden
from polytask.nn.heads import SoftmaxGate, TaskHead, WeightStatistics, ZeroShare, gate_report, reset_gate_statistics
from polytask.tasks import Task

__all__ = ["HOME_SHARED", "HoME"]

#: Key of the meta layer's shared gate in :meth:`HoME.gate_weights` (level 0) and the diagnostics.
HOME_SHARED = "<shared>"

TaskGroups = Sequence[Sequence[str]] | Mapping[str, Sequence[str]] | None


class _BatchNorm(nn.BatchNorm1d):
    """Batch normalisation that uses its running statistics for a one-row training batch (the
    trainer's last batch can have one row, whose batch variance does not exist)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and x.shape[0] == 1:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        return super().forward(x)


class _NormSwishMLP(nn.Module):
    """``Linear -> Norm -> Swish [-> Dropout]`` per width: HoME's normalised expert."""

    def __init__(self, in_dim: int, hidden: Sequence[int], norm: str, dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers += [nn.Linear(d, h), _BatchNorm(h) if norm == "batch" else nn.LayerNorm(h), nn.SiLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.layers = nn.Sequential(*layers)
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class _FeatureGate(nn.Module):
    """``2 * sigmoid(v A B)``: one input weighting per expert, low rank; exactly 1 at initialisation."""

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        rank = min(rank, dim)
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.zeros_(self.up.weight)  # LoRA's initialisation: the gate starts as the identity

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.up(self.down(v)))


class _SelfGate(nn.Module):
    """Residual weights over a unit's own experts: sigmoid for one expert, softmax for several."""

    def __init__(self, in_dim: int, n_experts: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, n_experts)
        self.stats = WeightStatistics(n_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.linear(x)
        w = torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=-1)
        self.stats.update(w)
        return w


def _mix(w: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """``(N, E) x (N, E, d) -> (N, d)``."""
    return torch.bmm(w.unsqueeze(1), experts).squeeze(1)


def _resolve_groups(groups: TaskGroups, task_names: list[str]) -> tuple[list[str], list[list[int]]]:
    """Group names and the task indices of each group; one group per task when ``groups`` is None."""
    if groups is None:
        return list(task_names), [[i] for i in range(len(task_names))]
    if isinstance(groups, Mapping):
        items = [(str(name), list(members)) for name, members in groups.items()]
    elif isinstance(groups, str):
        raise ValueError(f"task_groups must be a list of task-name lists or a mapping, got '{groups}'")
    else:
        items = []
        for members in groups:
            if isinstance(members, str):
                raise ValueError(f"task_groups must be a list of task-name lists, got an entry '{members}'")
            items.append(("+".join(str(m) for m in members), list(members)))
    if not items:
        raise ValueError("task_groups is empty; give every task a group")
    seen: dict[str, str] = {}
    for name, members in items:
        if not members:
            raise ValueError(f"task group '{name}' is empty")
        unknown = [m for m in members if m not in task_names]
        if unknown:
            raise ValueError(f"task_groups names unknown task(s) {unknown}; tasks: {', '.join(task_names)}")
        for m in members:
            if m in seen:
                raise ValueError(f"task '{m}' is in more than one task group ('{seen[m]}' and '{name}')")
            seen[m] = name
    missing = [t for t in task_names if t not in seen]
    if missing:
        raise ValueError(f"task(s) {missing} are in no task group; every task needs one")
    names = [name for name, _ in items]
    if len(set(names)) != len(names):
        raise ValueError(f"task group names must be unique, got {names}")
    return names, [[task_names.index(m) for m in members] for _, members in items]


@register_model(
    "home",
    paper=(
        "Wang et al., 'HoME: Hierarchy of Multi-Gate Experts for Multi-Task Learning at Kuaishou', "
        "arXiv:2408.05430, 2024"
    ),
    description="hierarchical experts (shared / task-group meta layer, then task layer) with normalised Swish "
    "experts, feature-gates and self-gates",
    task_groups=None,
    n_shared_experts=2,
    n_group_experts=2,
    n_task_experts=1,
    expert_hidden="auto",
    tower_hidden="auto",
    expert_norm="batch",
    feature_gate_rank=8,
    self_gate=True,
    dropout=0.0,
    emb_dim="auto",
)
class HoME(MultiTaskModel):
    """HoME with a meta layer (shared + per-group experts) and a task layer (shared + per-task experts).

    Parameter ownership follows the data flow (as for PLE): task ``t`` owns its task-layer experts,
    gate, self-gate and tower, and, when its group has no other task, its group's meta experts,
    feature-gates, gate and self-gate. Everything else (stem, shared experts of both layers, their
    feature-gates, the meta shared gate, groups of several tasks) is shared. The shared
    representation is ``[task-layer shared expert outputs (N, n_shared_experts, d)]``, the shared
    features every task gate mixes.

    Args:
        task_groups: ``None`` (one group per task), a list of task-name lists (group names join the
            members with ``+``) or a mapping ``{group name: [task names]}``; every task in exactly one
            group.
        n_shared_experts: shared experts in each of the two layers (>= 1).
        n_group_experts: meta-layer experts per task group (>= 1).
        n_task_experts: task-layer experts per task (>= 1).
        expert_hidden: widths of every expert (each layer normalised, then Swish). ``"auto"``:
            ``(64,)`` for tables, ``(50,)`` after a LeNet trunk for images.
        tower_hidden: tower widths. ``"auto"``: ``(32,)`` for tables, ``(50,)`` for images.
        expert_norm: ``"batch"`` (the paper's) or ``"layer"`` normalisation of expert layers.
        feature_gate_rank: rank of each meta expert's feature-gate; 0 turns feature-gates off.
        self_gate: add the self-gate residuals over each group's and each task's own experts.
        dropout: dropout after each expert layer and each hidden tower layer.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`).
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        task_groups: TaskGroups = None,
        n_shared_experts: int = 2,
        n_group_experts: int = 2,
        n_task_experts: int = 1,
        expert_hidden: Hidden = "auto",
        tower_hidden: Hidden = "auto",
        expert_norm: str = "batch",
        feature_gate_rank: int = 8,
        self_gate: bool = True,
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        if n_shared_experts < 1 or n_group_experts < 1 or n_task_experts < 1:
            raise ValueError(
                "need n_shared_experts >= 1, n_group_experts >= 1 and n_task_experts >= 1, got "
                f"{n_shared_experts}, {n_group_experts}, {n_task_experts}"
            )
        if expert_norm not in ("batch", "layer"):
            raise ValueError(f"expert_norm must be 'batch' or 'layer', got '{expert_norm}'")
        if feature_gate_rank < 0:
            raise ValueError(f"feature_gate_rank must be >= 0, got {feature_gate_rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.group_names, self.groups = _resolve_groups(task_groups, self.task_names)
        self.task_group = [next(g for g, members in enumerate(self.groups) if i in members) for i in range(len(tasks))]
        expert_h = resolve_hidden(expert_hidden, input_spec, tabular=(64,), image=(50,))
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(32,), image=(50,))
        self.n_shared_experts, self.n_group_experts, self.n_task_experts = (
            n_shared_experts,
            n_group_experts,
            n_task_experts,
        )
        self.use_self_gate = bool(self_gate)
        self.stem = make_stem(input_spec, emb_dim)
        gate_dim = self.stem.out_dim

        def meta_expert() -> nn.Module:
            if input_spec.vector_stem:
                return _NormSwishMLP(gate_dim, expert_h or (gate_dim,), expert_norm, dropout)
            trunk = LeNetTrunk(input_spec.channels, input_spec.height, input_spec.width)
            return Chain(trunk, _NormSwishMLP(trunk.out_dim, expert_h or (trunk.out_dim,), expert_norm, dropout))

        def feature_gates(n: int) -> nn.ModuleList:
            return nn.ModuleList(_FeatureGate(gate_dim, feature_gate_rank) for _ in range(n) if feature_gate_rank)

        n_groups = len(self.groups)
        # ---- meta layer: shared and per-group experts on the (feature-gated) input
        self.meta_shared_experts = nn.ModuleList(meta_expert() for _ in range(n_shared_experts))
        self.meta_shared_fgates = feature_gates(n_shared_experts)
        self.meta_group_experts = nn.ModuleList(
            nn.ModuleList(meta_expert() for _ in range(n_group_experts)) for _ in range(n_groups)
        )
        self.meta_group_fgates = nn.ModuleList(feature_gates(n_group_experts) for _ in range(n_groups))
        self.meta_shared_gate = SoftmaxGate(gate_dim, n_shared_experts)
        self.meta_group_gates = nn.ModuleList(
            SoftmaxGate(gate_dim, n_shared_experts + n_group_experts) for _ in range(n_groups)
        )
        self.meta_group_self_gates = nn.ModuleList(
            _SelfGate(gate_dim, n_group_experts) for _ in range(n_groups) if self.use_self_gate
        )
        d = self.meta_shared_experts[0].out_dim
        # ---- task layer: shared experts on z_shared, each task's experts on its group's z_g
        self.shared_experts = nn.ModuleList(
            _NormSwishMLP(d, expert_h or (d,), expert_norm, dropout) for _ in range(n_shared_experts)
        )
        self.task_experts = nn.ModuleList(
            nn.ModuleList(_NormSwishMLP(d, expert_h or (d,), expert_norm, dropout) for _ in range(n_task_experts))
            for _ in tasks
        )
        d_task = self.shared_experts[0].out_dim
        self.task_gates = nn.ModuleList(SoftmaxGate(2 * d, n_shared_experts + n_task_experts) for _ in tasks)
        self.task_self_gates = nn.ModuleList(_SelfGate(2 * d, n_task_experts) for _ in tasks if self.use_self_gate)
        self.towers = nn.ModuleList(TaskHead(d_task, t, tower_h, dropout) for t in tasks)
        # zero-output shares, in expert_names order: shared experts first
        self.meta_zeros = ZeroShare(n_shared_experts + n_groups * n_group_experts)
        self.task_zeros = ZeroShare(n_shared_experts + len(tasks) * n_task_experts)

    # ------------------------------------------------------------------ forward
    def _gated_inputs(self, h: torch.Tensor, fgates: nn.ModuleList, n: int) -> list[torch.Tensor]:
        """The input each of ``n`` experts reads: ``h`` weighted by the expert's feature-gate."""
        if not len(fgates):
            return [h] * n
        v = gate_input(h)
        return [h * fg(v).view_as(h) for fg in fgates]

    def _feature_gate_values(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Every meta expert's feature-gate on ``x``: ``(N, n_meta_experts, stem.out_dim)`` in
        ``meta`` expert order (shared experts, then each group's); empty if feature-gates are off."""
        v = gate_input(self.stem(x))
        fgates = [*self.meta_shared_fgates, *(fg for group in self.meta_group_fgates for fg in group)]
        if not fgates:
            return v.new_zeros(v.shape[0], 0, v.shape[1])
        return torch.stack([fg(v) for fg in fgates], dim=1)

    def _forward(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[dict[str, torch.Tensor]]]:
        h = self.stem(x)
        v = gate_input(h)
        n_s, n_g = self.n_shared_experts, self.n_group_experts
        # meta layer
        inputs = self._gated_inputs(h, self.meta_shared_fgates, n_s)
        meta_shared = torch.stack([e(i) for e, i in zip(self.meta_shared_experts, inputs, strict=True)], dim=1)
        meta_groups = []
        for experts, fgates in zip(self.meta_group_experts, self.meta_group_fgates, strict=True):
            inputs = self._gated_inputs(h, fgates, n_g)
            meta_groups.append(torch.stack([e(i) for e, i in zip(experts, inputs, strict=True)], dim=1))
        self.meta_zeros.update([*meta_shared.unbind(1), *(o for g in meta_groups for o in g.unbind(1))])
        w_shared = self.meta_shared_gate(v)
        z_shared = _mix(w_shared, meta_shared)
        meta_weights = {HOME_SHARED: w_shared}
        z_groups = []
        for g, own in enumerate(meta_groups):
            w = self.meta_group_gates[g](v)
            meta_weights[self.group_names[g]] = w
            z = _mix(w, torch.cat([meta_shared, own], dim=1))
            if self.use_self_gate:
                z = z + _mix(self.meta_group_self_gates[g](v), own)
            z_groups.append(z)
        # task layer
        shared = torch.stack([e(z_shared) for e in self.shared_experts], dim=1)  # (N, S, d)
        own_all = [
            torch.stack([e(z_groups[self.task_group[t]]) for e in experts], dim=1)
            for t, experts in enumerate(self.task_experts)
        ]
        self.task_zeros.update([*shared.unbind(1), *(o for own in own_all for o in own.unbind(1))])
        preds, task_weights = {}, {}
        for t, (task, own) in enumerate(zip(self.tasks, own_all, strict=True)):
            g_in = torch.cat([z_groups[self.task_group[t]], z_shared], dim=1)
            w = self.task_gates[t](g_in)
            task_weights[task.name] = w
            o = _mix(w, torch.cat([shared, own], dim=1))
            if self.use_self_gate:
                o = o + _mix(self.task_self_gates[t](g_in), own)
            preds[task.name] = self.towers[t](o)
        return preds, shared, [meta_weights, task_weights]

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        preds, shared, _ = self._forward(x)
        return preds, [shared]

    def gate_weights(self, x: dict[str, torch.Tensor], level: int = -1) -> dict[str, torch.Tensor]:
        """Softmax gate weights (rows sum to one). Level 0 (meta): per group ``(N, n_shared_experts +
        n_group_experts)`` over [shared, group experts] and :data:`HOME_SHARED` over the shared meta
        experts. Level 1 or -1 (task): per task ``(N, n_shared_experts + n_task_experts)`` over
        [task-layer shared experts, the task's own experts]."""
        return self._forward(x)[2][level]

    # ------------------------------------------------------------------ parameter split
    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        prefixes = [f"task_experts.{i}", f"task_gates.{i}", f"towers.{i}"]
        if self.use_self_gate:
            prefixes.append(f"task_self_gates.{i}")
        g = self.task_group[i]
        if len(self.groups[g]) == 1:  # nothing but this task reads the group's meta experts
            prefixes += [f"meta_group_experts.{g}", f"meta_group_fgates.{g}", f"meta_group_gates.{g}"]
            if self.use_self_gate:
                prefixes.append(f"meta_group_self_gates.{g}")
        return self._parameter_names_under(*prefixes)

    # ------------------------------------------------------------------ diagnostics
    def expert_names(self) -> dict[str, Any]:
        """Expert labels in gate order: per task (task layer) and per group (meta layer)."""
        shared = [f"shared:{j}" for j in range(self.n_shared_experts)]
        return {
            "task": {t: shared + [f"{t}:{j}" for j in range(self.n_task_experts)] for t in self.task_names},
            "meta": {
                **{g: shared + [f"{g}:{j}" for j in range(self.n_group_experts)] for g in self.group_names},
                HOME_SHARED: shared,
            },
        }

    def diagnostics(self) -> dict[str, Any]:
        """Task-layer ``expert_usage`` / ``gate_entropy`` per task (shares sum to one, in
        ``expert_names`` order), ``expert_zero_share`` of the ``meta`` experts (shared, then each
        group's) and the ``task`` experts (shared, then each task's), ``meta`` (the same for the
        meta gates, per group and :data:`HOME_SHARED`) and ``self_gate`` (per task and per group:
        row-normalised usage, entropy and mean raw weight ``weight_mass``). Eval-mode passes only."""
        gates = dict(zip(self.task_names, self.task_gates, strict=True))
        report = gate_report(gates, {"meta": self.meta_zeros, "task": self.task_zeros})  # type: ignore[arg-type]
        meta_gates = {
            **dict(zip(self.group_names, self.meta_group_gates, strict=True)),
            HOME_SHARED: self.meta_shared_gate,
        }
        report["meta"] = gate_report(meta_gates)  # type: ignore[arg-type]
        names = self.expert_names()
        report["expert_names"] = names["task"]
        report["meta"]["expert_names"] = names["meta"]
        if self.use_self_gate:
            stats = {
                **{t: g.stats for t, g in zip(self.task_names, self.task_self_gates, strict=True)},
                **{f"group:{n}": g.stats for n, g in zip(self.group_names, self.meta_group_self_gates, strict=True)},
            }
            self_report = gate_report(stats)  # type: ignore[arg-type]
            mass = {k: s.mass() for k, s in stats.items()}
            self_report["weight_mass"] = {k: v for k, v in mass.items() if v is not None}
            report["self_gate"] = self_report
        return report

    def reset_diagnostics(self) -> None:
        reset_gate_statistics(self)
        for m in self.modules():
            if isinstance(m, WeightStatistics):
                m.reset_statistics()
