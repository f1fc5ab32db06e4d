"""TaskExpert: a mixture of experts at several backbone layers with a multi-task feature memory.

Ye & Xu, "TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial
Mixture-of-Experts", ICCV 2023 (pp. 21828-21837). At each selected backbone layer a "memorial
mixture-of-experts" module decomposes the backbone feature with a set of expert networks into
task-generic features; per task a dynamic gating network (softmax over experts, computed per sample
and per token) assembles that task's feature from them. A multi-task feature memory is read as one
additional expert by the gates and written (updated) at every layer; after the last layer each task's
memory feeds that task's prediction (paper: abstract and Fig. 2).

The paper uses ViT/Swin backbones on dense prediction; this is a small version for 28x28 images on
CPUs. Choices the paper leaves open (or that we could not check in its text), made here:

* Backbone: :class:`~polytask.nn.resnet.ResNetTrunk`; the module sits at every stage output, each
  spatial position being a token (28x28, 14x14, 7x7 maps for the default widths).
* Experts: ``n_experts`` networks ``conv1x1 -> BN -> ReLU`` to ``expert_dim`` channels per layer,
  computed as one convolution with ``n_experts * expert_dim`` filters (which is the same as separate
  ones, since each output channel has its own filter and norm). Defaults 4 x 16: on one CPU thread a
  batch of 256 takes about twice as long with ``expert_dim=32``, most of it in the per-token mixing
  at the 28x28 stage.
* Gates: per task and layer a :class:`SoftmaxGate` on the backbone token (its channel vector), so the
  weights differ per sample and per position; it has one more output than there are experts (the
  memory) from the second layer on. The first layer has no memory to read.
* Memory: task ``t``'s memory accumulates its assembled features, ``M_1 = F_1`` and
  ``M_l = resize(M_{l-1}) + F_l`` (``resize``: adaptive average pooling to layer ``l``'s map size);
  it has no parameters of its own. In one 20-step run on 512 Multi-MNIST images (small widths) the
  sum trained faster than a running mean over layers (summed loss 3.7 vs 4.1), and slower than
  overwriting the memory with ``F_l`` (3.4); the sum is kept as the literal reading of a memory the
  layers write into.
* Prediction: the last memory average-pooled to a 2x2 grid (``pool_size``; see
  :mod:`polytask.nn.resnet`) and a :class:`TaskHead` (linear by default).
* The shared representation is ``[expert outputs (N, n_experts * expert_dim, H_l, W_l) per layer]``;
  the gates also read the backbone tokens, a path not in the representation (as in MMoE).
* Parameter split: backbone and experts are shared; task ``t``'s gates and head are its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, make_stem, resolve_hidden
from polytask.nn.heads import SoftmaxGate, TaskHead, ZeroShare, gate_report, reset_gate_statistics
from polytask.nn.resnet import ResNetTrunk, require_image
from polytask.tasks import Task

__all__ = ["MEMORY", "TaskExpert"]

#: Name of the memory in :attr:`TaskExpert.expert_names` (the gates' last column from layer 2 on).
MEMORY = "memory"

_PAPER = (
    "Ye & Xu, 'TaskExpert: Dynamically Assembling Multi-Task Representations with Memorial Mixture-of-Experts', "
    "ICCV 2023"
)


class _MemorialMoE(nn.Module):
    """One layer: experts on the backbone map, a gate per task (with a memory column unless first)."""

    def __init__(self, c_in: int, n_experts: int, expert_dim: int, n_tasks: int, reads_memory: bool) -> None:
        super().__init__()
        self.n_experts, self.expert_dim, self.reads_memory = n_experts, expert_dim, reads_memory
        self.experts = nn.Sequential(
            nn.Conv2d(c_in, n_experts * expert_dim, kernel_size=1, bias=False),
            nn.BatchNorm2d(n_experts * expert_dim),
            nn.ReLU(),
        )
        self.gates = nn.ModuleList(SoftmaxGate(c_in, n_experts + int(reads_memory)) for _ in range(n_tasks))
        self.expert_zeros = ZeroShare(n_experts)

    def forward(
        self, x: torch.Tensor, memory: Sequence[torch.Tensor | None]
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """(expert outputs (N, E*d, H, W), assembled feature per task (N, d, H, W), gate weights per
        task (N, E[+1], H, W))."""
        n, _, h, w = x.shape
        out = self.experts(x)
        experts = out.view(n, self.n_experts, self.expert_dim, h, w)
        self.expert_zeros.update(experts)
        tokens = x.permute(0, 2, 3, 1).reshape(n * h * w, -1)  # one gate decision per position
        features, weights = [], []
        for gate, mem in zip(self.gates, memory, strict=True):
            g = gate(tokens).view(n, h, w, -1).permute(0, 3, 1, 2)  # (N, E[+1], H, W)
            # broadcast-and-sum: einsum lowers this to tiny per-token matmuls, ~2x slower on CPU
            f = (g[:, : self.n_experts].unsqueeze(2) * experts).sum(dim=1)
            if self.reads_memory:
                if mem is None:
                    raise ValueError("this layer reads the memory but none was given")
                f = f + g[:, self.n_experts :] * mem
            features.append(f)
            weights.append(g)
        return out, features, weights


@register_model(
    "task-expert",
    paper=_PAPER,
    description="experts at every ResNet stage, per-token task gates and a task feature memory (images)",
    n_experts=4,
    expert_dim=16,
    widths=(16, 32, 64),
    blocks_per_stage=2,
    pool_size=2,
    tower_hidden=(),
    dropout=0.0,
)
class TaskExpert(MultiTaskModel):
    """Shared :class:`ResNetTrunk` and experts at each stage; per task gates, a memory and a head.

    Args:
        n_experts: expert networks per layer (>= 1).
        expert_dim: channels of each expert's output, of the task features and of the memory (>= 1).
        widths: filters per residual stage (one memorial mixture-of-experts module per stage).
        blocks_per_stage: basic blocks per stage (one int, or one per stage).
        pool_size: the head's input is its map average-pooled to this grid and flattened.
        tower_hidden: hidden widths of each head (``()``: a linear classifier on the pooled memory).
        dropout: dropout after each hidden layer of the heads.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        n_experts: int = 4,
        expert_dim: int = 16,
        widths: Sequence[int] | int = (16, 32, 64),
        blocks_per_stage: Sequence[int] | int = 2,
        pool_size: int = 2,
        tower_hidden: Hidden = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, input_spec)
        require_image("task-expert", input_spec)
        if n_experts < 1 or expert_dim < 1:
            raise ValueError(f"need n_experts >= 1 and expert_dim >= 1, got {n_experts} and {expert_dim}")
        tower_h = resolve_hidden(tower_hidden, input_spec, tabular=(), image=())
        self.n_experts, self.expert_dim = n_experts, expert_dim
        self.stem = make_stem(input_spec)
        self.trunk = ResNetTrunk(
            input_spec.channels, input_spec.height, input_spec.width, widths, blocks_per_stage, pool_size
        )
        self.layers = nn.ModuleList(
            _MemorialMoE(c, n_experts, expert_dim, len(tasks), reads_memory=j > 0)
            for j, (c, _, _) in enumerate(self.trunk.stage_shapes)
        )
        head_in = expert_dim * self.trunk.pool_size**2
        self.towers = nn.ModuleList(TaskHead(head_in, t, tower_h, dropout) for t in tasks)

    @property
    def expert_names(self) -> list[list[str]]:
        """The gate columns of each layer: the experts, then (from layer 2 on) :data:`MEMORY`."""
        experts = [f"expert:{e}" for e in range(self.n_experts)]
        return [experts + ([MEMORY] if layer.reads_memory else []) for layer in self.layers]

    def _forward(
        self, x: dict[str, torch.Tensor], read_memory: bool = True
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor], list[dict[str, torch.Tensor]], list[torch.Tensor]]:
        """(predictions, expert outputs per layer, gate weights per layer and task, final memories).

        ``read_memory=False`` hands the gates a zero memory (an ablation for tests and analysis).
        """
        maps = self.trunk.forward_stages(self.stem(x))
        memory: list[torch.Tensor | None] = [None] * len(self.tasks)
        expert_outs, all_weights = [], []
        for layer, fmap in zip(self.layers, maps, strict=True):
            size = fmap.shape[-2:]
            read = [None if m is None else F.adaptive_avg_pool2d(m, size) for m in memory]
            seen = [m if (m is None or read_memory) else torch.zeros_like(m) for m in read]
            out, features, weights = layer(fmap, seen)
            # write: accumulate the task features, M_l = resize(M_{l-1}) + F_l
            memory = [f if m is None else m + f for m, f in zip(read, features, strict=True)]
            expert_outs.append(out)
            all_weights.append(dict(zip(self.task_names, weights, strict=True)))
        final = [m for m in memory if m is not None]
        preds = {t.name: tower(self.trunk.pool(m)) for t, tower, m in zip(self.tasks, self.towers, final, strict=True)}
        return preds, expert_outs, all_weights, final

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        preds, expert_outs, _, _ = self._forward(x)
        return preds, expert_outs

    def gate_weights(self, x: dict[str, torch.Tensor], layer: int = -1) -> dict[str, torch.Tensor]:
        """Each task's gate weights at ``layer``, ``(N, len(expert_names[layer]), H, W)``; they sum to
        one over dim 1 at every position."""
        return self._forward(x)[2][layer]

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        prefixes = [f"layers.{j}.gates.{i}" for j in range(len(self.layers))] + [f"towers.{i}"]
        return self._parameter_names_under(*prefixes)

    def diagnostics(self) -> dict[str, Any]:
        """Per task, mean gate weight per column (``expert_usage``, ordered as ``expert_names``) and
        mean gate entropy per token (``gate_entropy``, nats) at the last layer, each expert's share of
        zero outputs there (``expert_zero_share``); ``layers`` holds the same for every layer. Recorded
        over eval-mode forward passes since the last :meth:`reset_diagnostics`."""
        per_layer = [
            gate_report(dict(zip(self.task_names, layer.gates, strict=True)), {"experts": layer.expert_zeros})  # type: ignore[arg-type]
            for layer in self.layers
        ]
        return {**per_layer[-1], "expert_names": self.expert_names[-1], "layers": per_layer}

    def reset_diagnostics(self) -> None:
        reset_gate_statistics(self)
