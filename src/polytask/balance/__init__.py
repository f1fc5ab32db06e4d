"""Balancers: how per-task losses and gradients combine into one update."""

from polytask.balance import (  # noqa: F401  (registers them)
    aligned_mtl,
    cagrad,
    config,
    db_mtl,
    dualproj,
    dwa,
    equal,
    fairgrad,
    famo,
    fixed,
    fmtl,
    gls,
    graddrop,
    gradnorm,
    gradvac,
    imtl_g,
    imtl_l,
    mgda,
    nash_mtl,
    pcgrad,
    rep_mtl,
    rlw,
    stch,
    uncertainty,
    upgrad,
)
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
