"""Encoders: the input stems and the trunks/experts that architectures are assembled from.

Conventions shared by every architecture:

- the *stem* (:func:`make_stem`) turns the input dict into one tensor: the concatenated numeric
  features and embeddings for tables (``(N, D)``), the image itself for images (``(N, C, H, W)``);
- an *expert* or trunk (:func:`make_expert`) reads the stem output and returns ``(N, d)`` features;
- gates read :func:`gate_input` of the stem output, i.e. the flattened stem output (for images: the
  flattened pixels), of width ``stem.out_dim``.

Hyper-parameters that reasonably differ between tables and images accept ``"auto"``;
:func:`resolve_hidden` turns it into the per-input-kind value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec

__all__ = [
    "MLP",
    "Chain",
    "Hidden",
    "ImageInput",
    "LeNetTrunk",
    "TabularEmbedding",
    "auto_embedding_dim",
    "gate_input",
    "make_expert",
    "make_stem",
    "resolve_hidden",
]

Hidden = Sequence[int] | int | Literal["auto"]

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


def auto_embedding_dim(cardinality: int, max_dim: int = 16) -> int:
    """Embedding width for a categorical column with ``cardinality`` ids.

    The fastai rule of thumb (``emb_sz_rule`` in ``fastai.tabular.model``; Howard & Gugger,
    "Fastai: A Layered API for Deep Learning", Information 2020): ``round(1.6 * card ** 0.56)``,
    here capped at 16 instead of fastai's 600 because our tables are small and our columns few-valued.
    """
    return max(1, min(max_dim, round(1.6 * cardinality**0.56)))


def resolve_hidden(
    value: Hidden, input_spec: InputSpec, *, tabular: Sequence[int], image: Sequence[int]
) -> tuple[int, ...]:
    """``"auto"`` -> the per-input-kind default; an int -> one layer; a sequence -> a tuple of widths."""
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"hidden sizes must be 'auto', an int or a sequence of ints, got '{value}'")
        value = tabular if input_spec.vector_stem else image
    if isinstance(value, int):
        value = (value,)
    try:
        out = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"hidden sizes must be 'auto', an int or a sequence of ints, got {value!r}") from None
    if any(v < 1 for v in out):
        raise ValueError(f"hidden sizes must be positive, got {out}")
    return out


class TabularEmbedding(nn.Module):
    """Numeric features concatenated with one embedding per categorical column.

    Reads ``x["num"]`` (float ``(N, n_numeric)``, expected standardised) and ``x["cat"]`` (long
    ``(N, len(cardinalities))``, id 0 = unknown bucket); returns ``(N, out_dim)``.

    Args:
        n_numeric: number of numeric columns.
        cardinalities: ids per categorical column, the unknown bucket included.
        emb_dim: ``"auto"`` (:func:`auto_embedding_dim` per column), one int for all columns, or one
            int per column.
    """

    def __init__(
        self, n_numeric: int, cardinalities: Sequence[int], emb_dim: int | Sequence[int] | Literal["auto"] = "auto"
    ) -> None:
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if any(c < 1 for c in cards):
            raise ValueError(f"cardinalities must be >= 1 (id 0 is the unknown bucket), got {cards}")
        if isinstance(emb_dim, str):
            if emb_dim != "auto":
                raise ValueError(f"emb_dim must be 'auto', an int or one int per column, got '{emb_dim}'")
            dims = [auto_embedding_dim(c) for c in cards]
        elif isinstance(emb_dim, int):
            dims = [emb_dim] * len(cards)
        else:
            dims = [int(d) for d in emb_dim]
            if len(dims) != len(cards):
                raise ValueError(f"emb_dim has {len(dims)} entries for {len(cards)} categorical columns")
        if any(d < 1 for d in dims):
            raise ValueError(f"embedding sizes must be positive, got {dims}")
        self.n_numeric = int(n_numeric)
        self.embeddings = nn.ModuleList(nn.Embedding(c, d) for c, d in zip(cards, dims, strict=True))
        self.out_dim = self.n_numeric + sum(dims)
        if self.out_dim == 0:
            raise ValueError("a tabular input needs at least one numeric or categorical column")

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        parts = [x["num"]] if self.n_numeric else []
        if len(self.embeddings):
            cat = x["cat"]
            parts += [emb(cat[:, j]) for j, emb in enumerate(self.embeddings)]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class ImageInput(nn.Module):
    """The image stem: returns ``x["image"]`` unchanged; ``out_dim`` is the flattened pixel count
    (the width of :func:`gate_input`)."""

    def __init__(self, channels: int, height: int, width: int) -> None:
        super().__init__()
        if min(channels, height, width) < 1:
            raise ValueError(f"image shape must be positive, got {(channels, height, width)}")
        self.shape = (channels, height, width)
        self.out_dim = channels * height * width

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return x["image"]


class MLP(nn.Module):
    """``Linear -> [BatchNorm] -> activation -> [Dropout]`` per hidden width.

    ``hidden=()`` is the identity (``out_dim == in_dim``); otherwise ``out_dim == hidden[-1]``.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: Sequence[int] = (),
        dropout: float = 0.0,
        activation: str = "relu",
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; valid: {', '.join(sorted(_ACTIVATIONS))}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(_ACTIVATIONS[activation]())
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            d = h
        self.layers = nn.Sequential(*layers)
        self.in_dim = in_dim
        self.out_dim = d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LeNetTrunk(nn.Module):
    """The shared LeNet of Multi-MNIST (Sener & Koltun, NeurIPS 2018; Lin et al., NeurIPS 2019).

    ``conv(C->10, k=9) -> maxpool 2 -> relu -> conv(10->20, k=5) -> maxpool 2 -> relu -> flatten
    -> fc(->50) -> relu``. The flattened width follows from the input size: 20*3*3 = 180 for 28x28,
    20*5*5 = 500 for Pareto-MTL's 36x36 images.
    """

    def __init__(self, channels: int = 1, height: int = 28, width: int = 28, out_dim: int = 50) -> None:
        super().__init__()
        h, w = _lenet_spatial(height), _lenet_spatial(width)
        if h < 1 or w < 1:
            raise ValueError(f"LeNetTrunk needs images of at least 20x20 pixels, got {height}x{width}")
        self.conv1 = nn.Conv2d(channels, 10, kernel_size=9)
        self.conv2 = nn.Conv2d(10, 20, kernel_size=5)
        self.fc = nn.Linear(20 * h * w, out_dim)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.max_pool2d(self.conv1(x), 2))
        x = F.relu(F.max_pool2d(self.conv2(x), 2))
        return F.relu(self.fc(x.flatten(1)))


