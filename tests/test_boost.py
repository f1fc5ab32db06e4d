"""Multi-task gradient boosting: scikit-learn conventions, reference values, outlier detection, errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.ensemble import GradientBoostingClassifier, GradientBoostingRegressor, HistGradientBoostingRegressor
from sklearn.metrics import roc_auc_score
from sklearn.tree import DecisionTreeRegressor
from sklearn.utils.estimator_checks import parametrize_with_checks

from polytask.boost import (
    ArrayTree,
    HGBRaw,
    MultiTaskGradientBoostingClassifier,
    MultiTaskGradientBoostingRegressor,
    PerTaskGradientBoostingClassifier,
    PerTaskGradientBoostingRegressor,
    PooledGradientBoostingClassifier,
    PooledGradientBoostingRegressor,
)
from polytask.data._table import split_indices
from polytask.data.synthetic_outliers import make_outlier_tasks

SMALL = {"n_estimators": 10, "n_outlier_estimators": 5, "n_task_estimators": 5, "random_state": 0}
ALL = [
    MultiTaskGradientBoostingRegressor(**SMALL),
    MultiTaskGradientBoostingClassifier(**SMALL),
    PerTaskGradientBoostingRegressor(max_iter=10, random_state=0),
    PerTaskGradientBoostingClassifier(max_iter=10, random_state=0),
    PooledGradientBoostingRegressor(max_iter=10, random_state=0),
    PooledGradientBoostingClassifier(max_iter=10, random_state=0),
]


# Without task ids every row belongs to one task, so the estimators are ordinary scikit-learn
# estimators and every applicable check runs (none is skipped).
@parametrize_with_checks(ALL)
def test_sklearn_estimator_checks(estimator, check) -> None:
    check(estimator)


def _tasks_data(seed: int = 0, n: int = 240, n_tasks: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    t = np.repeat(np.arange(n_tasks), n // n_tasks)
    y = np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] + 0.5 * t * X[:, 1] + 0.1 * rng.normal(size=n)
    return X, y, t


# ----------------------------------------------------------------------------- reference values
def test_block1_alone_is_scikit_learns_gradient_boosting() -> None:
    """Shared trees only on one task == GradientBoostingRegressor / -Classifier (squared / log loss)."""
    X, y, _ = _tasks_data()
    ours = MultiTaskGradientBoostingRegressor(
        n_estimators=40, n_outlier_estimators=0, n_task_estimators=0, max_depth=3, random_state=0
    ).fit(X, y)
    ref = GradientBoostingRegressor(n_estimators=40, max_depth=3, random_state=0).fit(X, y)
    np.testing.assert_allclose(ours.predict(X), ref.predict(X), atol=1e-10)
    yb = (y > 0).astype(int)
    ours_c = MultiTaskGradientBoostingClassifier(
        n_estimators=40, n_outlier_estimators=0, n_task_estimators=0, max_depth=3, random_state=0
    ).fit(X, yb)
    ref_c = GradientBoostingClassifier(n_estimators=40, max_depth=3, random_state=0).fit(X, yb)
    np.testing.assert_allclose(ours_c.decision_function(X), ref_c.decision_function(X), atol=1e-10)
    np.testing.assert_allclose(ours_c.predict_proba(X), ref_c.predict_proba(X), atol=1e-10)


def test_one_stump_by_hand() -> None:
    """One depth-1 tree on four points: prediction = mean + lr * (leaf mean of residuals), by hand."""
    X = np.array([[0.0], [1.0], [2.0], [3.0]])
    y = np.array([1.0, 1.0, 3.0, 7.0])  # mean 3, residuals -2, -2, 0, 4
    m = MultiTaskGradientBoostingRegressor(
        n_estimators=1, n_outlier_estimators=0, n_task_estimators=0, max_depth=1, learning_rate=0.5
    ).fit(X, y)
    # Split x <= 1.5 leaves squared error 0 + 8; x <= 2.5 leaves 24/9 + 0, so it wins: leaf means -4/3 and 4.
    np.testing.assert_allclose(m.predict(X), [3 - 2 / 3, 3 - 2 / 3, 3 - 2 / 3, 3 + 2.0])


def test_task_trees_fit_only_their_task() -> None:
    """Block 3 trees of task r change predictions of task r only; other tasks' rows are untouched."""
    X, y, t = _tasks_data()
    kw = {"n_estimators": 20, "n_outlier_estimators": 0, "random_state": 0}
    base = MultiTaskGradientBoostingRegressor(n_task_estimators=0, **kw).fit(X, y, task=t)
    full = MultiTaskGradientBoostingRegressor(n_task_estimators=20, **kw).fit(X, y, task=t)
    for r in range(3):
        ids = np.full(len(X), r)
        assert not np.allclose(base.predict(X, task=ids), full.predict(X, task=ids))
    assert all(len(trees) == 20 for trees in full.task_trees_)
    # MT-GB beats shared trees alone on these task-dependent targets (training error).
    assert np.mean((full.predict(X, task=t) - y) ** 2) < np.mean((base.predict(X, task=t) - y) ** 2)


