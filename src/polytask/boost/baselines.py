"""Tree baselines for task-indexed data, with the estimators' ``fit(X, y, task=...)`` interface.

* :class:`PerTaskGradientBoosting` — one scikit-learn ``HistGradientBoosting*`` model per task (the
  single-task baseline: no sharing at all);
* :class:`PooledGradientBoosting` — one ``HistGradientBoosting*`` model on all rows with the task id
  as a categorical feature (full sharing; the trees may still split on the task).

Both are scikit-learn's histogram gradient boosting (Ke et al., "LightGBM: A Highly Efficient
Gradient Boosting Decision Tree", NeurIPS 2017, is the algorithm it follows), or LightGBM itself with
``tree_backend='lightgbm'`` (the same parameter names, mapped to LightGBM's; optional dependency);
fitted models are kept as :class:`~polytask.boost._trees.HGBRaw` arrays so they save to JSON and
reload exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit, softmax
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

from polytask.boost._base import TaskIndexedMixin
from polytask.boost._lightgbm import check_tree_backend, fit_lightgbm_booster, import_lightgbm
from polytask.boost._trees import HGBRaw

__all__ = [
    "PerTaskGradientBoostingClassifier",
    "PerTaskGradientBoostingRegressor",
    "PooledGradientBoostingClassifier",
    "PooledGradientBoostingRegressor",
]

# HistGradientBoosting's categorical features take at most max_bins (255) categories.
_MAX_CATEGORICAL_TASKS = 255


class _HGBBase(TaskIndexedMixin):
    def __init__(
        self,
        *,
        max_iter: int = 100,
        learning_rate: float = 0.1,
        max_leaf_nodes: int | None = 31,
        max_depth: int | None = None,
        min_samples_leaf: int = 20,
        l2_regularization: float = 0.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        tree_backend: str = "sklearn",
        random_state: int | None = None,
    ) -> None:
        self.max_iter = max_iter
        self.learning_rate = learning_rate
        self.max_leaf_nodes = max_leaf_nodes
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.l2_regularization = l2_regularization
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.tree_backend = tree_backend
        self.random_state = random_state

    _classifier = False

    def _check_backend(self) -> None:
        check_tree_backend(self.tree_backend)
        if self.tree_backend == "lightgbm":
            import_lightgbm()

    def _fit_raw(self, X: np.ndarray, y: np.ndarray, categorical: list[int] | None = None) -> HGBRaw:
        """One boosted model on ``(X, y)`` (y as class codes for classifiers) as raw-score trees."""
        n_rows = len(X)
        # A task with fewer rows than min_samples_leaf could not split at all.
        leaf = max(1, min(int(self.min_samples_leaf), n_rows // 2))
        early = bool(self.early_stopping) and n_rows >= 20
        # the settings both tree libraries take under these names
        shared = {
            "max_iter": self.max_iter,
            "learning_rate": self.learning_rate,
            "max_leaf_nodes": self.max_leaf_nodes,
            "max_depth": self.max_depth,
            "min_samples_leaf": leaf,
            "l2_regularization": self.l2_regularization,
            "early_stopping": early,
        }
        if self.tree_backend == "lightgbm":
            return fit_lightgbm_booster(
                X,
                y,
                n_classes=len(self.classes_) if self._classifier else 0,
                validation_fraction=self.validation_fraction,
                seed=self.random_state,
                categorical=categorical,
                **shared,
            )
        cls = HistGradientBoostingClassifier if self._classifier else HistGradientBoostingRegressor
        model = cls(
            validation_fraction=self.validation_fraction if early else None,
            random_state=self.random_state,
            categorical_features=categorical,
            **shared,
        )
        return HGBRaw.from_model(model.fit(X, y))

    def _encode(self, y: np.ndarray) -> np.ndarray:
        if not self._classifier:
            return np.asarray(y, dtype=np.float64)
        from sklearn.utils.multiclass import check_classification_targets

        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has 1 class ({self.classes_[0]!r}); a classifier needs samples of at least 2 classes")
        return codes

    def _n_outputs(self) -> int:
        return len(self.classes_) if self._classifier and len(self.classes_) > 2 else 1

    def _raw(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _raw_predict(self, X: Any, task: Any = None) -> np.ndarray:
        X, codes = self._validate_predict(X, task)
        return self._raw(X, codes)

    # Regression / classification front ends (mixins pick the right ones).
    def predict(self, X: Any, task: Any = None) -> np.ndarray:
        F = self._raw_predict(X, task)
        if not self._classifier:
            return F[:, 0]
        return self.classes_[np.argmax(self._proba(F), axis=1)]

    def _proba(self, F: np.ndarray) -> np.ndarray:
        if F.shape[1] == 1:
            p = expit(F[:, 0])
            return np.column_stack([1 - p, p])
        return softmax(F, axis=1)

    def _classes_state(self) -> dict[str, Any]:
        if not self._classifier:
            return {}
        kind = "str" if self.classes_.dtype.kind in "UO" else ("float" if self.classes_.dtype.kind == "f" else "int")
        return {"classes": self.classes_.tolist(), "classes_type": kind}

    def _load_classes_state(self, d: dict[str, Any]) -> None:
        if self._classifier:
            dtype = {"str": str, "float": np.float64, "int": np.int64}[d["classes_type"]]
            self.classes_ = np.asarray(d["classes"], dtype=dtype)


class _PerTask(_HGBBase):
    def fit(self, X: Any, y: Any, task: Any = None) -> Any:
        self._check_backend()
        X, y, codes = self._validate_fit(X, y, task, y_numeric=not self._classifier)
        yc = self._encode(y)
        self.models_: list[HGBRaw | float | np.ndarray] = []
        for r in range(self.n_tasks_):
            rows = codes == r
            if self._classifier and len(np.unique(yc[rows])) < len(self.classes_):
                # HistGradientBoosting cannot fit a task that lacks a class: use its class frequencies.
                freq = np.bincount(yc[rows], minlength=len(self.classes_)) + 0.5
                p = freq / freq.sum()
                const = np.log(p[1] / p[0])[None] if len(self.classes_) == 2 else np.log(p)
                self.models_.append(np.asarray(const, dtype=np.float64))
                continue
            self.models_.append(self._fit_raw(X[rows], yc[rows]))
        self.n_iter_ = max((len(m.stages) for m in self.models_ if isinstance(m, HGBRaw)), default=0)
        return self

    def _raw(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        F = np.zeros((len(X), self._n_outputs()))
        for r in np.unique(codes):
            rows = codes == r
            m = self.models_[r]
            F[rows] = m.predict_raw(X[rows]) if isinstance(m, HGBRaw) else np.tile(m, (int(rows.sum()), 1))
        return F

    def _fitted_state(self) -> dict[str, Any]:
        models = [{"hgb": m.to_dict()} if isinstance(m, HGBRaw) else {"constant": m.tolist()} for m in self.models_]
        return {"models": models, **self._classes_state()}

    def _load_fitted_state(self, d: dict[str, Any]) -> None:
        self.models_ = [
            HGBRaw.from_dict(m["hgb"]) if "hgb" in m else np.asarray(m["constant"], dtype=np.float64)
            for m in d["models"]
        ]
        self.n_iter_ = max((len(m.stages) for m in self.models_ if isinstance(m, HGBRaw)), default=0)
        self._load_classes_state(d)


class _Pooled(_HGBBase):
    def _with_task(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        # The task code goes first, as HGBRaw requires of categorical columns.
        return np.column_stack([codes.astype(np.float64), X])

    def fit(self, X: Any, y: Any, task: Any = None) -> Any:
        self._check_backend()
        X, y, codes = self._validate_fit(X, y, task, y_numeric=not self._classifier)
        yc = self._encode(y)
        categorical = self.n_tasks_ <= _MAX_CATEGORICAL_TASKS and self.n_tasks_ > 1
        self.task_categorical_ = categorical
        self.model_ = self._fit_raw(self._with_task(X, codes), yc, categorical=[0] if categorical else None)
        self.n_iter_ = len(self.model_.stages)
        return self

    def _raw(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        return self.model_.predict_raw(self._with_task(X, codes))

    def _fitted_state(self) -> dict[str, Any]:
        return {"model": self.model_.to_dict(), "task_categorical": self.task_categorical_, **self._classes_state()}

    def _load_fitted_state(self, d: dict[str, Any]) -> None:
        self.model_ = HGBRaw.from_dict(d["model"])
        self.n_iter_ = len(self.model_.stages)
        self.task_categorical_ = bool(d["task_categorical"])
        self._load_classes_state(d)


class _ClassifierFront:
    _classifier = True

    def predict_proba(self, X: Any, task: Any = None) -> np.ndarray:
        return self._proba(self._raw_predict(X, task))  # type: ignore[attr-defined]

    def decision_function(self, X: Any, task: Any = None) -> np.ndarray:
        F = self._raw_predict(X, task)  # type: ignore[attr-defined]
        return F[:, 0] if F.shape[1] == 1 else F


class PerTaskGradientBoostingRegressor(RegressorMixin, _PerTask):
    """One ``HistGradientBoostingRegressor`` (or LightGBM booster, ``tree_backend='lightgbm'``) per task
    (``min_samples_leaf`` is capped at half a task's rows)."""


class PerTaskGradientBoostingClassifier(_ClassifierFront, ClassifierMixin, _PerTask):
    """One ``HistGradientBoostingClassifier`` per task; a task lacking a class predicts its smoothed class
    frequencies."""


class PooledGradientBoostingRegressor(RegressorMixin, _Pooled):
    """One ``HistGradientBoostingRegressor`` on all tasks, the task id a categorical feature (up to 255 tasks,
    else an ordinal one)."""


class PooledGradientBoostingClassifier(_ClassifierFront, ClassifierMixin, _Pooled):
    """One ``HistGradientBoostingClassifier`` on all tasks, the task id a categorical feature."""
