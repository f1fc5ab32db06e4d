"""What every task-indexed boosting estimator shares: input checks, task ids, and JSON state.

The estimators follow scikit-learn's conventions with one extra argument: ``fit(X, y, task=...)``
and ``predict(X, task=...)``, where ``task`` names the task of each row (ints or strings). Without
``task`` every row belongs to one task, so the estimators also work (and are checked) as plain
scikit-learn estimators.
"""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted, validate_data

__all__ = ["MIN_TASK_ROWS", "TaskIndexedMixin", "non_numeric_columns"]

# A task needs two rows: one tree split (or a validation row) is impossible with fewer.
MIN_TASK_ROWS = 2
_FORMAT = "polytask.boost"


def non_numeric_columns(X: Any) -> list[str]:
    """Names (or positions) of columns of ``X`` that hold text or categories rather than numbers."""
    dtypes = getattr(X, "dtypes", None)
    if dtypes is not None:  # a DataFrame
        import pandas as pd

        return [
            str(c)
            for c, dt in dtypes.items()
            if not (pd.api.types.is_numeric_dtype(dt) or pd.api.types.is_bool_dtype(dt))
        ]
    if hasattr(X, "tocsr"):
        return []
    arr = np.asarray(X)
    if arr.ndim != 2 or arr.dtype.kind not in "OUS":
        return []
    if arr.dtype.kind in "US":
        return [str(j) for j in range(arr.shape[1]) if not _all_numbers(arr[:, j])]
    # Object arrays: flag columns holding text; anything else is left to scikit-learn's own check.
    return [
        str(j)
        for j in range(arr.shape[1])
        if any(isinstance(v, str) for v in arr[:, j]) and not _all_numbers(arr[:, j])
    ]


def _all_numbers(col: np.ndarray) -> bool:
    try:
        col.astype(np.float64)
    except (TypeError, ValueError):
        return False
    return True


def _fmt_task(v: Any) -> str:
    """A task id as the user wrote it: ``3`` for numbers, ``'a'`` for strings."""
    v = v.item() if isinstance(v, np.generic) else v
    return repr(v) if isinstance(v, str) else str(v)


def _fmt_tasks(values: Any, limit: int = 8) -> str:
    values = list(values)
    shown = ", ".join(_fmt_task(v) for v in values[:limit])
    return shown + (", ..." if len(values) > limit else "")


