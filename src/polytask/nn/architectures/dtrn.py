"""Deep Task-specific Bottom Representation Network (DTRN).

Liu, Zhou, Jiang, Ge & Lian, "Deep Task-specific Bottom Representation Network for Multi-Task
Recommendation", CIKM 2023 (arXiv:2308.05996).

Instead of one shared bottom representation that every task reads (where negative transfer
happens), DTRN gives each task its own bottom representation, built by two modules on top of shared
feature embeddings:

* the Task-specific Interest Module (TIM): a *hypernetwork* reads a task embedding (and, in the
  paper, a behaviour-type embedding) and generates the LayerNorm gains and biases of a *conditional
  transformer* that encodes the user's behaviour sequence, so one set of transformer weights yields
  a task-specific interest representation (parameter-efficient);
* the Task-specific Representation Refinement Module (TRM): per task, a SENet-like network computes
  an importance weight for every feature embedding (and the interest representation) and rescales
  it; the refined embeddings are the task's bottom representation, fed to the task's branch of any
  multi-task network.

Confirmed (the paper's abstract, and the method summaries in the CIKM'23 reading notes of
秋枫学习笔记, mirrored on cloud.tencent.com and developer.volcengine.com): the two modules, the
hypernetwork inputs (task and behaviour-type embeddings), its outputs (the LayerNorm gain and bias of
the conditional transformer), and the TRM's MLP-from-embeddings weights multiplied into the
embeddings. The full text was not available to us.

Choices for this library's inputs and open details:

* Tables have no behaviour sequences, so the conditional transformer runs over the *feature fields*
  (one token per column, :class:`~polytask.nn.architectures.apem.FieldTokens`) as the one
  "sequence", and the hypernetwork reads the task embedding alone; the task's interest vector is the
  mean of the transformer's output tokens.
* Post-norm layers; gains are generated as ``1 + delta`` so a fresh network starts near an
  ordinary transformer; the hypernetwork is ``task_emb_dim -> 4 * emb_dim -> 4 * emb_dim * n_layers``
  (ReLU).
* TRM: Squeeze-and-Excitation over the ``F + 1`` tokens (fields and interest), i.e. mean-pooled
  tokens, a ``se_reduction`` bottleneck (ReLU), sigmoid weights, one per token.
* The task's branch is a tower (MLP ``(128, 64)``, ReLU) on the flattened refined tokens; the paper
  plugs the bottoms into an MTL network such as MMoE, which this module leaves to composition.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.architectures.apem import FieldSqueezeExcitation, FieldTokens
from polytask.nn.encoders import Hidden, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.tasks import Task

__all__ = ["DTRN", "ConditionalTransformerLayer"]


class ConditionalTransformerLayer(nn.Module):
    """A post-norm transformer encoder layer whose two LayerNorms take their gain and bias from the
    caller (a hypernetwork), per sample: ``x = LN(x + MHA(x)) * g1 + b1; x = LN(x + FFN(x)) * g2 + b2``."""

    def __init__(self, dim: int, n_heads: int, ffn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, n_heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)
        self.dim = dim

    def forward(self, x: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
        """``x (B, L, d)``; ``norms (B, 4, d)``: gain 1, bias 1, gain 2, bias 2."""
        g1, b1, g2, b2 = norms[:, 0:1], norms[:, 1:2], norms[:, 2:3], norms[:, 3:4]
        a = self.attn(x, x, x, need_weights=False)[0]
        x = F.layer_norm(x + self.drop(a), (self.dim,)) * g1 + b1
        return F.layer_norm(x + self.drop(self.ffn(x)), (self.dim,)) * g2 + b2


class _TaskBottom(nn.Module):
    """What one task owns below its tower: its embedding (the hypernetwork's input) and its TRM."""

    def __init__(self, task_emb_dim: int, n_tokens: int, se_reduction: int) -> None:
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(task_emb_dim) / math.sqrt(task_emb_dim))
        self.refine = FieldSqueezeExcitation(n_tokens, se_reduction)


