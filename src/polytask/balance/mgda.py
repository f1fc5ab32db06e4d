"""MGDA and MGDA-UB: the minimum-norm point of the convex hull of the task gradients.

Sener and Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018.

The common descent direction of the multiple-gradient descent algorithm (Désidéri 2012) is
``d = J^T w`` with ``w = argmin_{w in simplex} ||J^T w||^2``: a direction that decreases every task
loss unless the point is Pareto-stationary. The paper solves it by Frank-Wolfe (Algorithm 2) with a
closed form for two tasks (Algorithm 1); here K = 2 uses that closed form and larger K an exact
active-set QP on the Gramian (:func:`polytask.balance._solvers.min_norm_weights`), so the result is
the exact minimum-norm point rather than a Frank-Wolfe approximation.

MGDA-UB (Section 3.3) replaces the shared-parameter gradients by the gradients with respect to the
shared representation, an upper bound that costs K backward passes through the task heads only, and
then applies the weights to the losses in one ordinary backward pass.

Tasks whose gradient is zero this step (no labels in the batch) get weight 0 and are left out of the
hull; otherwise their zero gradient would be the minimum-norm point and stop all training.

Path: Gramian -> weights (``apply_shared_weights``); MGDA-UB: representation Gramian -> weights ->
``backward_weighted``.
"""

from __future__ import annotations

import torch

from polytask.balance._aggregate import GramianBalancer, check_task_order, weights_tensor
from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine
from polytask.balance._solvers import gramian_array, min_norm_weights

__all__ = ["MGDA", "MGDAUB", "mgda_weights"]

_PAPER = "Sener, Koltun: Multi-Task Learning as Multi-Objective Optimization (NeurIPS 2018)"


def mgda_weights(gramian: torch.Tensor) -> torch.Tensor:
    """Weights (on the simplex) of the minimum-norm convex combination of the task gradients."""
    w, _ = min_norm_weights(gramian_array(gramian))
    return weights_tensor(w, gramian)


@register_balancer("mgda", paper=_PAPER, description="minimum-norm point of the convex hull of the task gradients")
class MGDA(GramianBalancer):
    def weights(self, gramian: torch.Tensor) -> torch.Tensor:
        return mgda_weights(gramian)


@register_balancer(
    "mgda-ub",
    paper=_PAPER + ", MGDA-UB",
    description="MGDA weights from the gradients of the shared representation, applied to the losses",
)
class MGDAUB(Balancer):
    level = "representation"

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        check_task_order(self, engine)
        z = engine.representation_jacobian().detach()
        w = mgda_weights(z @ z.T).tolist()
        weights = dict(zip(engine.task_names, w, strict=True))
        engine.backward_weighted(weights)
        return weights
