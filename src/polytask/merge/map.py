"""MAP: a Pareto front of merging coefficients from quadratic surrogates of every task's metric.

Li, Zhang, Huang, Fan, Du, Chen and Xu (2024), "MAP: Low-compute Model Merging with Amortized
Pareto Fronts via Quadratic Approximation", arXiv 2406.07529. Merged models are task arithmetic
with one coefficient per task, ``theta(c) = base + sum_k c_k tau_k``. MAP evaluates each task's
metric ``M_k`` at ``n_samples`` random coefficient vectors ``c`` in ``[low, high]^K``, fits a
quadratic surrogate ``M_k(c) ~ a_k + b_k^T c + c^T A_k c`` to each by least squares, and then, for
every preference vector ``w`` (positive, summing to one), finds the coefficients maximising the
surrogate scalarisation ``sum_k w_k M_k(c)`` in the box (L-BFGS-B from several starts). Each
preference's solution is the best of all candidates under its own weights, so no returned point is
dominated by another under the surrogates. Metric: ``loss`` (minus the mean supervised loss, needs
labels) or ``entropy`` (minus the mean prediction entropy, classification only). The method returns
``[(preference by task name, merged state dict), ...]``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations_with_replacement
from typing import Any

import numpy as np
import torch
from scipy.optimize import minimize

from polytask.merge._coeffs import TaskVectors, check_objective
from polytask.merge._data import MergeData, check_models
from polytask.merge._registry import register_merge

__all__ = ["MapFront", "map_front", "map_merging", "quadratic_features"]


def quadratic_features(c: np.ndarray) -> np.ndarray:
    """``[1, c_1..c_K, c_i c_j (i <= j)]`` per row of ``c`` ``(S, K)``."""
    c = np.atleast_2d(np.asarray(c, dtype=np.float64))
    quad = [c[:, i] * c[:, j] for i, j in combinations_with_replacement(range(c.shape[1]), 2)]
    return np.column_stack([np.ones(c.shape[0]), c, *quad])


@dataclass
class MapFront:
    """What MAP measured and chose (rows of ``coefficients``/``predicted`` follow ``preferences``)."""

    task_names: list[str]
    samples: np.ndarray  # (S, K) evaluated coefficient vectors
    observed: np.ndarray  # (S, K) measured metrics (higher is better)
    surrogates: np.ndarray  # (K, F) quadratic coefficients per task
    preferences: np.ndarray  # (P, K)
    coefficients: np.ndarray  # (P, K) chosen merging coefficients
    predicted: np.ndarray  # (P, K) surrogate metrics of the chosen coefficients

    def surrogate(self, c: np.ndarray) -> np.ndarray:
        """Surrogate metrics ``(S, K)`` at coefficient vectors ``c`` ``(S, K)``."""
        return quadratic_features(c) @ self.surrogates.T


def _default_preferences(k: int) -> np.ndarray:
    rows = [np.full(k, 1.0 / k)]
    if k > 1:
        for i in range(k):
            w = np.full(k, 0.5 / (k - 1))
            w[i] = 0.5
            rows.append(w)
    return np.array(rows)


def _parse_preferences(prefs: Any, names: list[str]) -> np.ndarray:
    if prefs is None:
        return _default_preferences(len(names))
    rows = []
    for p in prefs:
        if isinstance(p, Mapping):
            unknown = sorted(set(p) - set(names))
            if unknown:
                raise ValueError(f"merge method 'map': preference names unknown task(s) {unknown}; tasks: {names}")
            row = [float(p.get(n, 0.0)) for n in names]
        else:
            row = [float(v) for v in p]
        if len(row) != len(names) or any(not v > 0 for v in row):
            raise ValueError(f"merge method 'map': each preference needs {len(names)} positive weights, got {p}")
        rows.append(np.array(row) / sum(row))
    if not rows:
        raise ValueError("merge method 'map': preferences is empty")
    return np.array(rows)


@torch.no_grad()
def _metrics(data: MergeData, params: Mapping[str, torch.Tensor], metric: str) -> np.ndarray:
    out = []
    for k, td in enumerate(data.tasks):
        vals, counts = 0.0, 0
        for batch in td.batches:
            v = data.loss(params, k, batch) if metric == "loss" else data.entropy(params, k, batch[0])
            if v is None:
                raise ValueError(f"merge method 'map': task '{td.name}' has no prediction entropy; use metric='loss'")
            n = int(next(iter(batch[0].values())).shape[0]) if isinstance(batch[0], Mapping) else len(batch[0])
            vals += float(v) * n
            counts += n
        out.append(-vals / counts)
    return np.array(out)


def map_front(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    data: MergeData,
    *,
    n_samples: int | None = None,
    low: float = 0.0,
    high: float = 1.0,
    metric: str = "loss",
    preferences: Any = None,
    seed: int = 0,
) -> tuple[MapFront, TaskVectors]:
    """Measure, fit the surrogates and choose one coefficient vector per preference."""
    data = check_models(base, models, data, "map")
    if metric not in ("loss", "entropy"):
        raise ValueError(f"merge method 'map': metric must be 'loss' or 'entropy', got '{metric}'")
    check_objective(data, "supervised" if metric == "loss" else "entropy", "map")
    if not high > low:
        raise ValueError(f"merge method 'map': need low < high, got low={low}, high={high}")
    k = len(models)
    n_feat = quadratic_features(np.zeros((1, k))).shape[1]
    s = 2 * n_feat if n_samples is None else int(n_samples)
    if s < n_feat:
        raise ValueError(f"merge method 'map': n_samples must be >= {n_feat} to fit {k}-task quadratics, got {s}")
    names = data.task_names
    prefs = _parse_preferences(preferences, names)
    rng = np.random.default_rng(seed)
    samples = rng.uniform(low, high, size=(s, k))
    tv = TaskVectors(base, models)
    blocks = tv.block_index("task")
    observed = np.stack(
        [_metrics(data, tv.combine(torch.tensor(c[:, None], dtype=torch.float32), blocks), metric) for c in samples]
    )
    feats = quadratic_features(samples)
    surrogates = np.linalg.lstsq(feats, observed, rcond=None)[0].T  # (K, F)

    def scalarised(c: np.ndarray, w: np.ndarray) -> tuple[float, np.ndarray]:
        eps = 1e-6
        f0 = float(w @ (quadratic_features(c) @ surrogates.T)[0])
        grad = np.array(
            [(float(w @ (quadratic_features(c + eps * e) @ surrogates.T)[0]) - f0) / eps for e in np.eye(k)]
        )
        return -f0, -grad

    candidates = [samples]
    for w in prefs:
        starts = [np.full(k, (low + high) / 2), samples[np.argmax(feats @ surrogates.T @ w)]]
        for x0 in starts:
            res = minimize(scalarised, x0, args=(w,), jac=True, method="L-BFGS-B", bounds=[(low, high)] * k)
            candidates.append(np.clip(res.x, low, high)[None, :])
    cand = np.concatenate(candidates)
    cand_metrics = quadratic_features(cand) @ surrogates.T
    chosen = cand[np.argmax(cand_metrics @ prefs.T, axis=0)]  # best candidate under each preference
    front = MapFront(names, samples, observed, surrogates, prefs, chosen, quadratic_features(chosen) @ surrogates.T)
    return front, tv


@register_merge(
    "map",
    "Li et al., MAP: Low-compute Model Merging with Amortized Pareto Fronts via Quadratic Approximation, "
    "arXiv 2406.07529, 2024",
    "quadratic surrogates of each task's metric in the task-arithmetic coefficients; one merged model per "
    "task preference on the surrogate Pareto front",
    data_driven=True,
    n_samples=None,
    low=0.0,
    high=1.0,
    metric="loss",
    preferences=None,
    seed=0,
)
def map_merging(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    data: MergeData | None = None,
    n_samples: int | None = None,
    low: float = 0.0,
    high: float = 1.0,
    metric: str = "loss",
    preferences: Any = None,
    seed: int = 0,
) -> list[tuple[dict[str, float], dict[str, torch.Tensor]]]:
    """``[(preference, merged state dict)]``; default preferences: uniform, then each task at 0.5."""
    data = check_models(base, models, data, "map")
    front, tv = map_front(
        base, models, data, n_samples=n_samples, low=low, high=high, metric=metric, preferences=preferences, seed=seed
    )
    blocks = tv.block_index("task")
    out = []
    for w, c in zip(front.preferences, front.coefficients, strict=True):
        merged = tv.finish(tv.combine(torch.tensor(c[:, None], dtype=torch.float32), blocks))
        out.append(({n: float(v) for n, v in zip(front.task_names, w, strict=True)}, merged))
    return out