class TaskIndexedMixin(BaseEstimator):
    """Validation of ``X``/``y``/``task`` and the fitted task list ``tasks_``.

    Subclasses call :meth:`_validate_fit` in ``fit`` and :meth:`_validate_predict` in ``predict``.
    """

    # ------------------------------------------------------------------ inputs
    def _check_features(self, X: Any) -> None:
        bad = non_numeric_columns(X)
        if bad:
            raise ValueError(
                f"{type(self).__name__} needs numeric features, but column(s) {', '.join(repr(b) for b in bad[:8])} "
                "hold text or categories; encode them first (polytask.data.TableEncoder, or scikit-learn's "
                "OrdinalEncoder / OneHotEncoder)"
            )

    def _task_array(self, task: Any, n: int) -> np.ndarray:
        t = np.asarray(task)
        if t.ndim != 1 or len(t) != n:
            raise ValueError(f"task must be one id per row ({n} rows), got shape {t.shape}")
        if t.dtype.kind == "f" and np.isnan(t).any():
            raise ValueError(f"task holds NaN at row {int(np.argmax(np.isnan(t)))}; every row needs a task id")
        if t.dtype.kind == "O":
            missing = [i for i, v in enumerate(t) if v is None or (isinstance(v, float) and np.isnan(v))]
            if missing:
                raise ValueError(f"task is missing at row {missing[0]}; every row needs a task id")
            kinds = {"str" if isinstance(v, str) else "number" for v in t}
            if len(kinds) > 1:
                raise ValueError("task ids mix strings and numbers; use one type for all ids")
            t = t.astype(str) if kinds == {"str"} else t.astype(np.float64)
        if t.dtype.kind == "f" and np.all(t == np.round(t)):
            t = t.astype(np.int64)
        return t

    def _validate_fit(self, X: Any, y: Any, task: Any, *, y_numeric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Checked ``X`` (float64), ``y`` and task codes ``0..T-1``; sets ``tasks_`` and ``n_tasks_``."""
        self._check_features(X)
        y_arr = np.asarray(y)
        if y_arr.dtype.kind in "fc":
            self._check_target_finite(y_arr.ravel() if y_arr.ndim > 1 else y_arr)
        X, y = validate_data(self, X, y, dtype=np.float64, y_numeric=y_numeric, ensure_min_samples=1)
        n = X.shape[0]
        if task is None:
            labels = np.zeros(n, dtype=np.int64)
            self._single_task = True
        else:
            labels = self._task_array(task, n)
            self._single_task = False
        tasks, codes = np.unique(labels, return_inverse=True)
        counts = np.bincount(codes, minlength=len(tasks))
        small = [(tasks[i], int(c)) for i, c in enumerate(counts) if c < MIN_TASK_ROWS]
        if small:
            name, c = small[0]
            more = f" (and {len(small) - 1} more task(s))" if len(small) > 1 else ""
            raise ValueError(
                f"task {_fmt_task(name)} has {c} sample(s){more}; each task needs at least {MIN_TASK_ROWS} rows to fit "
                "(n_samples=1 cannot be split); drop or merge the smallest tasks"
            )
        self.tasks_ = tasks
        self.n_tasks_ = len(tasks)
        return X, y, codes.astype(np.intp)

    def _validate_predict(self, X: Any, task: Any) -> tuple[np.ndarray, np.ndarray]:
        """Checked ``X`` and the task codes of its rows (known tasks only)."""
        check_is_fitted(self, "tasks_")
        self._check_features(X)
        X = validate_data(self, X, dtype=np.float64, reset=False)
        n = X.shape[0]
        if task is None:
            if not self._single_task:
                raise ValueError(
                    f"task is required: this model was fitted on {self.n_tasks_} tasks ({_fmt_tasks(self.tasks_, 5)}); "
                    "pass predict(X, task=...)"
                )
            return X, np.zeros(n, dtype=np.intp)
        if self._single_task:
            raise ValueError("this model was fitted without task ids (one task); call predict(X) without task")
        labels = self._task_array(task, n)
        fitted_str = self.tasks_.dtype.kind in "UO"
        if (labels.dtype.kind in "UO") != fitted_str:
            got = "strings" if labels.dtype.kind in "UO" else "numbers"
            raise ValueError(
                f"task ids are {got} but the model was fitted with {'strings' if fitted_str else 'numbers'} "
                f"({self.tasks_[:3].tolist()}...); pass ids of the same type"
            )
        codes = np.searchsorted(self.tasks_, labels)
        codes = np.minimum(codes, len(self.tasks_) - 1)
        unknown = self.tasks_[codes] != labels
        if unknown.any():
            raise ValueError(
                f"task(s) {_fmt_tasks(np.unique(labels[unknown]))} were not seen in training; this model knows "
                f"{self.n_tasks_} task(s): {_fmt_tasks(self.tasks_)}"
            )
        return X, codes.astype(np.intp)

    @staticmethod
    def _check_target_finite(y: np.ndarray) -> None:
        bad = ~np.isfinite(y) if y.dtype.kind == "f" else np.zeros(len(y), bool)
        if bad.any():
            raise ValueError(
                f"Input y contains NaN or infinity in {int(bad.sum())} row(s) (first at row {int(np.argmax(bad))}); "
                "drop those rows before fitting"
            )

    # ------------------------------------------------------------------ JSON state
    def _task_state(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks_.tolist(),
            "task_type": "str" if self.tasks_.dtype.kind in "UO" else "int",
            "single_task": bool(self._single_task),
            "n_features_in": int(self.n_features_in_),
            **(
                {"feature_names_in": [str(c) for c in self.feature_names_in_]}
                if hasattr(self, "feature_names_in_")
                else {}
            ),
        }

    def _load_task_state(self, d: dict[str, Any]) -> None:
        self.tasks_ = np.asarray(d["tasks"], dtype=str if d["task_type"] == "str" else np.int64)
        self.n_tasks_ = len(self.tasks_)
        self._single_task = bool(d["single_task"])
        self.n_features_in_ = int(d["n_features_in"])
        if "feature_names_in" in d:
            self.feature_names_in_ = np.asarray(d["feature_names_in"], dtype=object)

    def to_dict(self) -> dict[str, Any]:
        """The fitted model as JSON-ready data (parameters, tasks, trees); :meth:`from_dict` restores it."""
        check_is_fitted(self, "tasks_")
        return {
            "format": _FORMAT,
            "class": type(self).__name__,
            "params": _json_params(self.get_params()),
            "task_state": self._task_state(),
            "fitted": self._fitted_state(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        if d.get("format") != _FORMAT or d.get("class") != cls.__name__:
            raise ValueError(f"not a saved {cls.__name__} (format={d.get('format')!r}, class={d.get('class')!r})")
        est = cls(**d["params"])
        est._load_task_state(d["task_state"])
        est._load_fitted_state(d["fitted"])
        return est

    def _fitted_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_fitted_state(self, d: dict[str, Any]) -> None:
        raise NotImplementedError


def _json_params(params: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in params.items():
        if isinstance(v, np.integer):
            v = int(v)
        elif isinstance(v, np.floating):
            v = float(v)
        elif not (v is None or isinstance(v, (bool, int, float, str))):
            warnings.warn(f"parameter {k}={v!r} is not JSON-serialisable; saved as None", stacklevel=3)
            v = None
        out[k] = v
    return out
