"""Concrete subspace masking: a shared mask over task vectors, learned with the Concrete relaxation.

Tang, Shen, Du, Luo, Zhang and Tao, "Concrete Subspace Learning based Interference Elimination for
Multi-task Model Fusion", arXiv 2312.06173, 2023. One mask ``m`` with an entry per weight, shared by
all tasks, selects the subspace in which the task vectors are merged:
``theta = base + sum_k lambda_k (m * tau_k)`` — with a fixed ``lambda`` (``over="task_arithmetic"``,
Concrete TA) or with task-wise coefficients learned jointly with the mask (``over="adamerging"``,
Concrete AM). The mask is Bernoulli with logits ``s``; during training it is sampled by the binary
Concrete (Gumbel-sigmoid) relaxation ``m = sigmoid((s + log u - log(1 - u)) / temperature)``,
``u ~ U(0, 1)``, so it is differentiable in ``s``, and ``s`` is trained to minimise the tasks'
prediction entropy on unlabelled inputs, plus ``sparsity`` times the mean mask probability (a
penalty that drives the mask towards a smaller subspace). The returned model applies the mask's
probabilities ``sigmoid(s)`` (``eval_mask="continuous"``) or the hard mask ``sigmoid(s) > 0.5``
(``"discrete"``: entries with ``m = 0`` keep the base's weight). Defaults follow FusionBench's
configuration of the method (logits from 0, Adam at 1e-3 for 1,000 steps, continuous mask); with
few steps, start the logits at 0 or raise ``lr``: from a large ``init_logit`` the hard mask stays
all ones and the result is task arithmetic.
"""

from __future__ import annotations

import torch

from polytask.merge._coeffs import TaskVectors, check_objective, optimise
from polytask.merge._data import MergeData, check_models
from polytask.merge._registry import register_merge

__all__ = ["concrete", "concrete_mask"]

_OVER = ("task_arithmetic", "adamerging")
_EVAL = ("continuous", "discrete")


def concrete_mask(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    data: MergeData,
    *,
    over: str = "task_arithmetic",
    lam: float = 0.3,
    temperature: float = 0.5,
    init_logit: float = 0.0,
    sparsity: float = 0.0,
    lr: float = 1e-3,
    steps: int = 1000,
    seed: int = 0,
    eval_mask: str = "continuous",
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, list[float]]:
    """(merged state dict, mask probabilities ``sigmoid(s)`` per tensor, coefficients, objective per step)."""
    data = check_models(base, models, data, "concrete")
    if over not in _OVER:
        raise ValueError(f"merge method 'concrete': over must be one of {', '.join(_OVER)}, got '{over}'")
    if not temperature > 0:
        raise ValueError(f"merge method 'concrete': temperature must be positive, got {temperature}")
    if eval_mask not in _EVAL:
        raise ValueError(f"merge method 'concrete': eval_mask must be one of {', '.join(_EVAL)}, got '{eval_mask}'")
    check_objective(data, "entropy", "concrete")
    tv = TaskVectors(base, models)
    blocks = tv.block_index("task")
    logits = {k: torch.full_like(tv.base[k], float(init_logit), dtype=torch.float32).requires_grad_() for k in tv.keys}
    coef = torch.full((len(models), 1), float(lam), requires_grad=over == "adamerging")
    gen = torch.Generator().manual_seed(seed)

    def sample() -> dict[str, torch.Tensor]:
        out = {}
        for k, s in logits.items():
            u = torch.rand(s.shape, generator=gen).clamp(1e-6, 1 - 1e-6)
            out[k] = torch.sigmoid((s + u.log() - (-u).log1p()) / temperature)
        return out

    def penalty() -> torch.Tensor:
        total = sum(torch.sigmoid(s).sum() for s in logits.values())
        count = sum(s.numel() for s in logits.values())
        return sparsity * total / max(count, 1)

    def project() -> None:
        coef.clamp_(0.0, 1.0)

    params = [*logits.values(), *([coef] if over == "adamerging" else [])]
    history = optimise(
        data, lambda: tv.combine(coef, blocks, sample()), params, "entropy", steps, lr, penalty=penalty, project=project
    )
    with torch.no_grad():
        probs = {k: torch.sigmoid(s) for k, s in logits.items()}
        mask = probs if eval_mask == "continuous" else {k: (p > 0.5).float() for k, p in probs.items()}
        merged = tv.finish(tv.combine(coef, blocks, mask))
    return merged, probs, coef.detach().clone(), history


@register_merge(
    "concrete",
    "Tang et al., Concrete Subspace Learning based Interference Elimination for Multi-task Model Fusion, "
    "arXiv 2312.06173, 2023",
    "a shared weight mask over task vectors learned with the Concrete (Gumbel-sigmoid) relaxation by entropy "
    "minimisation, over task arithmetic or AdaMerging",
    data_driven=True,
    over="task_arithmetic",
    lam=0.3,
    temperature=0.5,
    init_logit=0.0,
    sparsity=0.0,
    lr=1e-3,
    steps=1000,
    seed=0,
    eval_mask="continuous",
)
def concrete(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    data: MergeData | None = None,
    over: str = "task_arithmetic",
    lam: float = 0.3,
    temperature: float = 0.5,
    init_logit: float = 0.0,
    sparsity: float = 0.0,
    lr: float = 1e-3,
    steps: int = 1000,
    seed: int = 0,
    eval_mask: str = "continuous",
) -> dict[str, torch.Tensor]:
    """``over``: ``"task_arithmetic"`` (fixed ``lam``) or ``"adamerging"`` (learned task-wise, from ``lam``)."""
    data = check_models(base, models, data, "concrete")
    return concrete_mask(
        base,
        models,
        data,
        over=over,
        lam=lam,
        temperature=temperature,
        init_logit=init_logit,
        sparsity=sparsity,
        lr=lr,
        steps=steps,
        seed=seed,
        eval_mask=eval_mask,
    )[0]
