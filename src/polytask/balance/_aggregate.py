"""Plumbing shared by the gradient-level balancers (aggregators).

Most aggregators are a linear combination of the task gradients, ``d = J^T w``, with weights that
depend on the Gramian ``G = J J^T`` only. They subclass :class:`GramianBalancer`: the engine computes
the K x K Gramian (without materialising J where it can), the method turns it into weights, and the
engine applies ``J^T w`` to the shared parameters in one weight-gradient pass
(:meth:`GradientEngine.apply_shared_weights`); task-specific parameters get their own task's
gradient. Methods that are not such a combination (GradDrop) use the Jacobian and
:meth:`GradientEngine.apply_shared_direction` instead.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch

from polytask.balance._base import Balancer
from polytask.balance._engine import GradientEngine

__all__ = ["GramianBalancer", "check_task_order", "clip_factor", "weights_tensor"]


def weights_tensor(w: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """Float64 solver output as a tensor with ``like``'s dtype and device."""
    return torch.as_tensor(w, dtype=like.dtype, device=like.device)


def clip_factor(gramian: torch.Tensor, w: torch.Tensor, max_norm: float) -> float:
    """The factor that clips ``||J^T w|| = sqrt(w'Gw)`` to ``max_norm`` (1 when disabled or below)."""
    if max_norm <= 0:
        return 1.0
    g = gramian.detach().to("cpu", torch.float64)
    v = w.detach().to("cpu", torch.float64)
    norm = max(float(v @ g @ v), 0.0) ** 0.5
    return min(1.0, max_norm / norm) if norm > 0 else 1.0


def check_task_order(balancer: Balancer, engine: GradientEngine) -> None:
    """Rows of the Gramian (and per-task state) follow the balancer's task order; refuse a mismatch."""
    if list(engine.task_names) != balancer.task_names:
        raise ValueError(f"losses are for tasks {engine.task_names}, the balancer was built for {balancer.task_names}")


class GramianBalancer(Balancer):
    """A balancer whose shared update is ``J^T w`` with ``w`` a function of the Gramian (and state).

    Subclasses implement :meth:`weights`; :meth:`backward` asks the engine for the Gramian and
    applies the weights to the shared parameters.
    """

    level: ClassVar[str] = "gradient"

    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        """Task weights ``w`` (K,) from the ``(K, K)`` Gramian of the shared-parameter gradients."""
        raise NotImplementedError

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        check_task_order(self, engine)
        w = self.weights(engine.gramian()).tolist()
        weights = dict(zip(engine.task_names, w, strict=True))
        engine.apply_shared_weights(weights)
        return weights
