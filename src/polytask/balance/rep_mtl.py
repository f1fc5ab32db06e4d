"""Rep-MTL: task-saliency regularisation of the shared representation, on top of a loss-level balancer.

Wang, Li and Xu, "Rep-MTL: Unleashing the Power of Representation-level Task Saliency for Multi-Task
Learning", ICCV 2025 (arXiv 2507.21049).

The task saliency is the gradient of a task's loss with respect to the shared representation,
``S_t = dL_t/dZ`` (eq. 3), computed with ``create_graph=True`` so that the regulariser's own gradient
reaches the model ("gradients from all these components flow through the multi-task model", Sec. 3.4;
the paper's cost analysis calls it second-order information, App. D.2). The objective is (eq. 10)::

    sum_t w_t L_t + lambda_tsr L_tsr + lambda_csa L_csa

where the ``w_t`` come from the ``base`` balancer (the paper uses equal weighting) and

* TSR, task-specific saliency regulation (eqs. 4-6): the channel mean of the saliency at every
  (sample, position) ``i``, ``s_it = mean_c S_t[b, c, pos]``, normalised over the tasks,
  ``P_it = |s_it| / sum_k |s_ik|``; ``L_tsr`` is the mean over ``i`` of the entropy
  ``-sum_t P_it log P_it``. High entropy (a position equally salient to every task) is penalised.
* CSA, cross-task saliency alignment (eqs. 7-9): per sample ``b`` and task ``t`` the affinity
  ``M_tb = S_tb S_tb^T`` (C x C, ``S_tb`` is C x positions); the anchor ``A_b`` (C x T) holds each
  task's saliency averaged over positions and ``Ahat_b = A_b A_b^T``. With ``sim`` the cosine
  similarity of the flattened matrices, ``(Ahat_b, M_tb)`` are positive pairs and ``(Ahat_b, Ahat_k)``,
  ``k != b``, negative ones: ``L_csa = mean -log( exp(sim(Ahat_b, M_tb)/tau) / sum_{k != b}
  exp(sim(Ahat_b, Ahat_k)/tau) )``. As in eq. 9 the denominator holds the negatives only.

Choices the paper leaves open, made here:

* Eq. 9 writes one positive ``z_b^t`` per sample but Fig. 2 has B x T positive pairs; the loss is
  averaged over all (sample, task) pairs.
* ``tau`` is not reported; the default 0.5 is a common setting of SimCLR-style losses (the paper
  cites SimCLR for the contrastive form). With 0.1 the CSA gradient was as large as the task
  gradients at initialisation on Multi-MNIST and training slowed markedly. The lambdas were
  grid-searched in [0.7, 1.5] per data set (App. D.1) without the chosen values being reported; the
  default 0.9 is the value the sensitivity study holds fixed.
* Layouts: ``(B, C, *spatial)`` tensors (4-d and more) are channel-first maps as in the paper; a
  ``(B, R)`` vector is R channels at one position; a ``(B, P, D)`` tensor (stacked experts or tokens)
  is P positions of D channels. With several representation tensors the regulariser is their mean.
* Missing labels: a task without labels for a sample has an exactly zero saliency row there. Such
  (sample, task) pairs are left out of CSA's positives, samples with a zero anchor out of the
  negatives, and positions where every task's saliency is zero out of TSR's mean; a task that is
  unlabelled on the whole batch then acts as if it were absent. Without negatives (batch of one) the
  CSA term is its positive part.
* Both terms are invariant to a common rescaling of the saliencies; they are divided by a detached
  batch maximum first, so that float32 products of small gradients neither underflow nor overflow.
  This changes neither values nor gradients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from polytask.balance._base import BALANCERS, Balancer, build_balancer, register_balancer
from polytask.balance._engine import GradientEngine, NoSharedParametersError
from polytask.tasks import Task

__all__ = ["RepMTL", "csa_loss", "rep_mtl_regulariser", "saliency_layout", "task_saliency", "tsr_loss"]


def saliency_layout(saliency: torch.Tensor) -> torch.Tensor:
    """Task saliencies ``(T, B, *rep_shape)`` as ``(T, B, C, P)``: C channels at P positions.

    ``(T, B)`` and ``(T, B, R)`` -> one position; ``(T, B, P, D)`` (experts or tokens) -> D channels at
    P positions; ``(T, B, C, *spatial)`` -> channel-first maps with the spatial dims flattened.
    """
    if saliency.dim() < 2:
        raise ValueError(f"saliency must be (tasks, batch, ...), got shape {tuple(saliency.shape)}")
    if saliency.dim() == 2:
        return saliency[:, :, None, None]
    if saliency.dim() == 3:
        return saliency[..., None]
    if saliency.dim() == 4:
        return saliency.transpose(2, 3)
    return saliency.flatten(3)


def task_saliency(losses: Sequence[torch.Tensor], representation: torch.Tensor) -> torch.Tensor:
    """``S_t = dL_t / dZ`` for every task, stacked ``(T, *Z.shape)``, differentiable (``create_graph``).

    A loss that does not reach ``Z`` (or is a constant) has a zero saliency.
    """
    rows = []
    for loss in losses:
        g = None
        if loss.requires_grad and representation.requires_grad:
            (g,) = torch.autograd.grad(loss, representation, create_graph=True, allow_unused=True)
        rows.append(g if g is not None else torch.zeros_like(representation))
    return torch.stack(rows)


# Saliencies are rescaled to a largest entry of 1 (see rep_mtl_regulariser). Entries below these
# floors are treated as absent: exactly-zero tests let denormal values through, whose 1/x and
# 1/sqrt(x) derivatives (second-order, through create_graph) overflow to inf and then NaN.
_TOTAL_FLOOR = 1e-6  # task-summed |channel mean| at a position (TSR)
_NORM2_FLOOR = 1e-12  # squared Frobenius norms of affinities and anchors (CSA)


def _safe_sqrt(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    # sqrt(0) has an infinite derivative: give invalid entries 1 before the root, never after.
    return torch.sqrt(torch.where(valid, x, torch.ones((), dtype=x.dtype, device=x.device)))


def tsr_loss(saliency: torch.Tensor) -> torch.Tensor:
    """Task-specific saliency regulation (eqs. 4-6) of saliencies laid out ``(T, B, C, P)``.

    Mean over (sample, position) of the entropy over tasks of ``|channel mean of S_t|``; positions
    where every task's channel mean is (numerically) zero are left out (zero when none is left).
    """
    s_hat = saliency.mean(dim=2).abs()  # (T, B, P)
    total = s_hat.sum(dim=0)  # (B, P)
    valid = total > _TOTAL_FLOOR
    one = torch.ones((), dtype=total.dtype, device=total.device)
    p = s_hat / torch.where(valid, total, one)
    # 0 log 0 = 0; the clamp keeps the derivative finite where a task's saliency vanishes.
    entropy = -(p * torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))).sum(dim=0)
    return (entropy * valid).sum() / valid.sum().clamp_min(1)


def _frobenius_gram_norm2(x: torch.Tensor) -> torch.Tensor:
    """``||x x^T||_F^2`` for ``x`` (..., C, P), through the smaller of the C x C and P x P Gramians."""
    g = x.transpose(-1, -2) @ x if x.shape[-1] <= x.shape[-2] else x @ x.transpose(-1, -2)
    return g.pow(2).sum(dim=(-2, -1))


def csa_loss(saliency: torch.Tensor, temperature: float) -> torch.Tensor:
    """Sample-wise cross-task saliency alignment (eqs. 7-9) of saliencies laid out ``(T, B, C, P)``.

    Frobenius products of the C x C affinities are computed without forming them:
    ``<X X^T, Y Y^T> = ||X^T Y||_F^2``.
    """
    n_tasks, batch, channels, _ = saliency.shape
    anchors = saliency.mean(dim=3).transpose(0, 1)  # (B, T, C): A_b^T
    # <Ahat_b, Ahat_k> = ||A_b^T A_k||_F^2, through T x T products unless C x C ones are smaller.
    if n_tasks <= channels:
        anchor_gram = torch.einsum("btc,kuc->bktu", anchors, anchors).pow(2).sum(dim=(-2, -1))
    else:
        flat = (anchors.transpose(1, 2) @ anchors).reshape(batch, -1)
        anchor_gram = flat @ flat.T
    anchor_norm2 = anchor_gram.diagonal()  # (B,)
    affinity_norm2 = _frobenius_gram_norm2(saliency)  # (T, B): ||M_tb||^2
    # <Ahat_b, M_tb> = ||A_b^T S_tb||_F^2
    cross = torch.einsum("buc,tbcp->tbup", anchors, saliency).pow(2).sum(dim=(-2, -1))  # (T, B)

    anchor_ok = anchor_norm2 > _NORM2_FLOOR
    pos_ok = (affinity_norm2 > _NORM2_FLOOR) & anchor_ok[None, :]
    anchor_norm = _safe_sqrt(anchor_norm2, anchor_ok)
    pos_sim = cross / (_safe_sqrt(affinity_norm2, pos_ok) * anchor_norm[None, :])
    neg_ok = anchor_ok[:, None] & anchor_ok[None, :] & ~torch.eye(batch, dtype=torch.bool, device=saliency.device)
    neg_sim = anchor_gram / (anchor_norm[:, None] * anchor_norm[None, :])

    has_neg = neg_ok.any(dim=1)  # (B,)
    neg_inf = torch.full((), float("-inf"), dtype=neg_sim.dtype, device=neg_sim.device)
    logits = torch.where(neg_ok, neg_sim / temperature, neg_inf)
    # A row without negatives would be all -inf (NaN derivative): give it zeros, then drop its term.
    logits = torch.where(has_neg[:, None], logits, torch.zeros_like(logits))
    log_denominator = torch.where(has_neg, torch.logsumexp(logits, dim=1), torch.zeros_like(anchor_norm))
    per_pair = -pos_sim / temperature + log_denominator[None, :]  # (T, B)
    return (per_pair * pos_ok).sum() / pos_ok.sum().clamp_min(1)


def rep_mtl_regulariser(
    saliency: torch.Tensor, lambda_tsr: float = 0.9, lambda_csa: float = 0.9, temperature: float = 0.5
) -> torch.Tensor:
    """``lambda_tsr L_tsr + lambda_csa L_csa`` of the task saliencies ``(T, B, *rep_shape)``."""
    s = saliency_layout(saliency)
    if s.numel():
        # Both terms are invariant to a common scale; this only protects float32 (and needs no sync).
        scale = s.detach().abs().amax()
        s = s / torch.where(scale > 0, scale, torch.ones_like(scale))
    total = s.sum() * 0.0  # an attached zero, so that callers can always add and backpropagate it
    if lambda_tsr:
        total = total + lambda_tsr * tsr_loss(s)
    if lambda_csa:
        total = total + lambda_csa * csa_loss(s, temperature)
    return total


def _loss_level_names() -> list[str]:
    return sorted(name for name, entry in BALANCERS.items() if entry.cls.level == "loss")


@register_balancer(
    "rep-mtl",
    paper="Wang, Li and Xu: Rep-MTL: Unleashing the Power of Representation-level Task Saliency for Multi-Task "
    "Learning (ICCV 2025)",
    description="entropy (TSR) and contrastive (CSA) regularisers on task saliencies at the shared "
    "representation, added to a loss-level balancer's weighted sum",
    base="equal",
    base_params=None,
    lambda_tsr=0.9,
    lambda_csa=0.9,
    temperature=0.5,
)
class RepMTL(Balancer):
    """Rep-MTL around a loss-level ``base`` balancer (built with ``base_params``), which it owns as a
    submodule: the base's parameters and buffers are optimised and checkpointed with it."""

    level = "representation"

    def __init__(
        self,
        tasks: list[Task],
        base: str = "equal",
        base_params: Mapping[str, Any] | None = None,
        lambda_tsr: float = 0.9,
        lambda_csa: float = 0.9,
        temperature: float = 0.5,
    ) -> None:
        super().__init__(tasks)
        valid = _loss_level_names()
        if base not in valid:
            raise ValueError(f"rep-mtl base '{base}' is not a loss-level balancer; valid: {', '.join(valid)}")
        if base_params is not None and not isinstance(base_params, Mapping):
            raise ValueError(f"rep-mtl base_params must be a mapping of the base's parameters, got {base_params!r}")
        if lambda_tsr < 0 or lambda_csa < 0:
            raise ValueError(f"rep-mtl needs lambda_tsr, lambda_csa >= 0, got {lambda_tsr}, {lambda_csa}")
        if not temperature > 0:
            raise ValueError(f"rep-mtl needs temperature > 0, got {temperature}")
        self.base = build_balancer(base, tasks, **dict(base_params or {}))
        self.lambda_tsr, self.lambda_csa, self.temperature = float(lambda_tsr), float(lambda_csa), float(temperature)

    def regulariser(self, losses: Mapping[str, torch.Tensor], representation: Sequence[torch.Tensor]) -> torch.Tensor:
        """The Rep-MTL term, attached to the graph; the mean over the representation tensors."""
        task_losses = [losses[t] for t in self.task_names]
        terms = [
            rep_mtl_regulariser(task_saliency(task_losses, z), self.lambda_tsr, self.lambda_csa, self.temperature)
            for z in representation
            if z.requires_grad
        ]
        if not terms:
            return torch.stack(task_losses).sum() * 0.0
        return torch.stack(terms).mean()

    def backward(self, losses: dict[str, torch.Tensor], engine: GradientEngine) -> dict[str, float]:
        if self.lambda_tsr or self.lambda_csa:
            if not engine.representation:
                raise NoSharedParametersError(
                    "rep-mtl regularises the shared representation, but this model exposes none; "
                    "use a shared architecture (e.g. shared-bottom, mmoe, ple)"
                )
            engine.extra_loss = self.regulariser(losses, engine.representation)
        return self.base.backward(losses, engine)

    def epoch_end(self, epoch: int, train_losses: dict[str, float]) -> None:
        self.base.epoch_end(epoch, train_losses)
