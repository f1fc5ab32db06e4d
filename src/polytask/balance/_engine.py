"""The gradient engine: the one place that turns per-task losses into parameter gradients.

It is lazy. A loss-level balancer calls :meth:`GradientEngine.backward_weighted` and pays for one
ordinary backward pass of the weighted sum; nothing per task is computed. Gradient-level balancers
ask for :meth:`jacobian` (K x shared parameters), :meth:`gramian` (K x K) or
:meth:`representation_jacobian`, then hand a direction for the shared parameters back to
:meth:`apply_shared_direction`; task-specific parameters always receive their own task's gradient.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

__all__ = ["GradientEngine", "NoSharedParametersError"]


class NoSharedParametersError(ValueError):
    """A gradient-level balancer was used on a model that declares no shared parameters."""


class GradientEngine:
    """Per-step gradient computations for one set of task losses.

    Args:
        losses: scalar loss per task, all attached to one graph.
        shared: the shared parameters (those whose update balancers combine).
        specific: the task-specific parameters.
        representation: shared representation tensor(s) from the model's forward pass, for
            representation-level balancers.
    """

    def __init__(
        self,
        losses: Mapping[str, torch.Tensor],
        shared: Sequence[nn.Parameter],
        specific: Sequence[nn.Parameter] = (),
        representation: Sequence[torch.Tensor] = (),
    ) -> None:
        self.losses = dict(losses)
        self.task_names = list(self.losses)
        self.shared = [p for p in shared if p.requires_grad]
        self.specific = [p for p in specific if p.requires_grad]
        self.representation = list(representation)
        self._jacobian: torch.Tensor | None = None

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def _stack(self, weights: Mapping[str, float | torch.Tensor] | torch.Tensor | Sequence[float]) -> list:
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.task_names)
            if unknown:
                raise KeyError(f"weights for unknown task(s) {sorted(unknown)}; tasks: {self.task_names}")
            return [weights.get(t, 0.0) for t in self.task_names]
        w = list(weights)
        if len(w) != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} weights, got {len(w)}")
        return w

    def weighted_loss(
        self,
        weights: Mapping[str, float | torch.Tensor] | torch.Tensor | Sequence[float],
        extra: torch.Tensor | None = None,
    ) -> torch.Tensor:
        total = sum(w * self.losses[t] for w, t in zip(self._stack(weights), self.task_names, strict=True))
        if extra is not None:
            total = total + extra
        return total  # type: ignore[return-value]

    def backward_weighted(
        self,
        weights: Mapping[str, float | torch.Tensor] | torch.Tensor | Sequence[float],
        extra: torch.Tensor | None = None,
    ) -> None:
        """One ordinary backward pass of ``sum_k w_k L_k (+ extra)``; no per-task work."""
        self.weighted_loss(weights, extra).backward()

    # -------------------------------------------------------------- per-task gradients
    def jacobian(self) -> torch.Tensor:
        """Per-task gradients of the shared parameters, flattened: ``(K, P)``.

        A task whose loss does not reach the shared parameters (e.g. no labels in the batch) has a
        zero row.
        """
        if self._jacobian is None:
            if not self.shared:
                raise NoSharedParametersError(
                    "this balancer needs per-task gradients of shared parameters, but the model "
                    "declares none; use a loss-level balancer (e.g. --balancer equal) or a shared architecture"
                )
            rows = []
            for t in self.task_names:
                loss = self.losses[t]
                if loss.requires_grad:
                    grads = torch.autograd.grad(loss, self.shared, retain_graph=True, allow_unused=True)
                else:
                    grads = (None,) * len(self.shared)
                rows.append(
                    torch.cat(
                        [
                            (g if g is not None else torch.zeros_like(p)).reshape(-1)
                            for g, p in zip(grads, self.shared, strict=True)
                        ]
                    )
                )
            self._jacobian = torch.stack(rows)
        return self._jacobian

    def gramian(self) -> torch.Tensor:
        """``J J^T`` of the shared-parameter Jacobian: ``(K, K)``."""
        j = self.jacobian()
        return j @ j.T

    def representation_jacobian(self) -> torch.Tensor:
        """Per-task gradients of the shared representation (all tensors, flattened): ``(K, R)``."""
        if not self.representation:
            raise NoSharedParametersError("this model exposes no shared representation")
        rows = []
        for t in self.task_names:
            loss = self.losses[t]
            if loss.requires_grad:
                grads = torch.autograd.grad(loss, self.representation, retain_graph=True, allow_unused=True)
            else:
                grads = (None,) * len(self.representation)
            rows.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(r)).reshape(-1)
                        for g, r in zip(grads, self.representation, strict=True)
                    ]
                )
            )
        return torch.stack(rows)

    def apply_shared_direction(self, direction: torch.Tensor) -> None:
        """Set the shared parameters' gradients to ``direction`` (flattened, length P) and give each
        task-specific parameter its own task's gradient (one backward of the plain sum)."""
        if self.specific:
            total = sum(self.losses[t] for t in self.task_names)
            if total.requires_grad:  # type: ignore[union-attr]
                torch.autograd.backward(total, inputs=self.specific)  # type: ignore[arg-type]
        offset = 0
        for p in self.shared:
            n = p.numel()
            g = direction[offset : offset + n].view_as(p).to(p.dtype)
            p.grad = g.clone() if p.grad is None else p.grad + g
            offset += n
        if offset != direction.numel():
            raise ValueError(f"direction has {direction.numel()} entries, shared parameters have {offset}")
