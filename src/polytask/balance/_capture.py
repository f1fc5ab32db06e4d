"""Capture of shared linear layers' inputs and outputs during the forward pass.

Gradient-level balancers need per-task gradients of the shared parameters. For a linear layer
``y = x W^T + b`` the gradient of task k is ``dW_k = delta_k^T x`` with ``delta_k = dL_k/dy``: it is
fully determined by the layer's input and the task's output gradient. Capturing ``x`` and ``y`` here
lets the engine obtain all ``delta_k`` in one batched activation-gradient pass and build Gramians and
combined updates layer by layer, never running K weight-gradient passes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CapturedLinear", "capture_linear"]


@dataclass
class CapturedLinear:
    """One shared ``nn.Linear`` and every (input, output) pair of this forward pass."""

    module: nn.Linear
    inputs: list[torch.Tensor] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)


@contextmanager
def capture_linear(model: nn.Module, shared: Sequence[nn.Parameter]) -> Iterator[list[CapturedLinear]]:
    """Record inputs/outputs of every ``nn.Linear`` whose weight is a trainable shared parameter.

    Layers reached in the forward pass more than once record every call (their gradients add up).
    """
    shared_ids = {id(p) for p in shared}
    records: list[CapturedLinear] = []
    handles = []
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.requires_grad and id(module.weight) in shared_ids:
            if module.bias is not None and id(module.bias) not in shared_ids:
                continue  # a weight shared with a task-specific bias: leave it to the generic path
            rec = CapturedLinear(module)
            records.append(rec)

            def hook(mod: nn.Module, args: tuple, out: torch.Tensor, rec: CapturedLinear = rec) -> None:
                if torch.is_grad_enabled() and out.requires_grad:
                    rec.inputs.append(args[0].detach())
                    rec.outputs.append(out)

            handles.append(module.register_forward_hook(hook))
    try:
        yield records
    finally:
        for h in handles:
            h.remove()