def _lenet_spatial(size: int) -> int:
    # conv k=9 (no padding) -> pool 2 (floor) -> conv k=5 -> pool 2
    return ((size - 8) // 2 - 4) // 2


class Chain(nn.Sequential):
    """``nn.Sequential`` whose ``out_dim`` is its last module's."""

    @property
    def out_dim(self) -> int:
        return self[-1].out_dim  # type: ignore[return-value]


def make_stem(input_spec: InputSpec, emb_dim: int | Sequence[int] | Literal["auto"] = "auto") -> nn.Module:
    """The input stem for ``input_spec`` (it has ``out_dim``, the width of :func:`gate_input`).

    Text: the pretrained encoder of ``input_spec.encoder``, mean-pooled (:class:`polytask.nn.text.TextStem`),
    so the architectures treat text like a table after the stem."""
    if input_spec.kind == "tabular":
        return TabularEmbedding(input_spec.n_numeric, input_spec.cardinalities, emb_dim)
    if input_spec.kind == "text":
        from polytask.nn.text import TextStem  # text.py builds on this module

        return TextStem(input_spec.encoder or None)
    return ImageInput(input_spec.channels, input_spec.height, input_spec.width)


def make_expert(
    input_spec: InputSpec, stem_out_dim: int, hidden: Sequence[int], dropout: float = 0.0
) -> MLP | LeNetTrunk | Chain:
    """An expert (or trunk) that reads the stem output and returns ``(N, out_dim)`` features.

    Tables and text: ``MLP(stem_out_dim, hidden)``. Images: a :class:`LeNetTrunk` on the image, followed by
    ``MLP(50, hidden)`` when ``hidden`` is non-empty (``stem_out_dim`` is not used).
    """
    if input_spec.vector_stem:
        return MLP(stem_out_dim, hidden, dropout)
    trunk = LeNetTrunk(input_spec.channels, input_spec.height, input_spec.width)
    if not hidden:
        return trunk
    return Chain(trunk, MLP(trunk.out_dim, hidden, dropout))


def gate_input(x_stem: torch.Tensor) -> torch.Tensor:
    """What gates read: the stem output flattened to ``(N, stem.out_dim)``."""
    return x_stem.flatten(1)
