"""Boosting estimators inside the project's run protocol: data bundles in, ``{task: raw score}`` out.

A :class:`~polytask.data.DataBundle` holds one prediction per (row, task) with a label mask; the
estimators want one row per labelled (row, task) pair and the task's id. :func:`stack_tasks` makes
that table (both layouts: task-column data gives each row once, multi-label data once per labelled
task). Regression targets are standardised per task with the task's training statistics, which is
also what the networks fit, so that :class:`BoostedModel` returns the raw scores the metrics expect.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polytask._registry import Registry
from polytask.boost._base import MIN_TASK_ROWS
from polytask.boost.baselines import (
    PerTaskGradientBoostingClassifier,
    PerTaskGradientBoostingRegressor,
    PooledGradientBoostingClassifier,
    PooledGradientBoostingRegressor,
)
from polytask.boost.rmtgb import MultiTaskGradientBoostingClassifier, MultiTaskGradientBoostingRegressor
from polytask.data._tensors import InputSpec, TaskTensors
from polytask.nn._base import MultiTaskModel
from polytask.tasks import Task, TaskKind

__all__ = [
    "BOOSTERS",
    "BoostedModel",
    "build_booster",
    "fit_boosted",
    "load_boosted",
    "save_boosted",
    "stack_tasks",
]

BOOSTER_FORMAT = "polytask-booster/1"

_R_MTGB = "Emami, Martínez-Muñoz & Hernández-Lobato, 'Robust-Multi-Task Gradient Boosting', ESWA 2025"
_HGB = "Ke et al., 'LightGBM: A Highly Efficient Gradient Boosting Decision Tree', NeurIPS 2017 (scikit-learn HGB)"

# name -> (regressor class, classifier class); the registry's defaults are the accepted parameters.
BOOSTERS: Registry[tuple[type, type]] = Registry("boosting model")
_RMTGB_DEFAULTS = dict(
    n_estimators=100,
    n_task_estimators=50,
    learning_rate=0.1,
    max_depth=3,
    min_samples_leaf=1,
    subsample=1.0,
    early_stopping=False,
    validation_fraction=0.1,
    n_iter_no_change=10,
    tree_backend="sklearn",
)
_HGB_DEFAULTS = dict(
    max_iter=100,
    learning_rate=0.1,
    max_leaf_nodes=31,
    max_depth=None,
    min_samples_leaf=20,
    l2_regularization=0.0,
    early_stopping=False,
    validation_fraction=0.1,
    tree_backend="sklearn",
)
BOOSTERS.register(
    "rmtgb",
    _R_MTGB,
    "shared trees, outlier/non-outlier trees mixed per task by sigmoid(theta), then per-task trees",
    n_outlier_estimators=100,
    theta_learning_rate=20.0,
    theta_l2=0.0,
    **_RMTGB_DEFAULTS,
)((MultiTaskGradientBoostingRegressor, MultiTaskGradientBoostingClassifier))
BOOSTERS.register(
    "mtgb",
    _R_MTGB + " (its MT-GB ablation: block 2 removed)",
    "shared trees, then per-task trees on the residuals",
    **_RMTGB_DEFAULTS,
)((MultiTaskGradientBoostingRegressor, MultiTaskGradientBoostingClassifier))
BOOSTERS.register("gbdt-per-task", _HGB, "one HistGradientBoosting (or LightGBM) model per task", **_HGB_DEFAULTS)(
    (PerTaskGradientBoostingRegressor, PerTaskGradientBoostingClassifier)
)
BOOSTERS.register(
    "gbdt-pooled", _HGB, "one HistGradientBoosting (or LightGBM) model, task id as a feature", **_HGB_DEFAULTS
)((PooledGradientBoostingRegressor, PooledGradientBoostingClassifier))


def _kind_of(tasks: list[Task]) -> str:
    kinds = {t.kind for t in tasks}
    if kinds == {TaskKind.REGRESSION}:
        return "regression"
    if len(kinds) == 1 and kinds <= {TaskKind.BINARY, TaskKind.MULTICLASS}:
        n = {t.n_classes for t in tasks}
        if len(n) == 1:
            return "classification"
    raise ValueError(
        "boosting models need all tasks of one kind (all regression, or all binary/multiclass with the same "
        f"number of classes); got {sorted({f'{t.kind.value}({t.n_classes})' for t in tasks})}"
    )


def build_booster(name: str, tasks: list[Task], seed: int = 0, **params: Any) -> Any:
    """The estimator registered as ``name`` for these tasks' kind, with ``params`` over its defaults."""
    (reg, clf), kwargs = BOOSTERS.resolve(name, params)
    if name == "mtgb":
        kwargs["n_outlier_estimators"] = 0
    cls = reg if _kind_of(tasks) == "regression" else clf
    return cls(random_state=seed, **kwargs)