def test_multiclass_probabilities() -> None:
    X, y, t = _tasks_data()
    y3 = np.digitize(y, [-0.5, 0.5])
    m = MultiTaskGradientBoostingClassifier(n_estimators=20, n_outlier_estimators=10, n_task_estimators=5).fit(
        X, y3, task=t
    )
    p = m.predict_proba(X, task=t)
    assert p.shape == (len(X), 3)
    np.testing.assert_allclose(p.sum(axis=1), 1.0)
    assert (m.predict(X, task=t) == y3).mean() > 0.8


# ----------------------------------------------------------------------------- outlier detection
def _synthetic(n_outliers: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    df, is_outlier = make_outlier_tasks(n_tasks=8, n_outliers=n_outliers, n_samples=120, seed=seed)
    X, y, t = df[["x0", "x1"]].to_numpy(), df["y"].to_numpy(), df["task"].to_numpy()
    tr, _, te = split_indices(len(df), 0.0, 0.2, seed, groups=t)
    return X, y, t, tr, te, is_outlier


def test_rmtgb_flags_planted_outlier_tasks_and_beats_pooling_on_inliers() -> None:
    X, y, t, tr, te, is_outlier = _synthetic(n_outliers=2)
    m = MultiTaskGradientBoostingRegressor(min_samples_leaf=5, random_state=0).fit(X[tr], y[tr], task=t[tr])
    scores = m.outlier_scores_
    assert scores[is_outlier].min() > scores[~is_outlier].max()  # every outlier above every inlier
    assert roc_auc_score(is_outlier, scores) == 1.0
    assert m.outlier_tasks_.tolist() == [0, 1]
    assert np.median(scores) < 0.5  # oriented: the majority leans to the non-outlier function
    # Data pooling (one GBDT on all rows, the R-MTGB paper's pooling baseline) is pulled off by the
    # outlier tasks; R-MTGB is not.
    inl = ~is_outlier[t[te]]
    pooled = HistGradientBoostingRegressor(random_state=0).fit(X[tr], y[tr])
    rmse_pooled = np.sqrt(np.mean((pooled.predict(X[te][inl]) - y[te][inl]) ** 2))
    rmse_rmtgb = np.sqrt(np.mean((m.predict(X[te][inl], task=t[te][inl]) - y[te][inl]) ** 2))
    assert rmse_rmtgb < 0.8 * rmse_pooled
    # Block 2 is what helps: the same model without it (MT-GB) is worse on the inlier tasks.
    mtgb = MultiTaskGradientBoostingRegressor(min_samples_leaf=5, n_outlier_estimators=0, random_state=0)
    mtgb.fit(X[tr], y[tr], task=t[tr])
    rmse_mtgb = np.sqrt(np.mean((mtgb.predict(X[te][inl], task=t[te][inl]) - y[te][inl]) ** 2))
    assert rmse_rmtgb < rmse_mtgb


def test_mtgb_has_no_outlier_block() -> None:
    X, y, t, tr, _, _ = _synthetic(n_outliers=2)
    m = MultiTaskGradientBoostingRegressor(n_estimators=10, n_outlier_estimators=0, n_task_estimators=5).fit(
        X[tr], y[tr], task=t[tr]
    )
    assert m.outlier_scores_ is None and m.outlier_tasks_.size == 0 and not m.outlier_trees_


def test_early_stopping_keeps_the_best_iterations() -> None:
    X, y, t = _tasks_data()
    m = MultiTaskGradientBoostingRegressor(
        n_estimators=400, n_outlier_estimators=50, n_task_estimators=200, early_stopping=True, random_state=0
    ).fit(X, y, task=t)
    assert 0 < len(m.shared_trees_) < 400
    assert (m.n_task_trees_ < 200).all()


# ----------------------------------------------------------------------------- JSON round trips
@pytest.mark.parametrize(
    "est",
    [
        MultiTaskGradientBoostingRegressor(n_estimators=15, n_outlier_estimators=10, n_task_estimators=5),
        MultiTaskGradientBoostingClassifier(n_estimators=15, n_outlier_estimators=10, n_task_estimators=5),
        PerTaskGradientBoostingRegressor(max_iter=15),
        PerTaskGradientBoostingClassifier(max_iter=15),
        PooledGradientBoostingRegressor(max_iter=15),
        PooledGradientBoostingClassifier(max_iter=15),
    ],
    ids=lambda e: type(e).__name__,
)
def test_json_round_trip_predicts_exactly(est) -> None:
    X, y, t = _tasks_data()
    names = np.array(["a", "b", "c"])[t]  # string task ids survive the round trip too
    target = y if "Regressor" in type(est).__name__ else np.where(y > 0, "yes", "no")
    est.fit(X, target, task=names)
    again = type(est).from_dict(json.loads(json.dumps(est.to_dict())))
    np.testing.assert_array_equal(again.predict(X, task=names), est.predict(X, task=names))
    if hasattr(est, "predict_proba"):
        np.testing.assert_array_equal(again.predict_proba(X, task=names), est.predict_proba(X, task=names))


def test_array_trees_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(400, 3))
    X[:, 0] = rng.integers(0, 40, 400)
    y = X[:, 1] + (X[:, 0] % 3)
    X[rng.random(400) < 0.1, 1] = np.nan  # HistGradientBoosting's missing-value direction
    tree = DecisionTreeRegressor(max_depth=5).fit(np.nan_to_num(X), np.c_[y, -y])
    np.testing.assert_array_equal(
        ArrayTree.from_sklearn(tree).predict(np.nan_to_num(X)), tree.predict(np.nan_to_num(X))
    )
    hgb = HistGradientBoostingRegressor(max_iter=20, categorical_features=[0]).fit(X, y)
    np.testing.assert_allclose(HGBRaw.from_model(hgb).predict_raw(X)[:, 0], hgb.predict(X), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- bad input
def test_unseen_task_is_refused() -> None:
    X, y, t = _tasks_data()
    m = MultiTaskGradientBoostingRegressor(**SMALL).fit(X, y, task=t)
    with pytest.raises(
        ValueError, match=r"task\(s\) 7 were not seen in training; this model knows 3 task\(s\): 0, 1, 2"
    ):
        m.predict(X[:2], task=[0, 7])


def test_task_ids_missing_or_of_another_type_at_predict_time() -> None:
    X, y, t = _tasks_data()
    m = MultiTaskGradientBoostingRegressor(**SMALL).fit(X, y, task=t)
    with pytest.raises(ValueError, match=r"task is required: this model was fitted on 3 tasks"):
        m.predict(X)
    with pytest.raises(ValueError, match=r"task ids are strings but the model was fitted with numbers"):
        m.predict(X[:2], task=["0", "1"])
    with pytest.raises(ValueError, match=r"task must be one id per row \(3 rows\)"):
        m.predict(X[:3], task=[0, 1])
    with pytest.raises(ValueError, match=r"task holds NaN at row 1"):
        m.predict(X[:2], task=[0.0, np.nan])


def test_task_with_too_few_rows_is_named() -> None:
    X, y, t = _tasks_data()
    t = t.copy()
    t[0] = 9  # task 9 has a single row
    with pytest.raises(ValueError, match=r"task 9 has 1 sample\(s\); each task needs at least 2 rows"):
        MultiTaskGradientBoostingRegressor(**SMALL).fit(X, y, task=t)


def test_non_numeric_features_need_an_encoder() -> None:
    X, y, t = _tasks_data()
    df = pd.DataFrame(X, columns=["a", "b", "c"]).assign(colour=np.where(y > 0, "red", "blue"))
    with pytest.raises(ValueError, match=r"needs numeric features, but column\(s\) 'colour' hold text.*TableEncoder"):
        MultiTaskGradientBoostingRegressor(**SMALL).fit(df, y, task=t)
    with pytest.raises(ValueError, match=r"column\(s\) '3' hold text"):
        PooledGradientBoostingRegressor().fit(df.to_numpy(), y, task=t)


def test_nan_targets_are_counted_in_the_error() -> None:
    X, y, t = _tasks_data()
    y = y.copy()
    y[[4, 10, 11]] = np.nan
    with pytest.raises(ValueError, match=r"Input y contains NaN or infinity in 3 row\(s\) \(first at row 4\)"):
        MultiTaskGradientBoostingRegressor(**SMALL).fit(X, y, task=t)


def test_bad_parameters() -> None:
    X, y, t = _tasks_data()
    with pytest.raises(ValueError, match=r"subsample must be in \(0, 1\], got 0"):
        MultiTaskGradientBoostingRegressor(subsample=0).fit(X, y, task=t)
    with pytest.raises(ValueError, match="all 0; nothing to fit"):
        MultiTaskGradientBoostingRegressor(n_estimators=0, n_outlier_estimators=0, n_task_estimators=0).fit(X, y)
