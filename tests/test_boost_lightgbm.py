"""LightGBM as the boosting estimators' tree backend: exactness against LightGBM, outlier detection,
parameters, JSON without LightGBM, and the errors when it is missing or cannot serve a model."""

from __future__ import annotations

import json
import sys
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.base import clone
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.metrics import roc_auc_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from polytask.boost import (
    MissingLightGBM,
    MultiTaskGradientBoostingClassifier,
    MultiTaskGradientBoostingRegressor,
    PerTaskGradientBoostingClassifier,
    PerTaskGradientBoostingRegressor,
    PooledGradientBoostingClassifier,
    PooledGradientBoostingRegressor,
)
from polytask.boost._lightgbm import LightGBMTreeFitter, fit_lightgbm_tree, tree_from_lightgbm
from polytask.cli import cli
from polytask.data._table import split_indices
from polytask.data.synthetic_outliers import make_outlier_tasks
from polytask.train import TrainConfig, evaluate, fit

HAS_LIGHTGBM = find_spec("lightgbm") is not None
needs_lightgbm = pytest.mark.skipif(not HAS_LIGHTGBM, reason="lightgbm is not installed (pip install polytask[boost])")
LGB = {"tree_backend": "lightgbm", "random_state": 0}
SMALL = {"n_estimators": 10, "n_outlier_estimators": 5, "n_task_estimators": 5, **LGB}
FAMILIES = [
    (MultiTaskGradientBoostingRegressor, SMALL),
    (PerTaskGradientBoostingRegressor, {"max_iter": 10, **LGB}),
    (PooledGradientBoostingRegressor, {"max_iter": 10, **LGB}),
]


