"""MultiTab-Net: a multi-task transformer for tables with multi-task masked attention.

Sinodinos, Wei & Armanfard, "MultiTab: A Scalable Foundation for Multitask Learning on Tabular
Data", AAAI 2026 (arXiv:2511.09970; code Armanfard-Lab/MultiTab). Every input column becomes a
token (numeric column ``j``: ``x_j * w_j + b_j`` followed by LayerNorm; categorical column: an
embedding), every task gets one learnable token, and pre-norm transformer encoder blocks run over
the ``d + t`` tokens. The *multi-task mask* stops task tokens from attending to each other, so each
task reads the shared feature tokens through its own token only (less task competition); each
task's head reads its final task token.

``features_see_tasks`` chooses whether feature tokens may attend to task tokens. ``False`` (the
default) makes the feature stream independent of the task tokens, so that a task's output depends
on no other task's token at any depth; ``True`` lets features read task tokens as in the paper's
unmasked feature rows, in which case tasks still never attend to each other directly but can
influence each other through the features from the second block on. The paper's inter-sample
attention (attention across the rows of a batch, from SAINT) is not implemented: it would make a
row's prediction depend on the other rows of its batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.tasks import Task

__all__ = ["MultiTabNet", "multitask_attention_mask"]


def multitask_attention_mask(n_features: int, n_tasks: int, features_see_tasks: bool = False) -> torch.Tensor:
    """Boolean ``(d + t, d + t)`` mask, ``True`` where query row ``i`` may NOT attend to key column ``j``.

    Tokens are ordered features first, then tasks. Task tokens see every feature and themselves,
    never another task; feature tokens see every feature (and every task if ``features_see_tasks``).
    """
    n = n_features + n_tasks
    blocked = torch.zeros(n, n, dtype=torch.bool)
    blocked[n_features:, n_features:] = ~torch.eye(n_tasks, dtype=torch.bool)
    if not features_see_tasks:
        blocked[:n_features, n_features:] = True
    return blocked


class _FeatureTokens(nn.Module):
    """Numeric column ``j`` -> ``LayerNorm(x_j w_j + b_j)``; categorical column -> its embedding."""

    def __init__(self, n_numeric: int, cardinalities: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.n_numeric = n_numeric
        self.weight = nn.Parameter(torch.randn(n_numeric, dim) * dim**-0.5)
        self.bias = nn.Parameter(torch.zeros(n_numeric, dim))
        self.norm = nn.LayerNorm(dim)
        self.embeddings = nn.ModuleList(nn.Embedding(c, dim) for c in cardinalities)
        self.n_tokens = n_numeric + len(cardinalities)
        if self.n_tokens == 0:
            raise ValueError("MultiTab-Net needs at least one numeric or categorical column")

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        parts = []
        if self.n_numeric:
            parts.append(self.norm(x["num"][:, :, None] * self.weight + self.bias))
        if len(self.embeddings):
            cat = x["cat"]
            parts.append(torch.stack([emb(cat[:, j]) for j, emb in enumerate(self.embeddings)], dim=1))
        return torch.cat(parts, dim=1)


class _Block(nn.Module):
    """Pre-norm encoder block: ``x + MHA(LN(x), mask)``, then ``x + FFN(LN(x))``.

    With ``n_features`` given (features do not see tasks), attention is computed without the
    ``(d + t)^2`` score matrix: features attend among themselves, each task token to the features
    and itself. That is the same function as the masked attention (tested), at ``d^2 + t (d + 1)``
    scores instead of ``(d + t)^2``, which matters for tables with hundreds of tasks.
    """

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.drop = nn.Dropout(dropout)

    def _split_attention(self, h: torch.Tensor, d: int) -> torch.Tensor:
        a = self.attn
        n, length, dim = h.shape
        heads = a.num_heads
        q, k, v = F.linear(h, a.in_proj_weight, a.in_proj_bias).chunk(3, dim=-1)
        q, k, v = (z.reshape(n, length, heads, dim // heads).transpose(1, 2) for z in (q, k, v))  # (N, H, L, e)
        scale = (dim // heads) ** -0.5
        p = a.dropout if self.training else 0.0
        feats = F.scaled_dot_product_attention(q[:, :, :d], k[:, :, :d], v[:, :, :d], dropout_p=p)
        qt, kt, vt = q[:, :, d:], k[:, :, d:], v[:, :, d:]
        scores = torch.cat([qt @ k[:, :, :d].transpose(-1, -2), (qt * kt).sum(-1, keepdim=True)], dim=-1) * scale
        w = F.dropout(torch.softmax(scores, dim=-1), p=p, training=self.training)
        tasks = w[..., :d] @ v[:, :, :d] + w[..., d:] * vt
        out = torch.cat([feats, tasks], dim=2).transpose(1, 2).reshape(n, length, dim)
        return a.out_proj(out)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, n_features: int | None = None) -> torch.Tensor:
        h = self.norm1(x)
        if n_features is None:
            att = self.attn(h, h, h, attn_mask=mask, need_weights=False)[0]
        else:
            att = self._split_attention(h, n_features)
        x = x + self.drop(att)
        return x + self.drop(self.ffn(self.norm2(x)))


@register_model(
    "multitab",
    paper=(
        "Sinodinos, Wei & Armanfard, 'MultiTab: A Scalable Foundation for Multitask Learning on Tabular Data', "
        "AAAI 2026"
    ),
    description="feature tokens + one token per task, transformer with multi-task masked attention",
    dim=32,
    n_blocks=2,
    n_heads=4,
    ffn_dim=64,
    dropout=0.0,
    tower_hidden=(),
    features_see_tasks=False,
)
class MultiTabNet(MultiTaskModel):
    """Feature and task tokens through masked transformer blocks; a :class:`TaskHead` per task token.

    Task ``k``'s token and head are its task-specific parameters; token embeddings, attention and
    feed-forward weights are shared. The shared representation is ``[feature tokens entering the last
    block (N, d, dim)]``, the last shared state the task tokens read (they also read the feature
    tokens of earlier blocks, which are not in it).

    Args:
        dim: token width; n_blocks: encoder blocks; n_heads: attention heads (must divide ``dim``);
        ffn_dim: hidden width of the feed-forward layers; dropout: in attention and feed-forward;
        tower_hidden: hidden widths of each task's head on its token; features_see_tasks: see the
        module docstring.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        dim: int = 32,
        n_blocks: int = 2,
        n_heads: int = 4,
        ffn_dim: int = 64,
        dropout: float = 0.0,
        tower_hidden: Hidden = (),
        features_see_tasks: bool = False,
    ) -> None:
        super().__init__(tasks, input_spec)
        if input_spec.kind != "tabular":
            raise ValueError(f"MultiTab-Net is a model for tables; this data's input kind is '{input_spec.kind}'")
        if dim < 1 or n_blocks < 1 or n_heads < 1 or ffn_dim < 1:
            raise ValueError(
                f"dim, n_blocks, n_heads and ffn_dim must be >= 1, got {dim}, {n_blocks}, {n_heads}, {ffn_dim}"
            )
        if dim % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide dim ({dim})")
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(), image=())
        self.features = _FeatureTokens(input_spec.n_numeric, input_spec.cardinalities, dim)
        self.task_tokens = nn.ParameterList(nn.Parameter(torch.randn(dim) * 0.02) for _ in tasks)
        self.blocks = nn.ModuleList(_Block(dim, n_heads, ffn_dim, dropout) for _ in range(n_blocks))
        self.norm = nn.LayerNorm(dim)
        self.heads = nn.ModuleList(TaskHead(dim, t, tower_h, dropout) for t in tasks)
        self.n_features = self.features.n_tokens
        self.features_see_tasks = bool(features_see_tasks)
        self.use_masked_attention = False  # True: run nn.MultiheadAttention with the mask (a reference path)
        self.register_buffer(
            "mask", multitask_attention_mask(self.n_features, len(tasks), features_see_tasks), persistent=False
        )

    def tokens(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """Input tokens ``(N, d + t, dim)``: feature tokens, then the task tokens."""
        f = self.features(x)
        t = torch.stack(list(self.task_tokens)).unsqueeze(0).expand(f.shape[0], -1, -1)
        return torch.cat([f, t], dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """The transformer over given input tokens (lets tests perturb one task token)."""
        return self._encode(tokens)[0]

    def _encode(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = tokens
        d = self.n_features
        split = None if self.features_see_tasks or self.use_masked_attention else d
        for block in self.blocks[:-1]:
            h = block(h, self.mask, split)
        # Re-join the feature tokens so that this very tensor (the representation) feeds the last block.
        features = h[:, :d]
        h = self.blocks[-1](torch.cat([features, h[:, d:]], dim=1), self.mask, split)
        return self.norm(h), features

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        h, features = self._encode(self.tokens(x))
        d = self.n_features
        preds = {t.name: head(h[:, d + k]) for k, (t, head) in enumerate(zip(self.tasks, self.heads, strict=True))}
        return preds, [features]

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        return [f"task_tokens.{i}", *self._parameter_names_under(f"heads.{i}")]
