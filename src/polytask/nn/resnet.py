"""A small residual network for MNIST-sized images (the shared trunk of the vision architectures).

He, Zhang, Ren & Sun, "Deep Residual Learning for Image Recognition", CVPR 2016. The layout is the
paper's CIFAR-10 network (Section 4.2): a 3x3 convolution with ``widths[0]`` filters, then one stage
per width of basic blocks (two 3x3 convolutions with batch normalisation, ``y = relu(F(x) + x)``), the
first block of every stage after the first subsampling by a stride-2 convolution, and global average
pooling at the end (here: to a small grid, see below). The paper's CIFAR net is
``widths=(16, 32, 64)`` with ``n`` blocks per stage (6n+2 weighted layers; ResNet-20 is n=3).

Choices the paper leaves open or that differ from its CIFAR setting, made here:

* Shortcuts that change shape are projections (1x1 convolution with the block's stride, then batch
  norm: the paper's option B) rather than CIFAR's option A (identity with zero-padded channels),
  because a projection is the plain module form and costs few parameters at these widths.
* Convolutions followed by batch norm have no bias (the norm's shift replaces it).
* Default depth is 2 blocks per stage (ResNet-14): 28x28 inputs need less depth than CIFAR, and
  these models run on CPUs.
* Stage ``j`` > 1 halves the map with ``ceil`` rounding (stride 2, padding 1): 28 -> 14 -> 7.
* The last map is average-pooled to a ``pool_size`` x ``pool_size`` grid and flattened (default 2;
  ``pool_size=1`` is the paper's global average pooling). The Multi-MNIST tasks are positional (the
  top-left vs the bottom-right item), which a global average can only recover through padding
  effects: in one run on 512 Multi-MNIST images a (8, 16, 32) trunk reached a summed training loss
  of 2.3 after 20 AdamW steps with a 2x2 grid against 3.5 with global pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec

__all__ = ["BasicBlock", "ResNetTrunk", "require_image", "resolve_blocks", "resolve_widths"]


def require_image(name: str, input_spec: InputSpec) -> None:
    """One-line error for architectures that only read images."""
    if input_spec.kind != "image":
        raise ValueError(f"{name} needs image inputs, got a {input_spec.kind} input spec")


def resolve_widths(widths: Sequence[int] | int) -> tuple[int, ...]:
    """One int or a non-empty sequence of positive ints -> a tuple of stage widths."""
    if isinstance(widths, int):
        widths = (widths,)
    try:
        out = tuple(int(w) for w in widths)
    except (TypeError, ValueError):
        raise ValueError(f"widths must be a sequence of positive ints, got {widths!r}") from None
    if not out or any(w < 1 for w in out):
        raise ValueError(f"widths must be a non-empty sequence of positive ints, got {out}")
    return out


def resolve_blocks(blocks_per_stage: Sequence[int] | int, n_stages: int) -> tuple[int, ...]:
    """One int for every stage, or one int per stage; each >= 1."""
    if isinstance(blocks_per_stage, int):
        blocks = (blocks_per_stage,) * n_stages
    else:
        blocks = tuple(int(b) for b in blocks_per_stage)
        if len(blocks) != n_stages:
            raise ValueError(f"blocks_per_stage has {len(blocks)} entries for {n_stages} stages")
    if any(b < 1 for b in blocks):
        raise ValueError(f"blocks_per_stage must be >= 1, got {blocks}")
    return blocks


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))`` (He et al., Fig. 2).

    ``shortcut`` is the identity when shapes agree, else a 1x1 convolution with ``stride`` and batch
    norm (option B). :meth:`forward_with_hidden` also returns the block's inner activation (after the
    first convolution), the "intermediate" features MTAN's attention modules read.
    """

    def __init__(self, c_in: int, c_out: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward_with_hidden(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(hidden)) + self.shortcut(x)), hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_hidden(x)[0]


class ResNetTrunk(nn.Module):
    """Stem ``conv3x3 -> BN -> ReLU``, one stage of basic blocks per width, average pooling to a grid.

    ``forward`` returns ``(N, widths[-1] * pool_size**2)`` (``out_dim``); :meth:`forward_stages`
    returns every stage's feature map, whose shapes are ``stage_shapes`` (channels, height, width).

    Args:
        channels, height, width: the input image shape.
        widths: filters per stage (He et al.'s CIFAR net: ``(16, 32, 64)``).
        blocks_per_stage: basic blocks per stage, one int or one per stage.
        pool_size: side of the grid the last map is average-pooled to (1: global average pooling).
    """

    def __init__(
        self,
        channels: int = 1,
        height: int = 28,
        width: int = 28,
        widths: Sequence[int] | int = (16, 32, 64),
        blocks_per_stage: Sequence[int] | int = 2,
        pool_size: int = 2,
    ) -> None:
        super().__init__()
        if min(channels, height, width) < 1:
            raise ValueError(f"image shape must be positive, got {(channels, height, width)}")
        if pool_size < 1:
            raise ValueError(f"pool_size must be >= 1, got {pool_size}")
        ws = resolve_widths(widths)
        blocks = resolve_blocks(blocks_per_stage, len(ws))
        self.widths = ws
        self.stem = nn.Sequential(_conv3x3(channels, ws[0]), nn.BatchNorm2d(ws[0]), nn.ReLU())
        stages: list[nn.Sequential] = []
        shapes: list[tuple[int, int, int]] = []
        c_in, h, w = ws[0], height, width
        for j, (c_out, n_blocks) in enumerate(zip(ws, blocks, strict=True)):
            stride = 1 if j == 0 else 2
            layers = [BasicBlock(c_in, c_out, stride)] + [BasicBlock(c_out, c_out) for _ in range(n_blocks - 1)]
            stages.append(nn.Sequential(*layers))
            if stride == 2:  # k=3, padding 1, stride 2: ceil(size / 2)
                h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((c_out, h, w))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.stage_shapes: tuple[tuple[int, int, int], ...] = tuple(shapes)
        self.pool_size = pool_size
        self.out_dim = ws[-1] * pool_size**2

    def forward_stages(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Each stage's output ``(N, C_j, H_j, W_j)``."""
        return [out for out, _ in self.forward_stages_with_hidden(x)]

    def forward_stages_with_hidden(self, x: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(output, hidden)`` per stage; ``hidden`` is the inner activation of the stage's last block
        (after its first convolution), of the output's shape."""
        h = self.stem(x)
        outs = []
        for stage in self.stages:
            *first, last = stage
            for block in first:
                h = block(h)
            h, hidden = last.forward_with_hidden(h)
            outs.append((h, hidden))
        return outs

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        """A ``(N, C, H, W)`` map -> ``(N, C * pool_size**2)``: average over a grid, flattened."""
        return F.adaptive_avg_pool2d(fmap, self.pool_size).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for stage in self.stages:
            h = stage(h)
        return self.pool(h)
