"""Random Loss Weighting.

Lin, Ye, Xu, Shi, Zhang and Kwok, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022.

Each step draws ``w = softmax(z)``, ``z ~ N(0, I_K)``, and minimises ``sum_k w_k L_k``. The draw uses
torch's global generator, so runs are reproducible from the seed and resume exactly.
"""

from __future__ import annotations

import torch

from polytask.balance._base import Balancer, register_balancer
from polytask.balance._engine import GradientEngine

__all__ = ["RandomLossWeighting"]


@register_balancer(
    "rlw",
    paper="Lin et al.: Reasonable Effectiveness of Random Weighting: A Litmus Test for Multi-Task Learning (TMLR 2022)",
    description="weights drawn every step as softmax of a standard normal vector",
)
class RandomLossWeighting(Balancer):
    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        # Drawn on the CPU whatever the training device: the same seed gives the same weights anywhere.
        w = torch.softmax(torch.randn(len(self.task_names), device="cpu"), dim=0)
        weights = {t: float(v) for t, v in zip(self.task_names, w, strict=True)}
        engine.backward_weighted(weights)
        return weights