def _tasks_data(seed: int = 0, n: int = 240, n_tasks: int = 3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    t = np.repeat(np.arange(n_tasks), n // n_tasks)
    y = np.sin(2 * X[:, 0]) + X[:, 1] * X[:, 2] + 0.5 * t * X[:, 1] + 0.1 * rng.normal(size=n)
    return X, y, t


# Without task ids these are plain scikit-learn estimators: every check that applies runs. (R-MTGB's
# classifier is left out: the checks train it on three classes, which LightGBM's single-output trees
# refuse, tested below.)
@needs_lightgbm
@parametrize_with_checks(
    [
        MultiTaskGradientBoostingRegressor(**SMALL),
        PerTaskGradientBoostingRegressor(max_iter=10, **LGB),
        PerTaskGradientBoostingClassifier(max_iter=10, **LGB),
        PooledGradientBoostingRegressor(max_iter=10, **LGB),
        PooledGradientBoostingClassifier(max_iter=10, **LGB),
    ]
)
def test_sklearn_estimator_checks_with_lightgbm_trees(estimator, check) -> None:
    check(estimator)


# ----------------------------------------------------------------------------- exactness
@needs_lightgbm
def test_converted_trees_predict_what_lightgbm_predicts() -> None:
    """Numeric splits, NaN routing (seen in training, and unseen: read as 0) and categorical splits."""
    import lightgbm as lgb

    rng = np.random.default_rng(3)
    X = np.column_stack([rng.integers(0, 12, 600), rng.normal(size=600), rng.normal(size=600)])
    y = (X[:, 0] % 4) + X[:, 1] - 0.5 * X[:, 2]
    X[rng.random(600) < 0.15, 1] = np.nan
    params = {"objective": "regression", "verbose": -1, "num_leaves": 15, "min_data_in_leaf": 5,
              "min_data_per_group": 5, "cat_smooth": 1.0}  # fmt: skip
    booster = lgb.train(params, lgb.Dataset(X, label=y, categorical_feature=[0]), num_boost_round=8)
    trees = [tree_from_lightgbm(t, float32_inputs=False) for t in booster.dump_model()["tree_info"]]
    assert any(t.is_categorical.any() for t in trees) and any(t.missing_left.any() for t in trees)
    X_new = X.copy()
    X_new[:5, 2] = np.nan  # column 2 had no NaN in training
    X_new[5, 0] = 40  # a category never seen: goes right, as in LightGBM
    ours = sum(t.predict(X_new)[:, 0] for t in trees)
    np.testing.assert_allclose(ours, booster.predict(X_new, raw_score=True), rtol=0, atol=1e-12)


@needs_lightgbm
def test_per_task_lightgbm_equals_lgbm_regressor_per_task() -> None:
    """The per-task baseline with LightGBM trees is LightGBM's own regressor fitted on each task."""
    from lightgbm import LGBMRegressor

    X, y, t = _tasks_data()
    ours = PerTaskGradientBoostingRegressor(max_iter=30, min_samples_leaf=10, **LGB).fit(X, y, task=t)
    for r in range(3):
        rows = t == r
        ref = LGBMRegressor(n_estimators=30, num_leaves=31, min_child_samples=10, random_state=0, n_jobs=1, verbose=-1)
        ref.fit(X[rows], y[rows])
        np.testing.assert_allclose(ours.predict(X[rows], task=t[rows]), ref.predict(X[rows]), rtol=0, atol=1e-10)


@needs_lightgbm
def test_pooled_lightgbm_classifier_equals_lightgbm_with_a_categorical_task() -> None:
    import lightgbm as lgb

    X, y, t = _tasks_data()
    yb = (y > 0).astype(int)
    ours = PooledGradientBoostingClassifier(max_iter=20, **LGB).fit(X, yb, task=t)
    params = {"objective": "binary", "verbose": -1, "num_leaves": 31, "min_data_in_leaf": 20, "seed": 0}
    Xt = np.column_stack([t.astype(float), X])
    ref = lgb.train(params, lgb.Dataset(Xt, label=yb, categorical_feature=[0]), num_boost_round=20)
    np.testing.assert_allclose(ours.predict_proba(X, task=t)[:, 1], ref.predict(Xt), rtol=0, atol=1e-12)


@needs_lightgbm
def test_rmtgb_lightgbm_leaf_values_are_newton_steps_on_lightgbm_splits() -> None:
    """Block 1 alone, one task, one tree: its leaves are LightGBM's partition with leaf means of the residuals."""
    X, y, _ = _tasks_data()
    m = MultiTaskGradientBoostingRegressor(
        n_estimators=1, n_outlier_estimators=0, n_task_estimators=0, max_depth=2, learning_rate=1.0, **LGB
    ).fit(X, y)
    tree = m.shared_trees_[0]
    leaves = tree.apply(X.astype(np.float32))
    assert len(np.unique(leaves)) == 4  # depth 2 -> num_leaves 4
    z = (y - y.mean()) / y.std()
    pred_z = (m.predict(X) - m.y_mean_) / m.y_scale_
    for leaf in np.unique(leaves):
        np.testing.assert_allclose(pred_z[leaves == leaf], z[leaves == leaf].mean(), atol=1e-10)


@needs_lightgbm
def test_shared_booster_fitter_grows_the_trees_of_one_shot_fits() -> None:
    """Trees grown as rounds of one Booster (custom gradient -target) partition the rows as separate
    least-squares LightGBM fits do; a constant target gives a single leaf."""
    rng = np.random.default_rng(5)
    X = rng.normal(size=(300, 4)).astype(np.float32)
    fitter = LightGBMTreeFitter(X, max_depth=3, min_samples_leaf=5, seed=0)
    for k in range(3):
        target = np.sin(3 * X[:, k]) + X[:, 3] * k
        shared = fitter.fit(target).apply(X)
        alone = fit_lightgbm_tree(X, target, max_depth=3, min_samples_leaf=5, seed=0).apply(X)
        assert len(np.unique(shared)) == 8
        # Same partition of the rows (node numbering aside).
        assert len({(a, b) for a, b in zip(shared, alone, strict=True)}) == len(np.unique(shared))
    assert len(fitter.fit(np.full(300, 2.0)).left) == 1


@needs_lightgbm
def test_rmtgb_lightgbm_with_subsampling_is_seeded() -> None:
    X, y, t = _tasks_data()
    kw = {**SMALL, "subsample": 0.7}
    a = MultiTaskGradientBoostingRegressor(**kw).fit(X, y, task=t).predict(X, task=t)
    b = MultiTaskGradientBoostingRegressor(**kw).fit(X, y, task=t).predict(X, task=t)
    c = MultiTaskGradientBoostingRegressor(**{**kw, "random_state": 1}).fit(X, y, task=t).predict(X, task=t)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert np.sqrt(np.mean((a - y) ** 2)) < 0.5 * y.std()


# ----------------------------------------------------------------------------- behaviour
@needs_lightgbm
def test_rmtgb_with_lightgbm_trees_flags_the_planted_outliers_like_sklearn_trees() -> None:
    df, is_outlier = make_outlier_tasks(n_tasks=8, n_outliers=2, n_samples=120, seed=0)
    X, y, t = df[["x0", "x1"]].to_numpy(), df["y"].to_numpy(), df["task"].to_numpy()
    tr, _, te = split_indices(len(df), 0.0, 0.2, 0, groups=t)
    flagged = {}
    for backend in ("sklearn", "lightgbm"):
        m = MultiTaskGradientBoostingRegressor(min_samples_leaf=5, n_estimators=50, random_state=0,
                                               tree_backend=backend)  # fmt: skip
        m.fit(X[tr], y[tr], task=t[tr])
        assert roc_auc_score(is_outlier, m.outlier_scores_) == 1.0
        flagged[backend] = m.outlier_tasks_.tolist()
        inl = ~is_outlier[t[te]]
        rmse = np.sqrt(np.mean((m.predict(X[te][inl], task=t[te][inl]) - y[te][inl]) ** 2))
        pooled = HistGradientBoostingRegressor(random_state=0).fit(X[tr], y[tr])
        assert rmse < 0.8 * np.sqrt(np.mean((pooled.predict(X[te][inl]) - y[te][inl]) ** 2))
    assert flagged["lightgbm"] == flagged["sklearn"] == [0, 1]


@needs_lightgbm
@pytest.mark.parametrize(("cls", "kw"), FAMILIES, ids=lambda v: getattr(v, "__name__", ""))
def test_params_round_trip_and_json_needs_no_lightgbm(cls, kw, monkeypatch) -> None:
    X, y, t = _tasks_data()
    est = cls(**kw)
    assert est.get_params()["tree_backend"] == "lightgbm"
    assert clone(est).get_params() == est.get_params()
    est.set_params(tree_backend="sklearn")
    assert est.get_params()["tree_backend"] == "sklearn"
    sk = est.fit(X, y, task=t).predict(X, task=t)
    est.set_params(tree_backend="lightgbm").fit(X, y, task=t)
    pred = est.predict(X, task=t)
    assert not np.allclose(pred, sk)  # the backend changed the trees
    saved = json.dumps(est.to_dict())
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # a saved model reloads and predicts without LightGBM
    again = cls.from_dict(json.loads(saved))
    assert again.get_params()["tree_backend"] == "lightgbm"
    np.testing.assert_array_equal(again.predict(X, task=t), pred)


@needs_lightgbm
def test_run_directory_with_lightgbm_trees(tmp_path: Path) -> None:
    params = {"max_iter": 10, "tree_backend": "lightgbm"}
    opts = {"n_tasks": 4, "n_outliers": 1, "n_samples": 40}
    res = fit("synthetic-outliers", model="gbdt-per-task", model_params=params, output=tmp_path / "r",
              data_options=opts, config=TrainConfig(seed=1))  # fmt: skip
    assert evaluate(tmp_path / "r")["test"] == res.test


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(("cls", "kw"), FAMILIES, ids=lambda v: getattr(v, "__name__", ""))
def test_missing_lightgbm_is_one_clear_error(cls, kw, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "lightgbm", None)  # what `import lightgbm` sees when it is not installed
    X, y, t = _tasks_data()
    with pytest.raises(
        MissingLightGBM,
        match=r"^tree_backend='lightgbm' needs LightGBM, which is not installed: pip install polytask\[boost\]",
    ):
        cls(**kw).fit(X, y, task=t)
    cls(**{**kw, "tree_backend": "sklearn"}).fit(X, y, task=t)  # the default backend does not need it


def test_cli_names_the_missing_lightgbm(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "lightgbm", None)
    args = ["fit", "synthetic-outliers", "--data-param", "n_samples=30", "--data-param", "n_tasks=3", "--model",
            "rmtgb", "--model-param", "tree_backend=lightgbm", "--output", str(tmp_path / "r"), "--quiet"]  # fmt: skip
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (
        "error: tree_backend='lightgbm' needs LightGBM, which is not installed: pip install polytask[boost] "
        "(or use tree_backend='sklearn')"
    )


def test_unknown_backend_and_multiclass_rmtgb() -> None:
    X, y, t = _tasks_data()
    with pytest.raises(ValueError, match=r"tree_backend must be one of \['sklearn', 'lightgbm'\], got 'xgboost'"):
        MultiTaskGradientBoostingRegressor(tree_backend="xgboost").fit(X, y, task=t)
    with pytest.raises(ValueError, match=r"tree_backend must be one of \['sklearn', 'lightgbm'\], got 'xgb'"):
        PooledGradientBoostingRegressor(tree_backend="xgb").fit(X, y, task=t)
    if HAS_LIGHTGBM:
        y3 = np.digitize(y, [-0.5, 0.5])
        with pytest.raises(ValueError, match=r"single-output trees.*y has 3 classes: use tree_backend='sklearn'"):
            MultiTaskGradientBoostingClassifier(**SMALL).fit(X, y3, task=t)
