"""Adaptive Information Transfer Multi-task (AITM) framework.

Xi, Chen, Yan, Zhang, Zhu, Zhuang & Chen, "Modeling the Sequential Dependence among Audience
Multi-step Conversions with Multi-task Learning in Targeted Display Advertising", KDD 2021
(arXiv:2105.08489; authors' code: github.com/xidongbo/AITM).

The tasks are the steps of a conversion funnel (e.g. click -> conversion), each possible only after
the previous one. All steps share the feature embeddings; step ``t`` has its own tower, whose output
``q_t`` is mixed with the information ``p_{t-1} = g_t(z_{t-1})`` transferred from the previous step
by the Adaptive Information Transfer (AIT) module, an attention over the two vectors
``u in {p_{t-1}, q_t}``::

    z_t = sum_u w_u h1(u),   w_u = softmax_u(<h2(u), h3(u)> / sqrt(k)),   z_1 = q_1

and ``z_t`` feeds step ``t``'s output layer. The Behavioural Expectation Calibrator adds
``alpha * sum_{t>=2} mean_i max(p_t(x_i) - p_{t-1}(x_i), 0)`` to the loss, a soft penalty on
predicting a later step as more likely than an earlier one (:meth:`AITM.auxiliary_loss`).

Confirmed in the authors' code (``AITM.py``, ``AITM_standard.py``): embeddings of 5 dimensions,
towers 128-64-32 with ReLU (dropout keep rates 0.9/0.7/0.7), ``g_t`` one ReLU layer of width
``k = 32`` applied to the previous step's AIT output ``z_{t-1}`` (the first step's ``z_1`` is its
tower output), ``h1``-``h3`` bias-free ``k x k`` maps, the attention score of each vector from its
*own* query and key (not cross-attention), one linear output layer per step, and the calibrator as
written above with ``alpha = 0.6`` (``--weight`` default and README command for the public Ali-CCP
experiment; ``AITM_standard.py`` uses 0.3 for its 4-step example).

Choices:

* One set of ``h1``-``h3`` for all steps, as in ``AITM_standard.py`` (one set of attention weights
  for every step); one transfer layer ``g_t`` per step, as there.
* Dropout is one rate for every layer (0 by default, as the other architectures here), and no batch
  norm (``AITM_standard.py`` can add it after each tower and transfer layer; ``AITM.py`` has none);
  embedding sizes follow the library's ``"auto"`` rule unless ``emb_dim`` is given (5 = the paper).
* The calibrator is computed in training-mode forward passes and handed to the trainer through
  :meth:`~polytask.nn.MultiTaskModel.auxiliary_loss`, which adds its gradient every step whatever
  balancer weighs the task losses.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import MLP, Hidden, make_stem, resolve_hidden
from polytask.tasks import Task, TaskKind

__all__ = ["AITM", "AdaptiveInformationTransfer", "behavioral_expectation_penalty"]


def behavioral_expectation_penalty(probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_{t>=2} mean(max(p_t - p_{t-1}, 0))`` for step probabilities in funnel order.

    Zero when no later step is predicted more likely than the one before it, on any row.
    """
    if len(probabilities) < 2:
        raise ValueError(f"the calibrator needs at least two funnel steps, got {len(probabilities)}")
    return sum(
        (F.relu(later - earlier).mean() for earlier, later in itertools.pairwise(probabilities)),
        torch.zeros((), dtype=probabilities[0].dtype, device=probabilities[0].device),
    )


class AdaptiveInformationTransfer(nn.Module):
    """The AIT attention: ``z = sum_u w_u h1(u)`` over ``u in {transferred, own}``, with
    ``w = softmax(<h2(u), h3(u)> / sqrt(k))`` (bias-free ``k x k`` maps, as in the authors' code)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.h1 = nn.Linear(dim, dim, bias=False)
        self.h2 = nn.Linear(dim, dim, bias=False)
        self.h3 = nn.Linear(dim, dim, bias=False)
        self.scale = 1.0 / math.sqrt(dim)

    def forward(self, transferred: torch.Tensor, own: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z (N, k), weights (N, 2))``; ``weights[:, 0]`` is the share of the transferred information."""
        u = torch.stack([transferred, own], dim=1)  # (N, 2, k)
        w = torch.softmax((self.h2(u) * self.h3(u)).sum(-1) * self.scale, dim=1)  # (N, 2)
        return (w.unsqueeze(-1) * self.h1(u)).sum(1), w


