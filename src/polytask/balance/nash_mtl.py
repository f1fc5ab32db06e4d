"""Nash-MTL: the update as the Nash bargaining solution between tasks.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik and Fetaya, "Multi-Task Learning as a
Bargaining Game", ICML 2022 (Algorithm 1).

The bargaining solution is ``d = J^T alpha`` with ``alpha > 0`` solving ``G alpha = 1 / alpha``
elementwise (Theorem 5.1); then ``||d||^2 = alpha'G alpha = K`` whatever the scale of the gradients.
The paper approximates it by a sequence of convex programs (cvxpy + ECOS, on ``G / ||G||_F`` for
conditioning, with the normalisation factor in the constraints so the solution is that of G); it is
the minimiser of the strictly convex ``1/2 a'Ga - sum log a``, so damped Newton solves it to machine
precision in a few iterations (:func:`polytask.balance._solvers.alpha_fair`), warm-started from the
previous step's weights (``optim_niter`` bounds the Newton iterations). As in the official code
the shared update is clipped to norm ``max_norm`` (0 disables), computed from the Gramian so the
clipped update is still ``J^T w``, and the weights are recomputed every ``update_weights_every``
steps; in between the stored weights are applied without per-task gradients. The weights and the
step count live in buffers, so a checkpoint restores them.

Tasks without gradient this step (no labels) get weight 0 (``G alpha = 1/alpha`` has no solution
for them). When 0 is in the convex hull of the gradients the condition has no solution either; a
1e-12 relative ridge keeps the weights finite and the update is then close to 0 (a Pareto-stationary
point).

Path: Gramian -> weights (``apply_shared_weights``); steps without update: one backward of the
weighted loss for the shared parameters.
"""

from __future__ import annotations

import numpy as np
import torch

from polytask.balance._aggregate import check_task_order, clip_factor, weights_tensor
from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine, NoSharedParametersError
from polytask.balance._solvers import alpha_fair, gramian_array, nonzero_rows
from polytask.tasks import Task

__all__ = ["NashMTL", "nash_mtl_weights"]


def nash_mtl_weights(gramian: torch.Tensor, init: torch.Tensor | None = None, max_iter: int = 20) -> torch.Tensor:
    """``alpha`` with ``G alpha = 1 / alpha`` on the tasks that have a gradient (0 elsewhere), before
    any norm clipping; ``init`` warm-starts the solver."""
    g = gramian_array(gramian)
    k = g.shape[0]
    w = np.zeros(k)
    rows = nonzero_rows(g)
    if rows.any():
        sub = g[np.ix_(rows, rows)]
        x0 = None
        if init is not None:
            prev = init.detach().to("cpu", torch.float64).numpy()[rows]
            x0 = np.where(prev > 0, prev, 1.0)
        w[rows], _ = alpha_fair(sub, 1.0, x0, max_iter=max_iter)
    return weights_tensor(w, gramian)


def _apply_weighted_shared(engine: GradientEngine, weights: torch.Tensor, max_norm: float) -> float:
    """Shared parameters get ``sum_k w_k grad L_k`` clipped to ``max_norm``, task-specific ones their own
    gradient, with two ordinary backward passes and no per-task gradients. Returns the clip factor."""
    if not engine.shared:
        raise NoSharedParametersError("nash-mtl needs shared parameters; the model declares none")
    losses = [engine.losses[t] for t in engine.task_names]
    shared_total = sum(float(w) * loss for w, loss in zip(weights.tolist(), losses, strict=True))
    if isinstance(shared_total, torch.Tensor) and shared_total.requires_grad and engine.shared:
        torch.autograd.backward(shared_total, inputs=engine.shared, retain_graph=True)
    own = sum(losses)
    if isinstance(own, torch.Tensor) and own.requires_grad and engine.specific:
        torch.autograd.backward(own, inputs=engine.specific)
    factor = 1.0
    grads = [p.grad for p in engine.shared if p.grad is not None]
    if max_norm > 0 and grads:
        norm = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])))
        if norm > max_norm:
            factor = max_norm / norm
            for g in grads:
                g.mul_(factor)
    return factor


@register_balancer(
    "nash-mtl",
    paper="Navon et al.: Multi-Task Learning as a Bargaining Game (ICML 2022)",
    description="Nash bargaining solution: weights with G alpha = 1/alpha, update clipped to max_norm",
    max_norm=1.0,
    update_weights_every=1,
    optim_niter=20,
)
class NashMTL(Balancer):
    level = "gradient"

    def __init__(
        self, tasks: list[Task], max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
    ) -> None:
        super().__init__(tasks)
        if max_norm < 0 or update_weights_every < 1 or optim_niter < 1:
            raise ValueError(
                "nash-mtl needs max_norm >= 0, update_weights_every >= 1 and optim_niter >= 1; got "
                f"{max_norm}, {update_weights_every}, {optim_niter}"
            )
        self.max_norm = float(max_norm)
        self.update_weights_every = int(update_weights_every)
        self.optim_niter = int(optim_niter)
        self.register_buffer("alpha", torch.ones(len(tasks), dtype=torch.float64))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        check_task_order(self, engine)
        if int(self.step) % self.update_weights_every == 0:
            gramian = engine.gramian()
            self.alpha = nash_mtl_weights(gramian, self.alpha, self.optim_niter).to(torch.float64)
            w = self.alpha * clip_factor(gramian, self.alpha, self.max_norm)
            engine.apply_shared_weights(dict(zip(engine.task_names, w.tolist(), strict=True)))
        else:
            w = self.alpha * _apply_weighted_shared(engine, self.alpha, self.max_norm)
        self.step += 1
        return dict(zip(engine.task_names, w.tolist(), strict=True))
