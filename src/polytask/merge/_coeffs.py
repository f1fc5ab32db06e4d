"""Shared machinery of the coefficient-learning methods (AdaMerging, aTLAS, Concrete masking, MAP).

Each merges ``theta = base + sum_k lambda[k, b] * (mask * tau_k)`` with task vectors
``tau_k = theta_k - base``, one coefficient per task and *block* ``b`` (one block for the whole model
when task-wise, one per tensor when layer/block-wise), and an optional shared mask. Tensors in which
no model moved from the base (e.g. frozen embeddings) are left out of the optimisation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch

from polytask.merge._data import Batch, MergeData, float_keys

__all__ = ["OBJECTIVES", "TaskVectors", "check_objective", "objective_terms", "optimise"]

OBJECTIVES = ("entropy", "supervised")


class TaskVectors:
    """The base and every model's difference to it, on the float tensors where some model moved."""

    def __init__(self, base: Mapping[str, torch.Tensor], models: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.base = {k: v.detach() for k, v in base.items()}
        self.keys: list[str] = []
        self.tau: list[dict[str, torch.Tensor]] = [{} for _ in models]
        for key in float_keys(base):
            b = base[key].detach().float()
            diffs = [m[key].detach().float() - b for m in models]
            if any(bool(d.any()) for d in diffs):
                self.keys.append(key)
                for k, d in enumerate(diffs):
                    self.tau[k][key] = d
        self.n_tasks = len(models)

    def block_index(self, granularity: str) -> dict[str, int]:
        """``key -> block``: ``task`` puts every tensor in block 0, ``layer``/``block`` one block per tensor."""
        if granularity == "task":
            return dict.fromkeys(self.keys, 0)
        if granularity in ("layer", "block"):
            return {k: i for i, k in enumerate(self.keys)}
        raise ValueError(f"granularity must be 'task' or 'layer', got '{granularity}'")

    def combine(
        self,
        lam: torch.Tensor,
        blocks: Mapping[str, int],
        mask: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Merged float tensors (differentiable in ``lam`` and ``mask``); others are the base's."""
        out = {k: v for k, v in self.base.items() if v.is_floating_point()}
        for key in self.keys:
            b = blocks[key]
            delta = sum(lam[k, b] * self.tau[k][key] for k in range(self.n_tasks))
            if mask is not None:
                delta = mask[key] * delta
            out[key] = self.base[key].float() + delta
        return out

    def finish(self, merged: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Detached state dict in the base's dtypes, with every key of the base."""
        out = {}
        for k, v in self.base.items():
            out[k] = merged[k].detach().to(v.dtype).clone() if k in merged else v.clone()
        return out


def objective_terms(
    data: MergeData, params: Mapping[str, torch.Tensor], batches: Sequence[Batch], objective: str
) -> list[torch.Tensor | None]:
    """Per task: mean prediction entropy (``entropy``; None for regression) or the supervised loss."""
    terms: list[torch.Tensor | None] = []
    for k, batch in enumerate(batches):
        if objective == "entropy":
            terms.append(data.entropy(params, k, batch[0]))
        else:
            terms.append(data.loss(params, k, batch))
    return terms


def check_objective(data: MergeData, objective: str, method: str) -> None:
    if objective not in OBJECTIVES:
        valid = ", ".join(OBJECTIVES)
        raise ValueError(f"merge method '{method}': objective must be one of {valid}, got '{objective}'")
    if objective == "supervised":
        unlabeled = [t.name for t in data.tasks if not t.labeled or t.task is None]
        if unlabeled:
            raise ValueError(
                f"merge method '{method}': objective 'supervised' needs labelled batches and a Task for every "
                f"task; missing for {unlabeled} (or use objective='entropy')"
            )
    elif all(t.task is not None and t.task.kind.value == "regression" for t in data.tasks):
        raise ValueError(f"merge method '{method}': entropy needs at least one classification task")


def optimise(
    data: MergeData,
    build: Callable[[], Mapping[str, torch.Tensor]],
    parameters: Sequence[torch.Tensor],
    objective: str,
    steps: int,
    lr: float,
    *,
    penalty: Callable[[], torch.Tensor] | None = None,
    project: Callable[[], None] | None = None,
) -> list[float]:
    """Adam on ``parameters``: each step draws one batch per task and minimises the summed objective
    of the weights ``build()`` returns (+ ``penalty()``); ``project()`` runs after each step.
    Returns the objective per step (before its update)."""
    if steps < 0 or not lr > 0:
        raise ValueError(f"steps must be >= 0 and lr positive, got steps={steps}, lr={lr}")
    opt = torch.optim.Adam(parameters, lr=lr)
    iters = [data.cycle(k) for k in range(len(data))]
    history: list[float] = []
    for _ in range(steps):
        params = build()
        terms = [t for t in objective_terms(data, params, [next(it) for it in iters], objective) if t is not None]
        total = torch.stack(terms).sum()
        value = float(total.detach())
        if penalty is not None:
            total = total + penalty()
        if not math.isfinite(value):
            raise FloatingPointError(f"the merging objective became {value}; lower lr")
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        if project is not None:
            with torch.no_grad():
                project()
        history.append(value)
    return history
