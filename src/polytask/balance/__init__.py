"""Balancers: how per-task losses and gradients combine into one update."""

from polytask.balance import db_mtl, dwa, equal, famo, fixed, gls, gradnorm, imtl_l, rlw, stch, uncertainty  # noqa: F401  (registers them)
from polytask.balance._base import BALANCERS, Balancer, BalancerEntry, build_balancer, register_balancer
from polytask.balance._engine import GradientEngine, NoSharedParametersError

__all__ = [
    "BALANCERS",
    "Balancer",
    "BalancerEntry",
    "GradientEngine",
    "NoSharedParametersError",
    "build_balancer",
    "register_balancer",
]