def features(x: dict[str, torch.Tensor]) -> np.ndarray:
    """The encoded inputs as one float matrix: numeric columns, then categorical ids (trees split on ids)."""
    parts = [x["num"].numpy().astype(np.float64)] if "num" in x else []
    if "cat" in x and x["cat"].shape[1]:
        parts.append(x["cat"].numpy().astype(np.float64))
    if not parts:
        raise ValueError("boosting models need tabular inputs (x['num'] / x['cat']); this data has none")
    return np.concatenate(parts, axis=1)


def stack_tasks(data: TaskTensors, tasks: list[Task]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(X, y, task_index)`` with one row per labelled (row, task) pair; regression y standardised per task."""
    X = features(data.x)
    xs, ys, ts = [], [], []
    for k, task in enumerate(tasks):
        m = data.mask[task.name].numpy().astype(bool)
        if m.ndim > 1:
            raise ValueError(f"task '{task.name}': multilabel tasks are not supported by boosting models")
        y = data.y[task.name].numpy()[m]
        if task.kind is TaskKind.REGRESSION:
            y = (y.astype(np.float64) - task.y_mean) / task.y_std
        else:
            y = y.astype(np.int64)
        xs.append(X[m])
        ys.append(y)
        ts.append(np.full(int(m.sum()), k, dtype=np.int64))
    return np.concatenate(xs), np.concatenate(ys), np.concatenate(ts)


class BoostedModel(MultiTaskModel):
    """A fitted boosting estimator behind the model contract: ``forward(x) -> {task: raw score}``.

    Every task is predicted for every row (as the networks do); raw scores are standardised values
    for regression, logits for binary tasks and ``(N, C)`` logits for multiclass tasks. It has no
    parameters: training happens in the estimator's ``fit``, not in the trainer.
    """

    def __init__(self, tasks: list[Task], input_spec: InputSpec, estimator: Any, name: str, params: dict) -> None:
        super().__init__(tasks, input_spec)
        self.estimator = estimator
        self.booster_name = name
        self.booster_params = dict(params)
        self.n_unlabelled_rows = 0  # training rows left out for want of any label

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        X = features(x)
        est = self.estimator
        if hasattr(est, "raw_scores_per_task"):  # R-MTGB / MT-GB: shared trees evaluated once for all tasks
            F = est.raw_scores_per_task(X)
            if isinstance(est, MultiTaskGradientBoostingRegressor):
                F = F * est.y_scale_ + est.y_mean_
        else:
            F = np.stack([np.asarray(est._raw_predict(X, np.full(len(X), k))) for k in range(len(self.tasks))])
        out = {}
        for k, task in enumerate(self.tasks):
            raw = F[k][:, 0] if F[k].shape[1] == 1 else F[k]
            out[task.name] = torch.as_tensor(raw, dtype=torch.float32)
        return out, []

    def task_parameter_names(self, task: str) -> list[str]:
        self._task_index(task)
        return []


def fit_boosted(
    name: str, tasks: list[Task], input_spec: InputSpec, data: TaskTensors, seed: int = 0, **params: Any
) -> BoostedModel:
    """Fit the boosting model ``name`` on the labelled rows of ``data``.

    Rows without any label (NaN or missing targets) are left out, counted in a warning and in the
    model's ``n_unlabelled_rows`` (saved with it).
    """
    est = build_booster(name, tasks, seed, **params)
    labelled = torch.zeros(len(next(iter(data.mask.values()))), dtype=torch.bool)
    for task in tasks:
        m = data.mask[task.name].bool()
        labelled |= m if m.ndim == 1 else m.any(dim=1)
    n_unlabelled = int((~labelled).sum())
    if n_unlabelled:
        warnings.warn(
            f"{n_unlabelled} of {len(labelled)} training row(s) have no label (NaN or missing target) and are left "
            f"out of the {name} fit",
            stacklevel=2,
        )
    X, y, t = stack_tasks(data, tasks)
    if len(np.unique(t)) < len(tasks):
        absent = [tasks[k].name for k in range(len(tasks)) if k not in set(t.tolist())]
        raise ValueError(f"task(s) {absent[:5]} have no labelled training rows; a boosting model cannot fit them")
    # The estimator sees task indices; name the task here so the message says which one.
    counts = np.bincount(t, minlength=len(tasks))
    small = [k for k in range(len(tasks)) if counts[k] < MIN_TASK_ROWS]
    if small:
        more = f" (and {len(small) - 1} more task(s))" if len(small) > 1 else ""
        raise ValueError(
            f"task '{tasks[small[0]].name}' has {counts[small[0]]} labelled training row(s){more}; a boosting model "
            f"needs at least {MIN_TASK_ROWS} per task: drop or merge the smallest tasks, or give them more rows"
        )
    est.fit(X, y, task=t)
    model = BoostedModel(tasks, input_spec, est, name, params)
    model.n_unlabelled_rows = n_unlabelled
    return model


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_boosted(path: str | os.PathLike[str], model: BoostedModel, meta: dict[str, Any]) -> Path:
    """Write the model (trees as JSON arrays) and ``meta`` to ``path`` atomically; nothing is pickled."""
    doc = {
        "format": BOOSTER_FORMAT,
        "booster": {"name": model.booster_name, "params": model.booster_params},
        "n_unlabelled_rows": model.n_unlabelled_rows,
        "estimator": model.estimator.to_dict(),
        "tasks": [t.to_dict() for t in model.tasks],
        "input_spec": model.input_spec.to_dict(),
        **meta,
    }
    p = Path(path)
    _atomic_write(p, json.dumps(doc))
    return p


def load_boosted(path: str | os.PathLike[str]) -> tuple[BoostedModel, dict[str, Any]]:
    """Read a model written by :func:`save_boosted`; returns it and the whole JSON document."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"boosting model file {p} does not exist") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"boosting model file {p} is not valid JSON ({e}); it is truncated or corrupted") from None
    if not isinstance(doc, dict) or doc.get("format") != BOOSTER_FORMAT:
        raise ValueError(
            f"{p} is not a {BOOSTER_FORMAT} file (format: {doc.get('format') if isinstance(doc, dict) else None!r})"
        )
    est_doc = doc["estimator"]
    classes = {c.__name__: c for pair in (BOOSTERS[n].cls for n in BOOSTERS) for c in pair}
    if est_doc.get("class") not in classes:
        raise ValueError(f"{p}: unknown estimator class {est_doc.get('class')!r}")
    est = classes[est_doc["class"]].from_dict(est_doc)
    tasks = [Task.from_dict(t) for t in doc["tasks"]]
    spec = InputSpec.from_dict(doc["input_spec"])
    b = doc["booster"]
    model = BoostedModel(tasks, spec, est, b["name"], b["params"])
    model.n_unlabelled_rows = int(doc.get("n_unlabelled_rows", 0))
    return model, doc