@register_model(
    "aitm",
    paper=(
        "Xi et al., 'Modeling the Sequential Dependence among Audience Multi-step Conversions with Multi-task "
        "Learning in Targeted Display Advertising', KDD 2021"
    ),
    description="funnel towers linked by attention-based information transfer, plus a funnel-order calibrator loss",
    funnel=None,
    tower_hidden="auto",
    calibrator_weight=0.6,
    dropout=0.0,
    emb_dim="auto",
)
class AITM(MultiTaskModel):
    """Shared embeddings, a tower per funnel step, AIT between consecutive steps, a calibrator loss.

    Parameter split (who uses what): step ``t``'s output layer only serves step ``t``; its tower and
    transfer layer feed every later step through ``z_t``, and the AIT maps serve steps 2..T, so those
    belong to a task only when no later step reads them (the last step; the AIT maps when there are
    two steps) and are shared otherwise. The shared representation is ``[embeddings (N, D)]``.

    Args:
        funnel: the task names in funnel order (every task once, at least two); ``None``: the
            model's task order. A comma-separated string is accepted.
        tower_hidden: tower widths; the last one is the AIT width ``k``. ``"auto"``: ``(128, 64, 32)``
            as in the authors' code.
        calibrator_weight: the calibrator's weight ``alpha`` (0 turns it off); 0.6 as in the
            authors' code.
        dropout: dropout after each hidden layer of the towers and after the transfer layers.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`); the paper
            uses 5.
    """

    transfer_sum: torch.Tensor
    violation_sum: torch.Tensor
    count: torch.Tensor

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        funnel: Sequence[str] | str | None = None,
        tower_hidden: Hidden = "auto",
        calibrator_weight: float = 0.6,
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        if input_spec.kind != "tabular":
            raise ValueError(f"aitm needs tabular input (shared embeddings), got {input_spec.kind} input")
        names = self.task_names
        order = self._resolve_funnel(funnel, names)
        for name in order:
            kind = self.tasks[names.index(name)].kind
            if kind is not TaskKind.BINARY:
                raise ValueError(f"aitm: every funnel step must be a binary task, '{name}' is {kind.value}")
        if not (calibrator_weight >= 0 and math.isfinite(calibrator_weight)):
            raise ValueError(f"calibrator_weight must be a finite number >= 0, got {calibrator_weight}")
        self.funnel = order
        self.calibrator_weight = float(calibrator_weight)
        hidden = resolve_hidden(tower_hidden, input_spec, tabular=(128, 64, 32), image=())
        k = hidden[-1]
        self.stem = make_stem(input_spec, emb_dim)
        n = len(order)
        # Indexed by funnel position; transfers[i] carries z_i into step i + 1.
        self.towers = nn.ModuleList(MLP(self.stem.out_dim, hidden, dropout) for _ in range(n))
        self.transfers = nn.ModuleList(MLP(k, (k,), dropout) for _ in range(n - 1))
        self.ait = AdaptiveInformationTransfer(k)
        self.heads = nn.ModuleList(nn.Linear(k, 1) for _ in range(n))
        self._aux: torch.Tensor | None = None
        # Eval-mode statistics for diagnostics() (not saved in the state dict).
        self.register_buffer("transfer_sum", torch.zeros(n - 1), persistent=False)
        self.register_buffer("violation_sum", torch.zeros(n - 1), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    @staticmethod
    def _resolve_funnel(funnel: Sequence[str] | str | None, names: list[str]) -> list[str]:
        if funnel is None:
            order = list(names)
        elif isinstance(funnel, str):
            order = [s.strip() for s in funnel.split(",") if s.strip()]
        else:
            order = [str(s) for s in funnel]
        unknown = [s for s in order if s not in names]
        if unknown:
            raise ValueError(f"aitm: unknown task(s) {unknown} in funnel; tasks: {', '.join(names)}")
        if len(set(order)) != len(order):
            raise ValueError(f"aitm: funnel lists a task twice: {order}")
        if len(order) < 2:
            raise ValueError(f"aitm: a funnel needs at least two steps, got {order}")
        missing = [s for s in names if s not in order]
        if missing:
            raise ValueError(f"aitm: funnel must list every task once; missing {missing}")
        return order

    def _forward(self, x: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
        """Logits in funnel order, the embeddings, and the AIT weights of steps 2..T."""
        h = self.stem(x)
        z = self.towers[0](h)
        logits = [self.heads[0](z)[:, 0]]
        weights = []
        for i in range(1, len(self.funnel)):
            z, w = self.ait(self.transfers[i - 1](z), self.towers[i](h))
            logits.append(self.heads[i](z)[:, 0])
            weights.append(w)
        return logits, h, weights

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        logits, h, weights = self._forward(x)
        if self.training:
            self._aux = self.calibrator_weight * self.calibrator_penalty(logits) if self.calibrator_weight > 0 else None
        else:
            self._record(logits, weights)
        by_name = dict(zip(self.funnel, logits, strict=True))
        return {n: by_name[n] for n in self.task_names}, [h]

    @staticmethod
    def calibrator_penalty(logits: Sequence[torch.Tensor]) -> torch.Tensor:
        """The calibrator (without ``alpha``) from step logits in funnel order."""
        return behavioral_expectation_penalty([torch.sigmoid(v) for v in logits])

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``calibrator_weight`` x the calibrator of the last training-mode forward pass (``None`` when
        the weight is 0 or no training-mode pass has run)."""
        return self._aux

    def transfer_weights(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """For steps 2..T, the AIT weight ``(N,)`` on the information transferred from the step before."""
        _, _, weights = self._forward(x)
        return {name: w[:, 0] for name, w in zip(self.funnel[1:], weights, strict=True)}

    def task_parameter_names(self, task: str) -> list[str]:
        self._task_index(task)
        i, last = self.funnel.index(task), len(self.funnel) - 1
        prefixes = [f"heads.{i}"]
        if i == last:
            # Nothing downstream reads the last step's tower and transfer layer (nor the AIT maps
            # when the funnel has two steps).
            prefixes += [f"towers.{i}", f"transfers.{i - 1}"] + (["ait"] if last == 1 else [])
        return self._parameter_names_under(*prefixes)

    # ------------------------------------------------------------- diagnostics
    def _record(self, logits: list[torch.Tensor], weights: list[torch.Tensor]) -> None:
        with torch.no_grad():
            self.transfer_sum += torch.stack([w[:, 0].sum() for w in weights]).to(self.transfer_sum.dtype)
            violations = [(later > earlier).sum() for earlier, later in itertools.pairwise(logits)]
            self.violation_sum += torch.stack(violations).to(self.violation_sum.dtype)
            self.count += logits[0].shape[0]

    def diagnostics(self) -> dict[str, Any]:
        """Per step 2..T, over eval-mode forward passes since :meth:`reset_diagnostics`: the mean AIT
        weight on the transferred information (``ait_transfer_weight``) and the share of rows that
        predict the step as more likely than the step before (``funnel_violation_share``)."""
        n = int(self.count)
        if n == 0:
            return {}
        steps = self.funnel[1:]
        return {
            "ait_transfer_weight": dict(zip(steps, (self.transfer_sum.double() / n).tolist(), strict=True)),
            "funnel_violation_share": dict(zip(steps, (self.violation_sum.double() / n).tolist(), strict=True)),
        }

    def reset_diagnostics(self) -> None:
        self.transfer_sum.zero_()
        self.violation_sum.zero_()
        self.count.zero_()
