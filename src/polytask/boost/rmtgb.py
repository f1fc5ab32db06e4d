"""Robust Multi-Task Gradient Boosting (R-MTGB), and plain multi-task gradient boosting (MT-GB).

Emami, Martínez-Muñoz & Hernández-Lobato, "Robust-Multi-Task Gradient Boosting", Expert Systems with
Applications, 2025 (arXiv:2507.11411; reference code GAA-UAM/R-MTGB). For the task ``r(i)`` of row
``i`` the model's raw score is

    F(x_i) = F0 + M(x_i) + s_r O(x_i) + (1 - s_r) N(x_i) + T_r(x_i),     s_r = sigmoid(theta_r),

built by three sequential boosting blocks of regression trees (scikit-learn ``DecisionTreeRegressor``, or
LightGBM's histogram trees with ``tree_backend='lightgbm'``):

1. ``n_estimators`` shared trees ``M`` fitted to the pooled negative gradients of all tasks;
2. ``n_outlier_estimators`` pairs of shared trees: ``O`` fitted to ``s_r * g`` (the "outlier"
   function) and ``N`` to ``(1 - s_r) * g`` (the "non-outlier" function), each followed by a gradient
   step on every task's ``theta_r`` (with optional L2 regularisation ``theta_l2``). Tasks whose
   residuals disagree with the majority are pushed towards ``O``; ``outlier_scores_ = s_r``;
3. ``n_task_estimators`` trees per task ``T_r`` fitted to that task's residuals only.

With ``n_outlier_estimators=0`` block 2 is skipped: shared trees then task-specific trees, the
multi-task gradient boosting (MT-GB) that the paper compares against.

Choices where this implementation is more specific than the paper or the reference code (all
named so they can be checked):

* leaf values are Newton steps of the loss for the leaf's contribution (``sum w g / sum w^2 h``):
  for squared error in blocks 1 and 3 this is the tree's own leaf mean (as in the reference); for
  log-loss it is Friedman's Newton step, which the reference (a plain gradient step) lacks;
* regression targets are standardised before fitting, so ``theta_learning_rate`` does not depend on
  the units of ``y``; the ``theta`` gradient is the *mean* over a task's rows (the reference sums,
  so large tasks move faster);
* the two functions of block 2 are interchangeable (``theta -> -theta`` with ``O`` and ``N``
  swapped is the same model); after block 2 they are oriented so that the median task scores below
  0.5, which makes ``outlier_scores_`` mean "distance from the majority" and not an arbitrary side;
* with ``tree_backend='lightgbm'`` each weak learner is one least-squares LightGBM tree (binned features,
  ``num_leaves = 2**max_depth``) whose leaves get the same Newton values; it fits single-output trees,
  so it serves regression and binary classification;
* early stopping (``early_stopping=True``) holds out ``validation_fraction`` of every task's rows,
  stops blocks 1 and 2 on the pooled validation loss and block 3 per task on that task's loss.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import expit, logsumexp, softmax
from sklearn import config_context
from sklearn.base import ClassifierMixin, RegressorMixin
from sklearn.tree import DecisionTreeRegressor
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from polytask.boost._base import MIN_TASK_ROWS, TaskIndexedMixin
from polytask.boost._lightgbm import LightGBMTreeFitter, check_tree_backend, fit_lightgbm_tree, import_lightgbm
from polytask.boost._trees import ArrayTree

__all__ = ["MultiTaskGradientBoostingClassifier", "MultiTaskGradientBoostingRegressor"]

_EPS = 1e-12


# ----------------------------------------------------------------------------- losses
class _Loss:
    """Negative gradient ``g``, Hessian diagonal ``h`` and per-row loss of raw scores ``F (n, K)``."""

    name = ""
    newton_scale = 1.0

    def grad(self, Y: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def loss(self, Y: np.ndarray, F: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _Squared(_Loss):
    name = "squared_error"

    def grad(self, Y: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return Y - F, np.ones_like(F)

    def loss(self, Y: np.ndarray, F: np.ndarray) -> np.ndarray:
        return 0.5 * ((Y - F) ** 2).sum(axis=1)


class _Logistic(_Loss):
    name = "log_loss"

    def grad(self, Y: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = expit(F)
        return Y - p, p * (1 - p)

    def loss(self, Y: np.ndarray, F: np.ndarray) -> np.ndarray:
        return (np.logaddexp(0, F) - Y * F).sum(axis=1)


class _Softmax(_Loss):
    name = "log_loss"

    def __init__(self, k: int) -> None:
        self.newton_scale = (k - 1) / k  # Friedman's multiclass Newton step (as in scikit-learn)

    def grad(self, Y: np.ndarray, F: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = softmax(F, axis=1)
        return Y - p, p * (1 - p)

    def loss(self, Y: np.ndarray, F: np.ndarray) -> np.ndarray:
        return logsumexp(F, axis=1) - (Y * F).sum(axis=1)


class _Stopper:
    """Best score so far and how many steps ago it was seen."""

    def __init__(self, patience: int, tol: float) -> None:
        self.patience, self.tol = patience, tol
        self.best, self.best_step, self.step = np.inf, 0, 0

    def update(self, value: float) -> bool:
        """Record the loss after one more step; True when training should stop."""
        self.step += 1
        if value < self.best - self.tol:
            self.best, self.best_step = value, self.step
        return self.step - self.best_step >= self.patience


# ----------------------------------------------------------------------------- the estimator
class _BaseRMTGB(TaskIndexedMixin):
    _estimator_type_name = ""

    def __init__(
        self,
        *,
        n_estimators: int = 100,
        n_outlier_estimators: int = 100,
        n_task_estimators: int = 50,
        learning_rate: float = 0.1,
        theta_learning_rate: float = 20.0,
        theta_l2: float = 0.0,
        max_depth: int | None = 3,
        min_samples_leaf: int = 1,
        subsample: float = 1.0,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        n_iter_no_change: int = 10,
        tol: float = 1e-7,
        tree_backend: str = "sklearn",
        random_state: int | None = None,
    ) -> None:
        self.n_estimators = n_estimators
        self.n_outlier_estimators = n_outlier_estimators
        self.n_task_estimators = n_task_estimators
        self.learning_rate = learning_rate
        self.theta_learning_rate = theta_learning_rate
        self.theta_l2 = theta_l2
        self.max_depth = max_depth
        self.min_samples_leaf = min_samples_leaf
        self.subsample = subsample
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.n_iter_no_change = n_iter_no_change
        self.tol = tol
        self.tree_backend = tree_backend
        self.random_state = random_state

    # ------------------------------------------------------------------ checks
    def _check_params(self) -> None:
        for name in ("n_estimators", "n_outlier_estimators", "n_task_estimators"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.n_estimators + self.n_outlier_estimators + self.n_task_estimators == 0:
            raise ValueError("n_estimators, n_outlier_estimators and n_task_estimators are all 0; nothing to fit")
        for name in ("learning_rate", "theta_learning_rate"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and np.isfinite(v)):
                raise ValueError(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.theta_l2, (int, float)) and self.theta_l2 >= 0):
            raise ValueError(f"theta_l2 must be >= 0, got {self.theta_l2!r}")
        if self.max_depth is not None and (not isinstance(self.max_depth, (int, np.integer)) or self.max_depth < 1):
            raise ValueError(f"max_depth must be None or an int >= 1, got {self.max_depth!r}")
        if not (isinstance(self.min_samples_leaf, (int, np.integer)) and self.min_samples_leaf >= 1):
            raise ValueError(f"min_samples_leaf must be an int >= 1, got {self.min_samples_leaf!r}")
        if not (isinstance(self.subsample, (int, float)) and 0 < self.subsample <= 1):
            raise ValueError(f"subsample must be in (0, 1], got {self.subsample!r}")
        if not (isinstance(self.validation_fraction, (int, float)) and 0 < self.validation_fraction < 1):
            raise ValueError(f"validation_fraction must be in (0, 1), got {self.validation_fraction!r}")
        if not (isinstance(self.n_iter_no_change, (int, np.integer)) and self.n_iter_no_change >= 1):
            raise ValueError(f"n_iter_no_change must be an int >= 1, got {self.n_iter_no_change!r}")
        check_tree_backend(self.tree_backend)
        if self.tree_backend == "lightgbm":
            import_lightgbm()

    # ------------------------------------------------------------------ hooks for regressor/classifier
    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _make_loss(self) -> _Loss:
        raise NotImplementedError

    def _initial_score(self, Y: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    # ------------------------------------------------------------------ fitting
    def _split_validation(self, codes: np.ndarray, rng: np.random.RandomState) -> np.ndarray:
        """Boolean mask of validation rows: ``validation_fraction`` of each task, keeping 2 training rows."""
        val = np.zeros(len(codes), dtype=bool)
        for r in range(self.n_tasks_):
            rows = np.flatnonzero(codes == r)
            n_val = min(round(len(rows) * self.validation_fraction), len(rows) - MIN_TASK_ROWS)
            if n_val > 0:
                val[rng.permutation(rows)[:n_val]] = True
        return val

    def _tree(self, rng: np.random.RandomState) -> DecisionTreeRegressor:
        return DecisionTreeRegressor(
            max_depth=self.max_depth,
            min_samples_leaf=self.min_samples_leaf,
            random_state=rng.randint(np.iinfo(np.int32).max),
        )

    def _fit_tree(
        self,
        X: np.ndarray,
        g: np.ndarray,
        h: np.ndarray,
        w: np.ndarray,
        inbag: np.ndarray,
        rng: np.random.RandomState,
    ) -> tuple[ArrayTree, np.ndarray]:
        """A tree fitted to ``w * g`` on the in-bag rows with Newton leaf values; its values on all rows."""
        target = np.ascontiguousarray(w[:, None] * g)
        if self.tree_backend == "lightgbm":
            seed = rng.randint(np.iinfo(np.int32).max)
            kw = {"max_depth": self.max_depth, "min_samples_leaf": self.min_samples_leaf, "seed": seed}
            if inbag.all():
                # Blocks fit many trees on the same rows: one Dataset and Booster for all of them.
                if self._lgb_fitter is None or self._lgb_fitter.X is not X:
                    self._lgb_fitter = LightGBMTreeFitter(X, **kw)
                out = self._lgb_fitter.fit(target[:, 0])
            else:
                out = fit_lightgbm_tree(X[inbag], target[inbag, 0], **kw)
            return out, self._newton_values(out, out.apply(X), g, h, w, inbag)
        # X is float32 C-ordered already (what the trees use); skipping the per-tree checks is what
        # scikit-learn's own gradient boosting does, and is most of the fitting time on small tasks.
        tree = self._tree(rng).fit(X[inbag], target[inbag], check_input=False)
        out = ArrayTree.from_sklearn(tree)
        return out, self._newton_values(out, tree.apply(X, check_input=False), g, h, w, inbag)

    def _newton_values(
        self, out: ArrayTree, leaves: np.ndarray, g: np.ndarray, h: np.ndarray, w: np.ndarray, inbag: np.ndarray
    ) -> np.ndarray:
        """Sets the tree's leaf values to Newton steps on the in-bag rows; returns the values of all rows."""
        n_nodes = len(out.left)
        lin = leaves[inbag]
        win = w[inbag]
        values = np.zeros((n_nodes, g.shape[1]))
        for k in range(g.shape[1]):
            num = np.bincount(lin, weights=win * g[inbag, k], minlength=n_nodes)
            den = np.bincount(lin, weights=win**2 * h[inbag, k], minlength=n_nodes)
            values[:, k] = np.where(den > _EPS, num / np.maximum(den, _EPS), 0.0) * self._loss.newton_scale
        out.value = values
        return values[leaves]

    def _inbag(self, n: int, rng: np.random.RandomState) -> np.ndarray:
        if self.subsample >= 1.0:
            return np.ones(n, dtype=bool)
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, max(1, int(self.subsample * n)), replace=False)] = True
        return mask

    def _fit(self, X: Any, y: Any, task: Any, y_numeric: bool) -> Any:
        self._check_params()
        X, y, codes = self._validate_fit(X, y, task, y_numeric=y_numeric)
        self._lgb_fitter: LightGBMTreeFitter | None = None
        try:
            with config_context(skip_parameter_validation=True):
                return self._fit_blocks(np.ascontiguousarray(X, dtype=np.float32), y, codes)
        finally:
            self._lgb_fitter = None

    def _fit_blocks(self, X: np.ndarray, y: np.ndarray, codes: np.ndarray) -> Any:
        Y = self._encode_target(y)
        if self.tree_backend == "lightgbm" and Y.shape[1] > 1:
            raise ValueError(
                f"tree_backend='lightgbm' fits single-output trees, so it serves regression and binary tasks; "
                f"y has {Y.shape[1]} classes: use tree_backend='sklearn'"
            )
        self._loss = self._make_loss()
        rng = check_random_state(self.random_state)
        T = self.n_tasks_
        val = self._split_validation(codes, rng) if self.early_stopping else np.zeros(len(codes), bool)
        tr = ~val
        Xt, Yt, ct = X[tr], Y[tr], codes[tr]
        Xv, Yv, cv = X[val], Y[val], codes[val]
        lr = float(self.learning_rate)
        loss = self._loss
        K = Yt.shape[1]

        self.init_ = self._initial_score(Yt)
        base_t = np.tile(self.init_, (len(Xt), 1))
        base_v = np.tile(self.init_, (len(Xv), 1))

        # Block 1: shared trees on the pooled gradients.
        self.shared_trees_: list[ArrayTree] = []
        stop = _Stopper(self.n_iter_no_change, self.tol)
        ones = np.ones(len(Xt))
        for _ in range(self.n_estimators):
            g, h = loss.grad(Yt, base_t)
            tree, inc = self._fit_tree(Xt, g, h, ones, self._inbag(len(Xt), rng), rng)
            self.shared_trees_.append(tree)
            base_t += lr * inc
            if len(Xv):
                base_v += lr * tree.predict(Xv)
                if stop.update(float(loss.loss(Yv, base_v).mean())):
                    break
        if len(Xv) and stop.best_step < len(self.shared_trees_):
            for tree in self.shared_trees_[stop.best_step :]:
                base_t -= lr * tree.predict(Xt)
                base_v -= lr * tree.predict(Xv)
            self.shared_trees_ = self.shared_trees_[: stop.best_step]

        # Block 2: outlier / non-outlier functions mixed per task by sigmoid(theta).
        theta = rng.normal(0.0, 0.1, size=T)
        out_t, non_t = np.zeros((len(Xt), K)), np.zeros((len(Xt), K))
        out_v, non_v = np.zeros((len(Xv), K)), np.zeros((len(Xv), K))
        self.outlier_trees_: list[ArrayTree] = []
        self.inlier_trees_: list[ArrayTree] = []
        stop = _Stopper(self.n_iter_no_change, self.tol)
        history = [theta.copy()]
        counts = np.bincount(ct, minlength=T).astype(np.float64)
        for _ in range(self.n_outlier_estimators):
            s = expit(theta)[ct]
            g, h = loss.grad(Yt, base_t + s[:, None] * out_t + (1 - s)[:, None] * non_t)
            inbag = self._inbag(len(Xt), rng)
            tree_o, inc_o = self._fit_tree(Xt, g, h, s, inbag, rng)
            tree_n, inc_n = self._fit_tree(Xt, g, h, 1 - s, inbag, rng)
            out_t += lr * inc_o
            non_t += lr * inc_n
            self.outlier_trees_.append(tree_o)
            self.inlier_trees_.append(tree_n)
            # Gradient step on theta at the updated functions: dL/dtheta_r = -mean_r g . s'(theta_r) (O - N).
            g, _ = loss.grad(Yt, base_t + s[:, None] * out_t + (1 - s)[:, None] * non_t)
            per_row = (g * (out_t - non_t)).sum(axis=1) * s * (1 - s)
            grad_theta = -np.bincount(ct, weights=per_row, minlength=T) / np.maximum(counts, 1) + self.theta_l2 * theta
            theta = theta - self.theta_learning_rate * grad_theta
            history.append(theta.copy())
            if len(Xv):
                out_v += lr * tree_o.predict(Xv)
                non_v += lr * tree_n.predict(Xv)
                sv = expit(theta)[cv][:, None]
                if stop.update(float(loss.loss(Yv, base_v + sv * out_v + (1 - sv) * non_v).mean())):
                    break
        if len(Xv) and stop.best_step < len(self.outlier_trees_):
            for tree_o, tree_n in zip(
                self.outlier_trees_[stop.best_step :], self.inlier_trees_[stop.best_step :], strict=True
            ):
                out_t -= lr * tree_o.predict(Xt)
                non_t -= lr * tree_n.predict(Xt)
            self.outlier_trees_ = self.outlier_trees_[: stop.best_step]
            self.inlier_trees_ = self.inlier_trees_[: stop.best_step]
            theta = history[stop.best_step]
        if self.outlier_trees_:
            # O and N are interchangeable; orient them so that the median task leans to N.
            if np.median(expit(theta)) > 0.5:
                theta = -theta
                self.outlier_trees_, self.inlier_trees_ = self.inlier_trees_, self.outlier_trees_
                out_t, non_t = non_t, out_t
            self.theta_ = theta
            self.outlier_scores_ = expit(theta)
        else:
            self.theta_ = np.zeros(T)
            self.outlier_scores_ = None
        s = expit(self.theta_)[ct][:, None]
        base_t = base_t + s * out_t + (1 - s) * non_t
        if len(Xv):
            sv = expit(self.theta_)[cv][:, None]
            base_v = base_v + sv * out_v + (1 - sv) * non_v

        # Block 3: task-specific trees on each task's residuals.
        self.task_trees_: list[list[ArrayTree]] = []
        for r in range(T):
            rows, vrows = np.flatnonzero(ct == r), np.flatnonzero(cv == r)
            Xr, Yr, Fr = Xt[rows], Yt[rows], base_t[rows]
            Xvr, Yvr, Fvr = Xv[vrows], Yv[vrows], base_v[vrows].copy()
            trees: list[ArrayTree] = []
            stop = _Stopper(self.n_iter_no_change, self.tol)
            wr = np.ones(len(rows))
            for _ in range(self.n_task_estimators):
                g, h = loss.grad(Yr, Fr)
                inbag = self._inbag(len(rows), rng)
                if inbag.sum() < MIN_TASK_ROWS:
                    inbag[:] = True
                tree, inc = self._fit_tree(Xr, g, h, wr, inbag, rng)
                trees.append(tree)
                Fr = Fr + lr * inc
                if len(vrows):
                    Fvr += lr * tree.predict(Xvr)
                    if stop.update(float(loss.loss(Yvr, Fvr).mean())):
                        break
            if len(vrows):
                trees = trees[: stop.best_step]
            self.task_trees_.append(trees)
        self.n_task_trees_ = np.array([len(t) for t in self.task_trees_])
        return self

    # ------------------------------------------------------------------ prediction
    def _shared_scores(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """``F0 + M(X)`` and the summed outlier / non-outlier tree outputs (learning rate applied)."""
        lr = float(self.learning_rate)
        F = np.tile(self.init_, (len(X), 1))
        for tree in self.shared_trees_:
            F += lr * tree.predict(X)
        if not self.outlier_trees_:
            return F, None, None
        out = lr * sum(tree.predict(X) for tree in self.outlier_trees_)
        non = lr * sum(tree.predict(X) for tree in self.inlier_trees_)
        return F, out, non

    def _task_scores(self, X: np.ndarray, r: int, shared: tuple) -> np.ndarray:
        F, out, non = shared
        F = F.copy()
        if out is not None:
            s = expit(self.theta_[r])
            F += s * out + (1 - s) * non
        for tree in self.task_trees_[r]:
            F += float(self.learning_rate) * tree.predict(X)
        return F

    def _raw_predict(self, X: Any, task: Any = None) -> np.ndarray:
        X, codes = self._validate_predict(X, task)
        shared = self._shared_scores(X)
        F = np.empty_like(shared[0])
        for r in np.unique(codes):
            rows = np.flatnonzero(codes == r)
            F[rows] = self._task_scores(X[rows], r, tuple(None if a is None else a[rows] for a in shared))
        return F

    def raw_scores_per_task(self, X: Any) -> np.ndarray:
        """Raw scores of every row of ``X`` under every task, ``(n_tasks, n_rows, n_outputs)``: regression
        values in the standardised units the model is fitted in, or logits (shared trees run once)."""
        X, _ = self._validate_predict(X, None if self._single_task else np.repeat(self.tasks_[:1], len(X)))
        shared = self._shared_scores(X)
        return np.stack([self._task_scores(X, r, shared) for r in range(self.n_tasks_)])

    @property
    def outlier_tasks_(self) -> np.ndarray:
        """Task ids whose outlier score is above 0.5 (empty without block 2)."""
        check_is_fitted(self, "tasks_")
        if self.outlier_scores_ is None:
            return self.tasks_[:0]
        return self.tasks_[self.outlier_scores_ > 0.5]

    # ------------------------------------------------------------------ JSON state
    def _fitted_state(self) -> dict[str, Any]:
        return {
            "init": self.init_.tolist(),
            "theta": self.theta_.tolist(),
            "block2": bool(self.outlier_trees_),
            "shared": [t.to_dict() for t in self.shared_trees_],
            "outlier": [t.to_dict() for t in self.outlier_trees_],
            "inlier": [t.to_dict() for t in self.inlier_trees_],
            "task": [[t.to_dict() for t in trees] for trees in self.task_trees_],
            **self._target_state(),
        }

    def _load_fitted_state(self, d: dict[str, Any]) -> None:
        self.init_ = np.asarray(d["init"], dtype=np.float64)
        self.theta_ = np.asarray(d["theta"], dtype=np.float64)
        self.shared_trees_ = [ArrayTree.from_dict(t) for t in d["shared"]]
        self.outlier_trees_ = [ArrayTree.from_dict(t) for t in d["outlier"]]
        self.inlier_trees_ = [ArrayTree.from_dict(t) for t in d["inlier"]]
        self.task_trees_ = [[ArrayTree.from_dict(t) for t in trees] for trees in d["task"]]
        self.n_task_trees_ = np.array([len(t) for t in self.task_trees_])
        self.outlier_scores_ = expit(self.theta_) if d["block2"] else None
        self._load_target_state(d)

    def _target_state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _load_target_state(self, d: dict[str, Any]) -> None:
        raise NotImplementedError


class MultiTaskGradientBoostingRegressor(RegressorMixin, _BaseRMTGB):
    """R-MTGB for regression (squared error); ``n_outlier_estimators=0`` gives MT-GB.

    ``fit(X, y, task=...)``: ``task`` holds each row's task id (ints or strings; default: one task).
    Fitted attributes: ``tasks_`` (sorted task ids), ``outlier_scores_`` (``sigmoid(theta_r)`` per
    task, in ``tasks_`` order; ``None`` without block 2), ``outlier_tasks_`` (score > 0.5),
    ``theta_``, the trees of each block, and ``n_task_trees_`` (block-3 trees kept per task).
    ``tree_backend``: ``'sklearn'`` (``DecisionTreeRegressor``) or ``'lightgbm'`` (optional dependency).
    """

    def fit(self, X: Any, y: Any, task: Any = None) -> MultiTaskGradientBoostingRegressor:
        return self._fit(X, y, task, y_numeric=True)

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 1:
            raise ValueError(f"y must be one target per row, got shape {y.shape}")
        self.y_mean_ = float(y.mean())
        std = float(y.std())
        self.y_scale_ = std if std > 0 else 1.0
        return ((y - self.y_mean_) / self.y_scale_)[:, None]

    def _make_loss(self) -> _Loss:
        return _Squared()

    def _initial_score(self, Y: np.ndarray) -> np.ndarray:
        return Y.mean(axis=0)

    def predict(self, X: Any, task: Any = None) -> np.ndarray:
        """Predicted targets of the rows of ``X`` for their tasks."""
        return self._raw_predict(X, task)[:, 0] * self.y_scale_ + self.y_mean_

    def _target_state(self) -> dict[str, Any]:
        return {"y_mean": self.y_mean_, "y_scale": self.y_scale_}

    def _load_target_state(self, d: dict[str, Any]) -> None:
        self.y_mean_, self.y_scale_ = float(d["y_mean"]), float(d["y_scale"])


class MultiTaskGradientBoostingClassifier(ClassifierMixin, _BaseRMTGB):
    """R-MTGB for classification (log-loss: logistic for two classes, softmax for more).

    Classes are shared by all tasks (``classes_``); a task may lack some of them. See
    :class:`MultiTaskGradientBoostingRegressor` for the task arguments and fitted attributes.
    """

    def fit(self, X: Any, y: Any, task: Any = None) -> MultiTaskGradientBoostingClassifier:
        return self._fit(X, y, task, y_numeric=False)

    def _encode_target(self, y: np.ndarray) -> np.ndarray:
        from sklearn.utils.multiclass import check_classification_targets

        check_classification_targets(y)
        self.classes_, codes = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(f"y has 1 class ({self.classes_[0]!r}); a classifier needs samples of at least 2 classes")
        if len(self.classes_) == 2:
            return codes[:, None].astype(np.float64)
        return np.eye(len(self.classes_))[codes]

    def _make_loss(self) -> _Loss:
        return _Logistic() if len(self.classes_) == 2 else _Softmax(len(self.classes_))

    def _initial_score(self, Y: np.ndarray) -> np.ndarray:
        p = np.clip(Y.mean(axis=0), 1e-6, 1 - 1e-6)
        return np.log(p / (1 - p)) if Y.shape[1] == 1 else np.log(p)

    def decision_function(self, X: Any, task: Any = None) -> np.ndarray:
        """Raw scores: logits of the positive class ``(n,)`` for two classes, ``(n, n_classes)`` otherwise."""
        F = self._raw_predict(X, task)
        return F[:, 0] if F.shape[1] == 1 else F

    def predict_proba(self, X: Any, task: Any = None) -> np.ndarray:
        """Class probabilities ``(n, n_classes)`` in ``classes_`` order."""
        F = self._raw_predict(X, task)
        if F.shape[1] == 1:
            p = expit(F[:, 0])
            return np.column_stack([1 - p, p])
        return softmax(F, axis=1)

    def predict(self, X: Any, task: Any = None) -> np.ndarray:
        """Most probable class of each row for its task."""
        proba = self.predict_proba(X, task)
        return self.classes_[np.argmax(proba, axis=1)]

    def _target_state(self) -> dict[str, Any]:
        kind = "str" if self.classes_.dtype.kind in "UO" else ("float" if self.classes_.dtype.kind == "f" else "int")
        return {"classes": self.classes_.tolist(), "classes_type": kind}

    def _load_target_state(self, d: dict[str, Any]) -> None:
        dtype = {"str": str, "float": np.float64, "int": np.int64}[d["classes_type"]]
        self.classes_ = np.asarray(d["classes"], dtype=dtype)
        self._loss = self._make_loss()
