"""Entire Space Multi-task Model (ESMM).

Ma, Zhao, Huang, Wang, Hu, Zhu & Gai, "Entire Space Multi-Task Model: An Effective Approach for
Estimating Post-Click Conversion Rate", SIGIR 2018 (arXiv:1804.07931).

Post-click conversion rate (CVR) models trained on clicked impressions only suffer from sample
selection bias and data sparsity. ESMM trains on *all* impressions: a CTR tower and a CVR tower read
one shared embedding layer, and ``pCTCVR = pCTR x pCVR``. The loss is the cross-entropy of pCTR
against the click label plus that of pCTCVR against the click-and-conversion label, both over the
entire impression space; pCVR is never supervised directly, it is what the model is for
(:meth:`ESMM.predict_cvr`).

What the paper fixes and we follow: shared embeddings; two towers of the same structure; the product
of the two probabilities; the two losses. The paper's experiments use towers of widths 360-200-80
(ReLU) before the output and 18-dimensional embeddings (the defaults of public re-implementations
such as MetaSpore's ESMM as well).

Choices the paper leaves open:

* The library's binary losses take logits, so the CTCVR output is ``logit(pq)`` with
  ``p = pCTR = sigmoid(a)`` and ``q = pCVR = sigmoid(b)`` (``a``, ``b``: the towers' logits),
  computed in log space without cancellation (:func:`ctcvr_logits`):
  ``log(pq) = logsigmoid(a) + logsigmoid(b)`` and, since ``1 - pq = (1 - p) + p(1 - q)``,
  ``log(1 - pq) = logaddexp(logsigmoid(-a), logsigmoid(a) + logsigmoid(-b))``. It is finite for any
  finite tower outputs, and binary cross-entropy on it equals the paper's cross-entropy on ``pq``.
* The CTR output is ``logsigmoid(a) - logsigmoid(-a)`` (mathematically ``a``): with it, and
  monotone floating-point rounding, ``ctcvr <= ctr`` holds exactly, not just up to rounding, so
  ``sigmoid(ctcvr) <= sigmoid(ctr)`` on every row.
* Embedding sizes follow the library's ``"auto"`` rule unless ``emb_dim`` is given (18 = the paper).
* Tasks other than the two named ones, if any, get an ordinary tower on the shared embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, make_stem, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.tasks import Task, TaskKind

__all__ = ["ESMM", "ctcvr_logits"]


def ctcvr_logits(ctr_logit: torch.Tensor, cvr_logit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ctr, ctcvr)`` logits with ``sigmoid(ctcvr) = sigmoid(ctr_logit) * sigmoid(cvr_logit)``.

    ``ctr`` equals ``ctr_logit`` up to rounding; it is recomputed from the same log-probabilities as
    ``ctcvr`` so that ``ctcvr <= ctr`` holds exactly in floating point. Finite for finite inputs of
    any size (no ``log(0)``, no cancellation), with finite gradients.
    """
    log_p = F.logsigmoid(ctr_logit)  # log pCTR
    log_not_p = F.logsigmoid(-ctr_logit)  # log (1 - pCTR)
    log_pq = log_p + F.logsigmoid(cvr_logit)  # log pCTCVR
    # log(1 - pq) = log((1 - p) + p (1 - q)): both terms positive, so no cancellation.
    log_not_pq = torch.logaddexp(log_not_p, log_p + F.logsigmoid(-cvr_logit))
    return log_p - log_not_p, log_pq - log_not_pq