@register_model(
    "dtrn",
    paper="Liu et al., 'Deep Task-specific Bottom Representation Network for Multi-Task Recommendation', CIKM 2023",
    description="task-specific bottoms: hypernetwork-conditioned transformer + per-task SENet refinement",
    emb_dim=16,
    n_layers=1,
    n_heads=2,
    task_emb_dim=16,
    se_reduction=2,
    tower_hidden="auto",
    dropout=0.0,
)
class DTRN(MultiTaskModel):
    """Shared field embeddings, hypernetwork and transformer weights; per task an embedding, a TRM
    and a tower.

    For each task the hypernetwork turns the task's embedding into the LayerNorm gains and biases of
    the shared transformer (TIM), whose pooled output over the field tokens is the task's interest
    token; the task's SENet (TRM) re-weights the field tokens and the interest token, and the
    flattened result feeds the task's tower. All tasks run in one batched pass. The shared
    representation is ``[field embeddings (N, F, emb_dim)]``.

    Args:
        emb_dim: token width ``d`` (divisible by ``n_heads``).
        n_layers: conditional transformer layers.
        n_heads: attention heads.
        task_emb_dim: width of the task embeddings the hypernetwork reads.
        se_reduction: bottleneck ratio of the TRM's SENet.
        tower_hidden: tower widths; ``"auto"``: ``(128, 64)``.
        dropout: dropout in the transformer and after each hidden layer of the towers.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        emb_dim: int = 16,
        n_layers: int = 1,
        n_heads: int = 2,
        task_emb_dim: int = 16,
        se_reduction: int = 2,
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, input_spec)
        if input_spec.kind != "tabular":
            raise ValueError(f"dtrn needs tabular input (feature fields), got {input_spec.kind} input")
        if n_heads < 1 or emb_dim % n_heads:
            raise ValueError(f"emb_dim ({emb_dim}) must be a positive multiple of n_heads ({n_heads})")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        if task_emb_dim < 1:
            raise ValueError(f"task_emb_dim must be positive, got {task_emb_dim}")
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(128, 64), image=())
        self.fields = FieldTokens(input_spec, emb_dim)
        n_tokens = self.fields.n_fields + 1  # the fields and the task's interest token
        self.layers = nn.ModuleList(
            ConditionalTransformerLayer(emb_dim, n_heads, 2 * emb_dim, dropout) for _ in range(n_layers)
        )
        self.hypernet = nn.Sequential(
            nn.Linear(task_emb_dim, 4 * emb_dim), nn.ReLU(), nn.Linear(4 * emb_dim, 4 * emb_dim * n_layers)
        )
        self.bottoms = nn.ModuleList(_TaskBottom(task_emb_dim, n_tokens, se_reduction) for _ in tasks)
        self.towers = nn.ModuleList(TaskHead(n_tokens * emb_dim, t, tower_h, dropout) for t in tasks)
        self.emb_dim, self.n_layers = emb_dim, n_layers

    def _norm_parameters(self) -> torch.Tensor:
        """``(T, n_layers, 4, d)`` LayerNorm gains and biases generated from the task embeddings."""
        e = torch.stack([b.embedding for b in self.bottoms])  # type: ignore[union-attr]
        p = self.hypernet(e).view(len(self.bottoms), self.n_layers, 4, self.emb_dim)
        gain_offset = p.new_tensor([1.0, 0.0, 1.0, 0.0]).view(1, 1, 4, 1)  # gains start near 1
        return p + gain_offset

    def bottom_representations(self, x: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The shared field embeddings ``(N, F, d)`` and each task's refined tokens ``(N, F + 1, d)``."""
        e = self.fields(x)
        n_tasks, (n, f, d) = len(self.tasks), e.shape
        norms = self._norm_parameters()
        # All tasks at once: the batch is repeated per task, each copy with its task's norms.
        z = e.unsqueeze(0).expand(n_tasks, n, f, d).reshape(n_tasks * n, f, d)
        for i, layer in enumerate(self.layers):
            layer_norms = norms[:, i].unsqueeze(1).expand(n_tasks, n, 4, d).reshape(n_tasks * n, 4, d)
            z = layer(z, layer_norms)
        interest = z.view(n_tasks, n, f, d).mean(2)  # (T, N, d)
        refined = [
            bottom.refine(torch.cat([e, interest[k].unsqueeze(1)], dim=1))  # type: ignore[operator]
            for k, bottom in enumerate(self.bottoms)
        ]
        return e, refined

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        e, refined = self.bottom_representations(x)
        preds = {t.name: tower(r.flatten(1)) for t, r, tower in zip(self.tasks, refined, self.towers, strict=True)}
        return preds, [e]

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        return self._parameter_names_under(f"bottoms.{i}", f"towers.{i}")

    def diagnostics(self) -> dict[str, Any]:
        """Each task's mean TRM weight per token (fields in input order, then the interest token),
        over eval-mode passes since :meth:`reset_diagnostics`."""
        stats = {t: b.refine.statistics() for t, b in zip(self.task_names, self.bottoms, strict=True)}  # type: ignore[union-attr]
        stats = {t: v for t, v in stats.items() if v is not None}
        return {"refinement_weight": stats} if stats else {}

    def reset_diagnostics(self) -> None:
        for b in self.bottoms:
            b.refine.reset_statistics()  # type: ignore[union-attr,operator]
