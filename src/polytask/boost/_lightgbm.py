"""LightGBM as an optional tree backend (``tree_backend='lightgbm'``): weak learners and per-task boosters.

Ke et al., "LightGBM: A Highly Efficient Gradient Boosting Decision Tree", NeurIPS 2017. LightGBM is
optional (``pip install polytask[boost]``); it is imported only when a model asks for it. Its fitted
trees are converted to :class:`~polytask.boost._trees.ArrayTree` node arrays (from ``dump_model()``),
so models keep saving to JSON and predicting without LightGBM, exactly as LightGBM would.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polytask.boost._trees import ArrayTree, HGBRaw

__all__ = [
    "TREE_BACKENDS",
    "LightGBMTreeFitter",
    "MissingLightGBM",
    "check_tree_backend",
    "fit_lightgbm_booster",
    "fit_lightgbm_tree",
    "import_lightgbm",
    "tree_from_lightgbm",
]

TREE_BACKENDS = ("sklearn", "lightgbm")
# LightGBM's largest num_leaves: what "no limit" (max_depth=None, max_leaf_nodes=None) maps to.
_MAX_LEAVES = 131072
# HistGradientBoosting's default n_iter_no_change, used as LightGBM's early-stopping rounds.
_N_ITER_NO_CHANGE = 10


class MissingLightGBM(ImportError):
    """``tree_backend='lightgbm'`` was asked for but LightGBM is not installed."""


def check_tree_backend(value: Any) -> None:
    if value not in TREE_BACKENDS:
        raise ValueError(f"tree_backend must be one of {list(TREE_BACKENDS)}, got {value!r}")


def import_lightgbm() -> Any:
    try:
        import lightgbm
    except ImportError:
        raise MissingLightGBM(
            "tree_backend='lightgbm' needs LightGBM, which is not installed: pip install polytask[boost] "
            "(or use tree_backend='sklearn')"
        ) from None
    return lightgbm


def _common_params(seed: int | None) -> dict[str, Any]:
    # force_row_wise skips LightGBM's timing of both layouts (noise on small data); deterministic keeps
    # a seed's model the same run to run.
    p: dict[str, Any] = {"verbose": -1, "force_row_wise": True, "deterministic": True}
    if seed is not None:
        p["seed"] = int(seed)
    return p


def tree_from_lightgbm(info: dict[str, Any], float32_inputs: bool) -> ArrayTree:
    """One tree of ``Booster.dump_model()['tree_info']`` as node arrays (leaf values as LightGBM stores them,
    shrinkage included).

    LightGBM sends a row left when ``x <= threshold``; NaN follows ``default_left`` for ``missing_type='NaN'``
    and is read as 0 for ``'None'``; a categorical node (``'=='``) sends the listed categories left, anything
    else (NaN included) right.
    """
    left: list[int] = []
    right: list[int] = []
    feature: list[int] = []
    threshold: list[float] = []
    value: list[float] = []
    missing_left: list[bool] = []
    is_cat: list[bool] = []
    bitset_idx: list[int] = []
    bitsets: list[np.ndarray] = []
    stack: list[tuple[dict[str, Any], int, str]] = [(info["tree_structure"], -1, "")]
    while stack:
        node, parent, side = stack.pop()
        i = len(left)
        if parent >= 0:
            (left if side == "l" else right)[parent] = i
        left.append(-1)
        right.append(-1)
        if "leaf_value" in node:
            feature.append(0)
            threshold.append(0.0)
            value.append(float(node["leaf_value"]))
            missing_left.append(False)
            is_cat.append(False)
            bitset_idx.append(0)
            continue
        feature.append(int(node["split_feature"]))
        value.append(0.0)
        if node["decision_type"] == "==":
            cats = np.array([int(c) for c in str(node["threshold"]).split("||")], dtype=np.int64)
            if cats.max() >= 256:
                raise ValueError(f"a LightGBM categorical split uses category {cats.max()}; at most 256 are supported")
            words = np.zeros(8, dtype=np.uint32)
            np.bitwise_or.at(words, cats // 32, (np.uint32(1) << (cats % 32).astype(np.uint32)))
            threshold.append(0.0)
            missing_left.append(False)
            is_cat.append(True)
            bitset_idx.append(len(bitsets))
            bitsets.append(words)
        else:
            t = float(node["threshold"])
            threshold.append(t)
            missing_left.append(bool(node["default_left"]) if node["missing_type"] == "NaN" else 0.0 <= t)
            is_cat.append(False)
            bitset_idx.append(0)
        stack.append((node["right_child"], i, "r"))
        stack.append((node["left_child"], i, "l"))
    return ArrayTree(
        np.array(left),
        np.array(right),
        np.array(feature),
        np.array(threshold),
        np.array(value)[:, None],
        missing_left=np.array(missing_left),
        is_categorical=np.array(is_cat),
        bitset_idx=np.array(bitset_idx),
        bitsets=np.stack(bitsets) if bitsets else None,
        float32_inputs=float32_inputs,
    )


def _weak_learner_params(max_depth: int | None, min_samples_leaf: int, seed: int | None) -> tuple[dict, dict]:
    leaves = min(2**max_depth, _MAX_LEAVES) if max_depth is not None else _MAX_LEAVES
    ds_params = {"verbose": -1, "min_data_in_leaf": int(min_samples_leaf), "feature_pre_filter": False}
    params = {
        **_common_params(seed),
        "num_leaves": leaves,
        "max_depth": -1 if max_depth is None else int(max_depth),
        "min_data_in_leaf": int(min_samples_leaf),
        "min_sum_hessian_in_leaf": 0.0,
        "learning_rate": 1.0,
        # One small tree per call: threads only add start-up and spin-wait time (scikit-learn's
        # DecisionTreeRegressor, the other backend, is single-threaded too).
        "num_threads": 1,
    }
    return params, ds_params


def _leaf(float32_inputs: bool) -> ArrayTree:
    z = np.zeros(1)
    return ArrayTree(-np.ones(1), -np.ones(1), z, z, z[:, None], float32_inputs=float32_inputs)


def fit_lightgbm_tree(
    X: np.ndarray, target: np.ndarray, *, max_depth: int | None, min_samples_leaf: int, seed: int
) -> ArrayTree:
    """One least-squares LightGBM tree fitted to ``target`` (R-MTGB's weak learner; its leaf values are
    replaced by the caller's Newton steps). ``max_depth=None`` grows up to LightGBM's leaf limit."""
    lgb = import_lightgbm()
    params, ds_params = _weak_learner_params(max_depth, min_samples_leaf, seed)
    booster = lgb.train({**params, "objective": "regression"}, lgb.Dataset(X, label=target, params=ds_params), 1)
    return tree_from_lightgbm(booster.dump_model()["tree_info"][0], float32_inputs=X.dtype == np.float32)


class LightGBMTreeFitter:
    """Least-squares LightGBM trees on the fixed rows ``X``, one per :meth:`fit`, sharing one binned
    ``Dataset`` and one ``Booster`` (building those per tree is most of LightGBM's cost on small tasks).

    Each tree is one boosting round with the custom gradient ``-target`` and unit Hessian, i.e. a
    least-squares fit to ``target`` from zero; the booster's own running predictions are ignored.
    """

    def __init__(self, X: np.ndarray, *, max_depth: int | None, min_samples_leaf: int, seed: int | None) -> None:
        lgb = import_lightgbm()
        params, ds_params = _weak_learner_params(max_depth, min_samples_leaf, seed)
        self.X = X
        self._booster = lgb.Booster(
            {**params, "objective": "none"}, lgb.Dataset(X, label=np.zeros(len(X)), params=ds_params)
        )
        self._hess = np.ones(len(X))
        self._float32 = X.dtype == np.float32

    def fit(self, target: np.ndarray) -> ArrayTree:
        grad = -np.asarray(target, dtype=np.float64)
        before = self._booster.current_iteration()
        self._booster.update(fobj=lambda _preds, _data: (grad, self._hess))
        if self._booster.current_iteration() == before:  # nothing to split: LightGBM adds no tree
            return _leaf(self._float32)
        info = self._booster.dump_model(start_iteration=before, num_iteration=1)["tree_info"][0]
        return tree_from_lightgbm(info, float32_inputs=self._float32)


def fit_lightgbm_booster(
    X: np.ndarray,
    y: np.ndarray,
    *,
    n_classes: int,
    max_iter: int,
    learning_rate: float,
    max_leaf_nodes: int | None,
    max_depth: int | None,
    min_samples_leaf: int,
    l2_regularization: float,
    early_stopping: bool,
    validation_fraction: float | None,
    seed: int | None,
    categorical: list[int] | None = None,
) -> HGBRaw:
    """A LightGBM booster with HistGradientBoosting's parameter names (``n_classes=0``: regression), as
    raw-score trees; early stopping holds out ``validation_fraction`` (stratified for classes)."""
    lgb = import_lightgbm()
    if n_classes == 0:
        objective: dict[str, Any] = {"objective": "regression"}
    elif n_classes == 2:
        objective = {"objective": "binary"}
    else:
        objective = {"objective": "multiclass", "num_class": int(n_classes)}
    if max_leaf_nodes is not None:
        leaves = int(max_leaf_nodes)
    else:
        leaves = min(2**max_depth, _MAX_LEAVES) if max_depth is not None else _MAX_LEAVES
    params = {
        **_common_params(seed),
        **objective,
        "num_leaves": leaves,
        "max_depth": -1 if max_depth is None else int(max_depth),
        "min_data_in_leaf": int(min_samples_leaf),
        "lambda_l2": float(l2_regularization),
        "learning_rate": float(learning_rate),
    }
    ds_params = {"verbose": -1, "min_data_in_leaf": int(min_samples_leaf), "feature_pre_filter": False}
    cat = categorical or "auto"
    if early_stopping:
        from sklearn.model_selection import train_test_split

        tr, va = train_test_split(
            np.arange(len(X)),
            test_size=validation_fraction,
            random_state=seed,
            stratify=y if n_classes else None,
        )
        train_set = lgb.Dataset(X[tr], label=y[tr], params=ds_params, categorical_feature=cat)
        valid = lgb.Dataset(X[va], label=y[va], params=ds_params, reference=train_set, categorical_feature=cat)
        booster = lgb.train(
            params,
            train_set,
            num_boost_round=int(max_iter),
            valid_sets=[valid],
            callbacks=[lgb.early_stopping(_N_ITER_NO_CHANGE, verbose=False)],
        )
        iterations = booster.best_iteration or booster.current_iteration()
    else:
        booster = lgb.train(
            params, lgb.Dataset(X, label=y, params=ds_params, categorical_feature=cat), num_boost_round=int(max_iter)
        )
        iterations = booster.current_iteration()
    dump = booster.dump_model(num_iteration=iterations)
    per_iter = int(dump["num_tree_per_iteration"])
    trees = [tree_from_lightgbm(t, float32_inputs=False) for t in dump["tree_info"]]
    stages = [trees[i : i + per_iter] for i in range(0, len(trees), per_iter)]
    return HGBRaw(np.zeros(per_iter), stages)