@register_model(
    "esmm",
    paper=(
        "Ma et al., 'Entire Space Multi-Task Model: An Effective Approach for Estimating Post-Click "
        "Conversion Rate', SIGIR 2018"
    ),
    description="CTR and CVR towers on shared embeddings; pCTCVR = pCTR x pCVR, trained on all impressions",
    ctr_task="click",
    ctcvr_task="conversion",
    tower_hidden="auto",
    dropout=0.0,
    emb_dim="auto",
)
class ESMM(MultiTaskModel):
    """Shared embeddings, a CTR tower and a CVR tower; the CTCVR task predicts their product.

    Outputs: ``ctr_task`` gets the CTR logit, ``ctcvr_task`` the logit of ``pCTR * pCVR`` (see
    :func:`ctcvr_logits`); :meth:`predict_cvr` gives pCVR. The labels of ``ctcvr_task`` must be
    "clicked and converted" on every impression (0 for impressions without a click), as in the
    ``funnel-synthetic`` data set's ``conversion``.

    Parameter split: everything that computes pCTR also computes pCTCVR, so the CTR tower is shared
    and ``ctr_task`` owns no parameters; ``ctcvr_task`` owns the CVR tower. The shared
    representation is ``[embeddings (N, D)]``, which both towers read.

    Args:
        ctr_task: the click task (binary).
        ctcvr_task: the click-and-conversion task (binary).
        tower_hidden: widths of both towers before their output layer; ``"auto"``: ``(360, 200, 80)``
            as in the paper.
        dropout: dropout after each hidden layer of the towers.
        emb_dim: embedding sizes of categorical columns (see :class:`TabularEmbedding`); the paper
            uses 18.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        ctr_task: str = "click",
        ctcvr_task: str = "conversion",
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
        emb_dim: int | Sequence[int] | Literal["auto"] = "auto",
    ) -> None:
        super().__init__(tasks, input_spec)
        if input_spec.kind != "tabular":
            raise ValueError(f"esmm needs tabular input (shared embeddings), got {input_spec.kind} input")
        names = self.task_names
        for arg, name in (("ctr_task", ctr_task), ("ctcvr_task", ctcvr_task)):
            if name not in names:
                raise ValueError(f"esmm: {arg} '{name}' is not a task of this model; tasks: {', '.join(names)}")
            kind = self.tasks[names.index(name)].kind
            if kind is not TaskKind.BINARY:
                raise ValueError(f"esmm: {arg} '{name}' must be a binary task, it is {kind.value}")
        if ctr_task == ctcvr_task:
            raise ValueError(f"esmm: ctr_task and ctcvr_task must differ, both are '{ctr_task}'")
        self.ctr_task, self.ctcvr_task = ctr_task, ctcvr_task
        hidden = resolve_hidden(tower_hidden, input_spec, tabular=(360, 200, 80), image=())
        self.stem = make_stem(input_spec, emb_dim)
        d = self.stem.out_dim
        self.ctr_tower = TaskHead(d, self.tasks[names.index(ctr_task)], hidden, dropout)
        self.cvr_tower = TaskHead(d, self.tasks[names.index(ctcvr_task)], hidden, dropout)
        self.other_names = [n for n in names if n not in (ctr_task, ctcvr_task)]
        self.other_towers = nn.ModuleList(
            TaskHead(d, self.tasks[names.index(n)], hidden, dropout) for n in self.other_names
        )

    def _towers(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.stem(x)
        return h, self.ctr_tower(h), self.cvr_tower(h)

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        h, ctr, cvr = self._towers(x)
        ctr_out, ctcvr_out = ctcvr_logits(ctr, cvr)
        out = {self.ctr_task: ctr_out, self.ctcvr_task: ctcvr_out}
        out.update({n: tower(h) for n, tower in zip(self.other_names, self.other_towers, strict=True)})
        return {n: out[n] for n in self.task_names}, [h]

    def cvr_logits(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The CVR tower's logits ``(N,)``: ``logit P(conversion | click)``."""
        return self._towers(x)[2]

    def predict_cvr(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """pCVR ``(N,)``: the probability of a conversion given a click, for every impression."""
        return torch.sigmoid(self.cvr_logits(x))

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        name = self.task_names[i]
        if name == self.ctr_task:
            return []  # the CTR tower also computes pCTCVR: shared
        if name == self.ctcvr_task:
            return self._parameter_names_under("cvr_tower")
        return self._parameter_names_under(f"other_towers.{self.other_names.index(name)}")
