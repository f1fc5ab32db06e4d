"""Slimmable layers: one set of weights that runs at several channel widths.

Yu, Yang, Xu, Yang & Huang, "Slimmable Neural Networks", ICLR 2019. A layer of ``n`` channels run
at width ratio ``r`` uses only its first :func:`active_width` ``(n, r)`` channels, so every narrower
network is a prefix of the wider ones and all widths share their weights. Batch normalisation is
the exception: the statistics of a channel depend on how many channels feed it, so
:class:`SwitchableBatchNorm` keeps one private batch-norm per width ratio (the paper's "switchable
batch normalisation").

Each layer holds its current ratio(s) as plain attributes (``in_ratio``/``out_ratio``, ``ratio``)
that the owning model sets before a forward pass; the counting methods take the ratios as
arguments instead, so a cost can be asked for without touching the state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SlimmableConv2d", "SlimmableLinear", "SwitchableBatchNorm", "active_width", "check_ratios"]


def active_width(n: int, ratio: float) -> int:
    """Channels in use when a layer of ``n`` channels runs at ``ratio``: ``round(ratio * n)``
    (halves rounded up), at least one and at most ``n``."""
    return max(1, min(n, math.floor(ratio * n + 0.5)))


def check_ratios(ratios: Sequence[float]) -> tuple[float, ...]:
    """Sorted distinct width ratios, each in (0, 1], the full width 1.0 among them."""
    try:
        out = tuple(sorted({float(r) for r in ratios}))
    except (TypeError, ValueError):
        raise ValueError(f"widths must be a sequence of ratios in (0, 1] including 1.0, got {ratios!r}") from None
    if not out or out[0] <= 0 or out[-1] != 1.0:
        raise ValueError(f"widths must be ratios in (0, 1] including 1.0, got {list(ratios)}")
    return out


class SlimmableLinear(nn.Module):
    """``nn.Linear`` whose active part is the first ``out`` rows and first ``in`` columns of the weight.

    Args:
        in_features, out_features: the full widths.
        bias: learn an additive bias.
        slim_in, slim_out: whether the input/output side follows its ratio (a task's output layer
            keeps all its outputs; a layer reading an unslimmed input keeps all its inputs).
        in_unit: input features per input channel, for a linear layer reading flattened
            ``(C, H, W)`` feature maps: ``in_unit = H * W`` and the active inputs are the first
            ``active_width(C, r) * H * W``, i.e. exactly the active channels' pixels.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        slim_in: bool = True,
        slim_out: bool = True,
        in_unit: int = 1,
    ) -> None:
        super().__init__()
        if in_unit < 1 or in_features % in_unit:
            raise ValueError(f"in_features ({in_features}) must be a positive multiple of in_unit ({in_unit})")
        self.in_features, self.out_features, self.in_unit = in_features, out_features, in_unit
        self.slim_in, self.slim_out = slim_in, slim_out
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.in_ratio = 1.0
        self.out_ratio = 1.0
        # nn.Linear's initialisation, at the full fan-in
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def active(self, in_ratio: float | None = None, out_ratio: float | None = None) -> tuple[int, int]:
        """(active inputs, active outputs) at the given ratios (default: the current ones)."""
        ri = self.in_ratio if in_ratio is None else in_ratio
        ro = self.out_ratio if out_ratio is None else out_ratio
        n_in = active_width(self.in_features // self.in_unit, ri) * self.in_unit if self.slim_in else self.in_features
        n_out = active_width(self.out_features, ro) if self.slim_out else self.out_features
        return n_in, n_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = self.active()
        if x.shape[-1] != n_in:
            raise ValueError(
                f"SlimmableLinear expects {n_in} input features at ratio {self.in_ratio}, got {x.shape[-1]}"
            )
        bias = self.bias[:n_out] if self.bias is not None else None
        return F.linear(x, self.weight[:n_out, :n_in], bias)

    def macs(self, in_ratio: float, out_ratio: float) -> int:
        """Multiply-adds per sample at the given ratios."""
        n_in, n_out = self.active(in_ratio, out_ratio)
        return n_in * n_out

    def n_parameters(self, in_ratio: float, out_ratio: float) -> int:
        """Weights and biases in use at the given ratios."""
        n_in, n_out = self.active(in_ratio, out_ratio)
        return n_in * n_out + (n_out if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class SlimmableConv2d(nn.Module):
    """``nn.Conv2d`` (groups 1) whose active kernel is the first ``out`` filters over the first ``in``
    input channels.

    Args:
        in_channels, out_channels, kernel_size, stride, padding: as for ``nn.Conv2d``.
        slim_in: whether the input side follows ``in_ratio`` (``False`` for a layer reading the image).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        bias: bool = True,
        *,
        slim_in: bool = True,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.slim_in = slim_in
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.in_ratio = 1.0
        self.out_ratio = 1.0
        # nn.Conv2d's initialisation, at the full fan-in
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(in_channels * kernel_size * kernel_size)
            nn.init.uniform_(self.bias, -bound, bound)

    def active(self, in_ratio: float | None = None, out_ratio: float | None = None) -> tuple[int, int]:
        """(active input channels, active filters) at the given ratios (default: the current ones)."""
        ri = self.in_ratio if in_ratio is None else in_ratio
        ro = self.out_ratio if out_ratio is None else out_ratio
        n_in = active_width(self.in_channels, ri) if self.slim_in else self.in_channels
        return n_in, active_width(self.out_channels, ro)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the output for an input of ``height x width``."""

        def one(s: int) -> int:
            return (s + 2 * self.padding - self.kernel_size) // self.stride + 1

        return one(height), one(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n_in, n_out = self.active()
        if x.shape[1] != n_in:
            raise ValueError(
                f"SlimmableConv2d expects {n_in} input channels at ratio {self.in_ratio}, got {x.shape[1]}"
            )
        bias = self.bias[:n_out] if self.bias is not None else None
        return F.conv2d(x, self.weight[:n_out, :n_in], bias, self.stride, self.padding)

    def macs(self, in_ratio: float, out_ratio: float, height: int, width: int) -> int:
        """Multiply-adds per sample for an input of ``height x width`` at the given ratios."""
        n_in, n_out = self.active(in_ratio, out_ratio)
        oh, ow = self.output_size(height, width)
        return n_out * oh * ow * n_in * self.kernel_size * self.kernel_size

    def n_parameters(self, in_ratio: float, out_ratio: float) -> int:
        """Weights and biases in use at the given ratios."""
        n_in, n_out = self.active(in_ratio, out_ratio)
        return n_out * n_in * self.kernel_size**2 + (n_out if self.bias is not None else 0)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )


class SwitchableBatchNorm(nn.Module):
    """One private ``BatchNorm1d``/``BatchNorm2d`` per width ratio, over that ratio's active channels.

    Sharing one batch-norm across widths would mix the statistics of differently wide inputs; the
    per-width copies cost ``4 * channels`` numbers each (Yu et al., ICLR 2019, sec. 3.2).

    Args:
        num_features: channels at full width.
        ratios: the width ratios the layer may run at.
        dim: 1 for ``(N, C)`` inputs, 2 for ``(N, C, H, W)``.
    """

    def __init__(self, num_features: int, ratios: Sequence[float], dim: int = 2) -> None:
        super().__init__()
        if dim not in (1, 2):
            raise ValueError(f"dim must be 1 or 2, got {dim}")
        self.ratios = check_ratios(ratios)
        self.num_features = num_features
        bn = nn.BatchNorm1d if dim == 1 else nn.BatchNorm2d
        self.bns = nn.ModuleList(bn(active_width(num_features, r)) for r in self.ratios)
        self.ratio = self.ratios[-1]

    def _index(self, ratio: float) -> int:
        try:
            return self.ratios.index(ratio)
        except ValueError:
            valid = ", ".join(f"{r:g}" for r in self.ratios)
            raise ValueError(f"width {ratio!r} is not allowed; valid: {valid}") from None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self._index(self.ratio)](x)

    def n_parameters(self, ratio: float) -> int:
        """Affine parameters of the batch-norm used at ``ratio`` (statistics are buffers)."""
        return sum(p.numel() for p in self.bns[self._index(ratio)].parameters())
