"""F-MTL: per-task sharpness-aware minimisation around a gradient-level aggregator.

Phan, Tran, Tran, Ho, Phung and Le, "Improving Multi-task Learning via Seeking Task-based Flat
Regions", arXiv 2211.13723, 2022. The equations and algorithm cited below are those of the latest
version of that arXiv entry, retitled "Beyond Losses Reweighting: Empowering Multi-Task Learning via
the Generalization Perspective" (Phan et al., ICCV 2025): Section 3.4, Eqs. 7, 11, 14-16 and
Algorithm 1. The paper's F-MGDA, F-PCGrad, F-CAGrad, ... are this method with those bases.

For every task i, with ``g_i`` the gradient of ``L_i`` with respect to the shared parameters and
``g_ns^i`` that with respect to task i's own (non-shared) parameters (Algorithm 1, line 2):

* worst-case perturbations, each part normalised on its own (Eqs. 7 and 11):
  ``eps_sh^i = rho * g_i / ||g_i||`` and ``eps_ns^i = rho_specific * g_ns^i / ||g_ns^i||``;
* the SAM gradients ``g_i^SAM, g_ns^{i,SAM} = grad L_i(theta_sh + eps_sh^i, theta_ns^i + eps_ns^i)``;
* the flat part of the shared gradient ``h_i = g_i^SAM - g_i`` (Eq. 16).

The loss gradients ``{g_i}`` and the flat gradients ``{h_i}`` are aggregated *separately* by the
chosen gradient-level method (``base``) and the shared parameters get the sum of the two results
(Algorithm 1, lines 7-8: the paper found summing as good as a second aggregation). Each task's own
parameters get their SAM gradient ``g_ns^{i,SAM}`` (Eq. 14). With ``rho = rho_specific = 0`` the
update is exactly the base method's.

Where this differs from or adds to the paper:

* Two instances of the base aggregator are kept, one for the ``g``'s and one for the ``h``'s, so
  that stateful methods (GradVac's cosine targets, Nash-MTL's warm start and step count, DB-MTL's
  moving averages) track one stream each instead of mixing both; for stateless methods this is the
  paper's single ``gradient_aggregate``. Both are submodules, so checkpoints hold their state. The
  logged weights are those of the loss-gradient aggregation.
* ``rho_specific`` (the paper's ``rho_ns``) defaults to ``rho``. The authors' code also offers an
  adaptive (ASAM) perturbation and normalises the ``g``'s and ``h``'s before its MGDA; neither is in
  the paper's algorithm and neither is done here.
* A task whose gradient is zero (no labels in the batch) is not perturbed: its ``h_i`` is 0 and its
  parameters keep their (zero) gradient. A part with zero gradient is left unperturbed on its own.
* When the base rescales a task's own gradient (DB-MTL's ``1 / L_k``), the same factor scales that
  task's SAM gradient.
* The perturbed losses come from :attr:`GradientEngine.reforward` (the trainer re-runs the forward
  pass on the same batch). That pass runs in training mode, so batch-norm running statistics are
  updated by it and dropout draws fresh masks; the authors freeze batch-norm statistics there.

Cost per step: one forward pass, the engine's Jacobian, and per task one backward pass through
that task's head plus one perturbed forward and backward pass: about K + 1 forward and 2K backward
passes, against one forward and one batched backward pass for the base method alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from polytask.balance._aggregate import check_task_order
from polytask.balance._base import BALANCERS, Balancer, build_balancer, register_balancer
from polytask.balance._engine import GradientEngine, Weights
from polytask.tasks import Task

__all__ = ["FMTL"]


def _accumulate(p: torch.Tensor, g: torch.Tensor) -> None:
    """Add ``g`` to ``p.grad`` (creating it), as backward would."""
    g = g.detach().to(p.dtype).reshape(p.shape)
    if p.grad is None:
        p.grad = g.clone()
    else:
        p.grad += g


class _MatrixEngine(GradientEngine):
    """A :class:`GradientEngine` whose per-task shared gradients are the rows of a given ``(K, P)``
    matrix M; the direction a balancer applies through it is collected by :meth:`direction`.

    The shared parameters are zero leaves shaped like the model's (so block-wise methods see the
    same blocks) and the losses are the linear surrogates ``L_k(theta) = <M_k, theta>``, whose
    gradients are the rows of M: a method that back-propagates weighted losses itself (Nash-MTL
    between weight updates) lands in the same ``.grad`` as one that hands back weights or a
    direction. Jacobian, Gramian and weights are served from M directly, without autograd.
    """

    def __init__(self, task_names: Sequence[str], matrix: torch.Tensor, like: Sequence[torch.Tensor]) -> None:
        m = matrix.detach()
        self._m = m
        self._blocks = list(m.split([p.numel() for p in like], dim=1))
        leaves = [torch.zeros(p.shape, dtype=m.dtype, device=m.device, requires_grad=True) for p in like]
        surrogate = {
            t: sum(b[k] @ leaf.reshape(-1) for b, leaf in zip(self._blocks, leaves, strict=True))
            for k, t in enumerate(task_names)
        }
        super().__init__(surrogate, leaves)  # type: ignore[arg-type]
        self.own_weights: torch.Tensor | None = None

    def jacobian(self) -> torch.Tensor:
        return self._m

    def per_task_gradients(self) -> list[torch.Tensor]:
        return list(self._blocks)

    def gramian(self) -> torch.Tensor:
        if self._gramian is None:
            self._gramian = self._m @ self._m.T
        return self._gramian

    def _record_own(self, own_weights: Weights | None) -> None:
        if own_weights is not None:
            values = [float(v) for v in self._vector(own_weights)]
            self.own_weights = torch.as_tensor(values, dtype=self._m.dtype, device=self._m.device)

    def apply_shared_weights(self, weights: Weights, own_weights: Weights | None = None) -> None:
        w = torch.as_tensor([float(v) for v in self._vector(weights)], dtype=self._m.dtype, device=self._m.device)
        for leaf, b in zip(self.shared, self._blocks, strict=True):
            _accumulate(leaf, w @ b)
        self._record_own(own_weights)

    def apply_shared_direction(
        self, direction: torch.Tensor | Sequence[torch.Tensor], own_weights: Weights | None = None
    ) -> None:
        super().apply_shared_direction(direction)  # no task-specific parameters here
        self._record_own(own_weights)

    def backward_weighted(
        self, weights: Weights, extra: torch.Tensor | None = None, own_weights: Weights | None = None
    ) -> None:
        super().backward_weighted(weights, extra)  # reaches the surrogate leaves only
        self._record_own(own_weights)

    def direction(self) -> torch.Tensor:
        return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in self.shared])


def _gradient_level_names() -> list[str]:
    return sorted(n for n, e in BALANCERS.items() if e.cls.level == "gradient" and not issubclass(e.cls, FMTL))


@register_balancer(
    "f-mtl",
    paper="Phan et al.: Improving Multi-task Learning via Seeking Task-based Flat Regions (arXiv 2211.13723, 2022)",
    description="per-task SAM: aggregate the task gradients and their flat parts separately with a base method",
    base="upgrad",
    rho=0.05,
    rho_specific=None,
    base_params={},
)
class FMTL(Balancer):
    level = "gradient"

    def __init__(
        self,
        tasks: list[Task],
        base: str = "upgrad",
        rho: float = 0.05,
        rho_specific: float | None = None,
        base_params: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(tasks)
        if base_params is not None and not isinstance(base_params, Mapping):
            raise ValueError(f"f-mtl base_params must be a mapping of {base}'s parameters, got {base_params!r}")
        rho_ns = rho if rho_specific is None else rho_specific
        if not (rho >= 0 and rho_ns >= 0):
            raise ValueError(f"f-mtl rho and rho_specific must be non-negative, got {rho} and {rho_specific}")
        self.rho, self.rho_specific = float(rho), float(rho_ns)
        self.base_name = base
        params = dict(base_params or {})
        kind = "unknown"
        if base in BALANCERS:
            kind = "f-mtl itself"
            if not issubclass(BALANCERS[base].cls, FMTL):
                self.base = build_balancer(base, tasks, **params)  # aggregates the loss gradients g_i
                # The level can depend on the parameters (e.g. what DB-MTL reads): check the instance.
                kind = f"a {self.base.level}-level balancer"
        if kind != "a gradient-level balancer":
            valid = ", ".join(_gradient_level_names())
            raise ValueError(f"f-mtl base '{base}' is {kind}; valid gradient-level bases: {valid}")
        self.flat_base = build_balancer(base, tasks, **params)  # aggregates the flat gradients h_i

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        check_task_order(self, engine)
        if engine.reforward is None:
            raise RuntimeError(
                "f-mtl evaluates the task losses at perturbed parameters and needs engine.reforward "
                "(the Trainer provides it); this engine has none"
            )
        names = engine.task_names
        shared, specific = list(engine.shared), list(engine.specific)
        g = engine.jacobian().detach()  # (K, P); refuses models without shared parameters
        # Each task's gradient of the task-specific parameters; None marks parameters its loss does
        # not reach (other tasks' heads), so ownership follows the graph.
        own = [_grads(engine.losses[t], specific, retain_graph=True) for t in names]
        h = torch.zeros_like(g)
        sam_specific: list[list[torch.Tensor | None]] = []
        saved = [p.detach().clone() for p in shared + specific]
        for i, t in enumerate(names):
            eps_sh = _scaled(g[i], self.rho)
            eps_ns = _scaled_list(own[i], self.rho_specific)
            if eps_sh is None and eps_ns is None:
                # Nothing to perturb (rho = 0 or no gradient): SAM gradient = gradient, h_i = 0.
                sam_specific.append(own[i])
                continue
            g_sam, s_sam = self._perturbed_grads(engine, t, shared, specific, eps_sh, eps_ns, own[i], saved)
            h[i] = g_sam - g[i]
            sam_specific.append(s_sam)
        direction, weights, own_w = _aggregate(self.base, names, losses, g, shared)
        flat, _, _ = _aggregate(self.flat_base, names, losses, h, shared)
        offset = 0
        for p in shared:
            n = p.numel()
            _accumulate(p, (direction[offset : offset + n] + flat[offset : offset + n]).view_as(p))
            offset += n
        for i, grads in enumerate(sam_specific):
            for p, gp in zip(specific, grads, strict=True):
                if gp is not None:
                    _accumulate(p, gp if own_w is None else own_w[i].to(gp.dtype) * gp)
        return weights

    def _perturbed_grads(
        self,
        engine: GradientEngine,
        task: str,
        shared: list[nn.Parameter],
        specific: list[nn.Parameter],
        eps_sh: torch.Tensor | None,
        eps_ns: list[torch.Tensor | None] | None,
        own: list[torch.Tensor | None],
        saved: list[torch.Tensor],
    ) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
        """``grad L_task`` at ``(theta_sh + eps_sh, theta_ns + eps_ns)``: the flattened shared part and
        the task-specific parts (None where the task's loss does not reach the parameter). The
        parameters are copied back from ``saved`` afterwards, bit for bit, whatever happens."""
        owned = [p for p, gp in zip(specific, own, strict=True) if gp is not None]
        try:
            with torch.no_grad():
                if eps_sh is not None:
                    offset = 0
                    for p in shared:
                        n = p.numel()
                        p.add_(eps_sh[offset : offset + n].view_as(p).to(p.dtype))
                        offset += n
                if eps_ns is not None:
                    for p, e in zip(specific, eps_ns, strict=True):
                        if e is not None:
                            p.add_(e.to(p.dtype))
            perturbed = engine.reforward()
            if task not in perturbed:
                raise KeyError(f"engine.reforward returned losses for {sorted(perturbed)}, not for task '{task}'")
            grads = _grads(perturbed[task], [*shared, *owned], retain_graph=False)
        finally:
            with torch.no_grad():
                for p, s in zip(shared + specific, saved, strict=True):
                    p.copy_(s)
        sh_grads = zip(grads[: len(shared)], shared, strict=True)
        g_sh = torch.cat([(gp if gp is not None else torch.zeros_like(p)).reshape(-1) for gp, p in sh_grads])
        by_id = {id(p): gp for p, gp in zip(owned, grads[len(shared) :], strict=True)}
        # A parameter the unperturbed loss reaches gets a (possibly zero) gradient, never None.
        s_sam = [
            None if gp0 is None else (by_id[id(p)] if by_id[id(p)] is not None else torch.zeros_like(p))
            for p, gp0 in zip(specific, own, strict=True)
        ]
        return g_sh, s_sam


def _grads(loss: torch.Tensor, params: Sequence[torch.Tensor], retain_graph: bool) -> list[torch.Tensor | None]:
    """``d loss / d p`` for each parameter; None for parameters the loss does not depend on."""
    if not params:
        return []
    if not loss.requires_grad:
        return [None] * len(params)
    return list(torch.autograd.grad(loss, list(params), retain_graph=retain_graph, allow_unused=True))


def _scaled(v: torch.Tensor, rho: float) -> torch.Tensor | None:
    """``rho * v / ||v||``, or None when there is nothing to perturb (``rho = 0`` or ``v = 0``)."""
    norm = torch.linalg.vector_norm(v)
    if rho == 0 or not bool(norm > 0):
        return None
    return v * (rho / norm)


def _scaled_list(vs: list[torch.Tensor | None], rho: float) -> list[torch.Tensor | None] | None:
    """:func:`_scaled` over several tensors normalised together (one norm); None entries stay None."""
    present = [v for v in vs if v is not None]
    if rho == 0 or not present:
        return None
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(v) for v in present]))
    if not bool(norm > 0):
        return None
    return [None if v is None else v * (rho / norm) for v in vs]


def _aggregate(
    base: Balancer,
    names: list[str],
    losses: dict[str, torch.Tensor],
    matrix: torch.Tensor,
    like: Sequence[torch.Tensor],
) -> tuple[torch.Tensor, dict[str, float], torch.Tensor | None]:
    """Run ``base`` on the rows of ``matrix``: its direction, its logged weights and its own-task
    gradient scales (None when it gives none)."""
    view = _MatrixEngine(names, matrix, like)
    weights = base.backward(losses, view)
    return view.direction(), weights, view.own_weights
