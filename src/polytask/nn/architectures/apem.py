"""Adaptive Pattern Extraction Multi-task (APEM) model.

Tao, Ha, Guo, Ma, Cheng & Lin, "Adaptive Pattern Extraction Multi-Task Learning for Multi-Step
Conversion Estimations", arXiv:2301.02494 (v1 and v3, January 2023; the v2 abstract of the same
record describes a different framework, TAFE).

Confirmed (the paper's abstract; the full text was not available to us): APEM learns the
interactions between the input feature fields and extracts task-specific information from them
with two parts, (1) a *DeepAuto Group Transformer* that enhances the feature representations "with a
modified set attention mechanism and a Squeeze-and-Excitation operation", and (2) an explicit
*Pattern Selector* that learns task-specific representations through "adaptive task-indicator
vectors".

Not confirmed, our reading of that description (choices):

* Every input column is a field token of width ``emb_dim``: an embedding for categorical columns
  and ``x_j w_j + b_j`` for numeric ones (as in AutoInt / FT-Transformer).
* Squeeze-and-Excitation over fields (SENet / FiBiNET): each token is squeezed to its mean, a
  two-layer bottleneck (ReLU, then sigmoid) gives one weight per field, the tokens are re-weighted;
  applied once, before the transformer.
* Group transformer: the fields are split into ``n_groups`` contiguous groups of near-equal size,
  and ``n_layers`` post-norm transformer encoder layers attend only *within* each group (a
  block-diagonal attention mask). Without positional encodings this is permutation-equivariant set
  self-attention (the SAB of Lee et al.'s Set Transformer); the paper's "modification" of set
  attention is unknown to us.
* Pattern Selector: task ``t`` owns a learned indicator vector ``e_t`` and a key map ``K_t``; its
  weight for field ``f`` is ``F * softmax_f(<K_t x_f, e_t> / sqrt(d))`` (mean weight 1), input-
  dependent through the tokens; the re-weighted tokens, flattened, feed task ``t``'s tower.
* Towers: MLP ``(128, 64)`` with ReLU, then the output layer.

:class:`FieldTokens` and :class:`FieldSqueezeExcitation` are reused by :mod:`.dtrn`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.tasks import Task

__all__ = ["APEM", "FieldSqueezeExcitation", "FieldTokens", "PatternSelector", "field_groups"]


class FieldTokens(nn.Module):
    """One ``dim``-wide token per input column: ``(N, n_fields, dim)``.

    Numeric column ``j`` (standardised) -> ``x_j * w_j + b_j``; categorical column ``j`` -> its
    embedding (id 0 = unknown, as :class:`TabularEmbedding`). Numeric fields come first.
    """

    def __init__(self, input_spec: InputSpec, dim: int) -> None:
        super().__init__()
        if input_spec.kind != "tabular":
            raise ValueError(f"field tokens need tabular input, got {input_spec.kind} input")
        if dim < 1:
            raise ValueError(f"emb_dim must be positive, got {dim}")
        self.n_numeric = int(input_spec.n_numeric)
        self.num_weight = nn.Parameter(torch.randn(self.n_numeric, dim) / math.sqrt(dim))
        self.num_bias = nn.Parameter(torch.zeros(self.n_numeric, dim))
        self.embeddings = nn.ModuleList(nn.Embedding(int(c), dim) for c in input_spec.cardinalities)
        self.n_fields = self.n_numeric + len(self.embeddings)
        if self.n_fields == 0:
            raise ValueError("a tabular input needs at least one numeric or categorical column")
        self.dim = dim

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.n_numeric:
            parts.append(x["num"].unsqueeze(-1) * self.num_weight + self.num_bias)
        if len(self.embeddings):
            cat = x["cat"]
            parts.append(torch.stack([emb(cat[:, j]) for j, emb in enumerate(self.embeddings)], dim=1))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class FieldSqueezeExcitation(nn.Module):
    """SENet over fields (Hu et al., CVPR 2018; Huang et al.'s FiBiNET, RecSys 2019): squeeze each
    token ``(N, F, d)`` to its mean, excite with ``sigmoid(W2 relu(W1 z))``, re-weight the tokens.

    In eval mode the field weights are summed into buffers (not saved) for diagnostics.
    """

    weight_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, n_fields: int, reduction: int = 2) -> None:
        super().__init__()
        if reduction < 1:
            raise ValueError(f"se_reduction must be >= 1, got {reduction}")
        hidden = max(1, n_fields // reduction)
        self.excite = nn.Sequential(nn.Linear(n_fields, hidden), nn.ReLU(), nn.Linear(hidden, n_fields), nn.Sigmoid())
        self.register_buffer("weight_sum", torch.zeros(n_fields), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    def field_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` weights in (0, 1)."""
        return self.excite(tokens.mean(-1))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.field_weights(tokens)
        if not self.training:
            with torch.no_grad():
                self.weight_sum += w.detach().sum(0).to(self.weight_sum.dtype)
                self.count += w.shape[0]
        return tokens * w.unsqueeze(-1)

    def statistics(self) -> list[float] | None:
        n = int(self.count)
        return None if n == 0 else (self.weight_sum.double() / n).tolist()

    def reset_statistics(self) -> None:
        self.weight_sum.zero_()
        self.count.zero_()


class PatternSelector(nn.Module):
    """Task-indicator attention over field tokens: ``w_f = F * softmax_f(<K x_f, e> / sqrt(d))``.

    Returns the re-weighted tokens ``(N, F, d)``; eval-mode passes accumulate the mean weights.
    """

    weight_sum: torch.Tensor
    count: torch.Tensor

    def __init__(self, n_fields: int, dim: int) -> None:
        super().__init__()
        self.indicator = nn.Parameter(torch.randn(dim) / math.sqrt(dim))
        self.key = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(dim)
        self.register_buffer("weight_sum", torch.zeros(n_fields), persistent=False)
        self.register_buffer("count", torch.zeros((), dtype=torch.long), persistent=False)

    def field_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(N, F)`` weights with mean 1 per row."""
        scores = (self.key(tokens) * self.indicator).sum(-1) * self.scale
        return torch.softmax(scores, dim=-1) * tokens.shape[1]

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        w = self.field_weights(tokens)
        if not self.training:
            with torch.no_grad():
                self.weight_sum += w.detach().sum(0).to(self.weight_sum.dtype)
                self.count += w.shape[0]
        return tokens * w.unsqueeze(-1)

    def statistics(self) -> list[float] | None:
        n = int(self.count)
        return None if n == 0 else (self.weight_sum.double() / n).tolist()

    def reset_statistics(self) -> None:
        self.weight_sum.zero_()
        self.count.zero_()


def field_groups(n_fields: int, n_groups: int) -> list[list[int]]:
    """``min(n_groups, n_fields)`` contiguous groups of field indices, sizes differing by at most one."""
    if n_groups < 1:
        raise ValueError(f"n_groups must be >= 1, got {n_groups}")
    return [g.tolist() for g in np.array_split(np.arange(n_fields), min(n_groups, n_fields))]


@register_model(
    "apem",
    paper=(
        "Tao et al., 'Adaptive Pattern Extraction Multi-Task Learning for Multi-Step Conversion Estimations', "
        "arXiv:2301.02494, 2023"
    ),
    description="field tokens, SE re-weighting and a group-wise transformer; task-indicator vectors select fields",
    emb_dim=16,
    n_groups=4,
    n_layers=2,
    n_heads=2,
    se_reduction=2,
    tower_hidden="auto",
    dropout=0.0,
)
class APEM(MultiTaskModel):
    """Shared field tokens -> SE -> group transformer; per task a :class:`PatternSelector` and a tower.

    Task ``t`` owns its selector (indicator vector and key map) and its tower; the tokens, the SE
    block and the transformer are shared. The shared representation is ``[transformer output
    (N, F, emb_dim)]``, the tokens every selector reads.

    Args:
        emb_dim: token width ``d`` (divisible by ``n_heads``).
        n_groups: field groups attended within (at most one per field; 1 = full self-attention).
        n_layers: transformer encoder layers.
        n_heads: attention heads.
        se_reduction: bottleneck ratio of the Squeeze-and-Excitation block.
        tower_hidden: tower widths; ``"auto"``: ``(128, 64)``.
        dropout: dropout in the transformer and after each hidden layer of the towers.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        emb_dim: int = 16,
        n_groups: int = 4,
        n_layers: int = 2,
        n_heads: int = 2,
        se_reduction: int = 2,
        tower_hidden: Hidden = "auto",
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, input_spec)
        if input_spec.kind != "tabular":
            raise ValueError(f"apem needs tabular input (feature fields), got {input_spec.kind} input")
        if n_heads < 1 or emb_dim % n_heads:
            raise ValueError(f"emb_dim ({emb_dim}) must be a positive multiple of n_heads ({n_heads})")
        if n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {n_layers}")
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(128, 64), image=())
        self.fields = FieldTokens(input_spec, emb_dim)
        n_fields = self.fields.n_fields
        self.groups = field_groups(n_fields, n_groups)
        self.se = FieldSqueezeExcitation(n_fields, se_reduction)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(emb_dim, n_heads, 2 * emb_dim, dropout, batch_first=True)
            for _ in range(n_layers)
        )
        group_of = torch.zeros(n_fields, dtype=torch.long)
        for g, members in enumerate(self.groups):
            group_of[members] = g
        # True = may not attend: attention stays inside each group.
        self.register_buffer("attn_mask", group_of[:, None] != group_of[None, :], persistent=False)
        self.selectors = nn.ModuleList(PatternSelector(n_fields, emb_dim) for _ in tasks)
        self.towers = nn.ModuleList(TaskHead(n_fields * emb_dim, t, tower_h, dropout) for t in tasks)

    def patterns(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The shared field patterns ``(N, F, emb_dim)``: tokens after SE and the group transformer."""
        z = self.se(self.fields(x))
        for layer in self.layers:
            z = layer(z, src_mask=self.attn_mask)
        return z

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        z = self.patterns(x)
        preds = {
            t.name: tower(selector(z).flatten(1))
            for t, selector, tower in zip(self.tasks, self.selectors, self.towers, strict=True)
        }
        return preds, [z]

    def selection_weights(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Each task's field weights ``(N, F)`` (mean 1 per row)."""
        z = self.patterns(x)
        return {t.name: s.field_weights(z) for t, s in zip(self.tasks, self.selectors, strict=True)}

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        return self._parameter_names_under(f"selectors.{i}", f"towers.{i}")

    def diagnostics(self) -> dict[str, Any]:
        """Over eval-mode passes since :meth:`reset_diagnostics`: the mean SE weight per field
        (``field_se_weight``) and each task's mean selector weight per field (``pattern_selection``,
        fields in input order: numeric, then categorical)."""
        out: dict[str, Any] = {}
        se = self.se.statistics()
        if se is not None:
            out["field_se_weight"] = se
        sel = {t: s.statistics() for t, s in zip(self.task_names, self.selectors, strict=True)}
        sel = {t: v for t, v in sel.items() if v is not None}
        if sel:
            out["pattern_selection"] = sel
        return out

    def reset_diagnostics(self) -> None:
        self.se.reset_statistics()
        for s in self.selectors:
            s.reset_statistics()  # type: ignore[operator]
