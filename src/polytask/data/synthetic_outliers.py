"""Synthetic multi-task regression with planted outlier tasks (the setting of the R-MTGB paper).

Emami, Martínez-Muñoz & Hernández-Lobato, "Robust-Multi-Task Gradient Boosting", Expert Systems with
Applications, 2025, evaluate outlier detection on tasks drawn from random-Fourier-feature functions:
most tasks share one common function, a few ("outlier") tasks follow a different one. Here every
function is a random Fourier feature expansion ``f(x) = sqrt(2 / M) * sum_m a_m cos(w_m . x + b_m)``
(``w_m ~ N(0, I / lengthscale^2)``, ``b_m ~ U(0, 2 pi)``, ``a_m ~ N(0, 1)``), an approximate draw
from a Gaussian process with an RBF kernel. Task ``r``'s target is

    y = f_common(x) + task_scale * f_r(x) + noise       (inlier tasks)
    y = f_outlier(x) + task_scale * f_r(x) + noise      (outlier tasks, all sharing f_outlier)

with inputs ``x ~ U(-1, 1)^d`` and Gaussian noise. The ground truth is returned with the data.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from polytask.data._bundle import DataBundle, register_dataset
from polytask.data._table import TableEncoder, split_indices

__all__ = ["make_outlier_tasks", "synthetic_outliers"]


def _rff(rng: np.random.Generator, d: int, n_features: int, lengthscale: float) -> Callable[[np.ndarray], np.ndarray]:
    w = rng.normal(0.0, 1.0 / lengthscale, size=(n_features, d))
    b = rng.uniform(0.0, 2 * np.pi, size=n_features)
    a = rng.normal(size=n_features)
    return lambda x: np.sqrt(2.0 / n_features) * np.cos(x @ w.T + b) @ a


def make_outlier_tasks(
    n_tasks: int = 8,
    n_outliers: int = 2,
    n_samples: int = 150,
    n_features: int = 2,
    noise: float = 0.1,
    task_scale: float = 0.2,
    lengthscale: float = 0.7,
    seed: int = 0,
) -> tuple[pd.DataFrame, np.ndarray]:
    """Rows of ``n_tasks`` regression tasks, of which the first ``n_outliers`` are outliers.

    Returns ``(frame, is_outlier)``: the frame has columns ``x0..x{d-1}``, ``task`` (0..n_tasks-1)
    and ``y``; ``is_outlier[r]`` is True for task ``r``'s planted outliers (tasks ``0..n_outliers-1``).
    """
    if n_tasks < 2:
        raise ValueError(f"n_tasks must be >= 2, got {n_tasks}")
    if not 0 <= n_outliers < n_tasks:
        raise ValueError(f"n_outliers must be in [0, n_tasks - 1] = [0, {n_tasks - 1}], got {n_outliers}")
    if n_samples < 2 or n_features < 1:
        raise ValueError(f"need n_samples >= 2 and n_features >= 1, got {n_samples} and {n_features}")
    rng = np.random.default_rng(seed)
    common = _rff(rng, n_features, 200, lengthscale)
    outlier = _rff(rng, n_features, 200, lengthscale)
    frames = []
    for r in range(n_tasks):
        x = rng.uniform(-1.0, 1.0, size=(n_samples, n_features))
        own = _rff(rng, n_features, 200, lengthscale)
        base = outlier(x) if r < n_outliers else common(x)
        y = base + task_scale * own(x) + noise * rng.normal(size=n_samples)
        df = pd.DataFrame(x, columns=[f"x{j}" for j in range(n_features)])
        df["task"] = r
        df["y"] = y
        frames.append(df)
    is_outlier = np.arange(n_tasks) < n_outliers
    return pd.concat(frames, ignore_index=True), is_outlier


@register_dataset(
    "synthetic-outliers",
    "random-Fourier-feature regression tasks with planted outlier tasks (R-MTGB setting); 80/20 per task",
    "generated (polytask.data.synthetic_outliers)",
)
def synthetic_outliers(
    seed: int = 0,
    n_tasks: int = 8,
    n_outliers: int = 2,
    n_samples: int = 150,
    n_features: int = 2,
    noise: float = 0.1,
    data_seed: int = 0,
    val_fraction: float = 0.1,
) -> DataBundle:
    """The generator's tasks (drawn with ``data_seed``) split 80/20 per task by ``seed``, with a
    validation slice of ``val_fraction`` of the training rows; ``meta["is_outlier"]`` is the truth."""
    df, is_outlier = make_outlier_tasks(n_tasks, n_outliers, n_samples, n_features, noise, seed=data_seed)
    tr, va, te = split_indices(len(df), val_fraction * 0.8, 0.2, seed, groups=df["task"].to_numpy())
    enc = TableEncoder([("y", "regression")], task_column="task").fit(df.iloc[tr])
    return DataBundle.encoded(
        "synthetic-outliers",
        enc,
        df.iloc[tr],
        df.iloc[va],
        df.iloc[te],
        {
            "is_outlier": {f"y@{r}": bool(o) for r, o in enumerate(is_outlier)},
            "split": {"train": len(tr), "val": len(va), "test": len(te), "seed": seed, "data_seed": data_seed},
        },
    )
