"""Multi-task gradient boosting with scikit-learn's estimator API, and tree baselines.

* :class:`MultiTaskGradientBoostingRegressor` / :class:`MultiTaskGradientBoostingClassifier`: R-MTGB
  (Emami et al., ESWA 2025); ``n_outlier_estimators=0`` gives plain MT-GB;
* per-task and pooled ``HistGradientBoosting`` baselines with the same ``fit(X, y, task=...)``;
* ``tree_backend='lightgbm'`` on all of them: LightGBM's trees instead of scikit-learn's (optional:
  ``pip install polytask[boost]``; :class:`MissingLightGBM` when it is not installed);
* :data:`BOOSTERS` (``rmtgb``, ``mtgb``, ``gbdt-per-task``, ``gbdt-pooled``) and
  :class:`BoostedModel`, which puts a fitted estimator behind the model contract so that
  ``polytask fit --model rmtgb`` and ``evaluate``/``predict`` work like for the networks.

Fitted estimators save to JSON (``to_dict`` / ``from_dict``: the trees' node arrays); nothing is pickled.
"""

from __future__ import annotations

from polytask.boost._harness import (
    BOOSTERS,
    BoostedModel,
    build_booster,
    fit_boosted,
    load_boosted,
    save_boosted,
    stack_tasks,
)
from polytask.boost._lightgbm import TREE_BACKENDS, MissingLightGBM
from polytask.boost._trees import ArrayTree, HGBRaw
from polytask.boost.baselines import (
    PerTaskGradientBoostingClassifier,
    PerTaskGradientBoostingRegressor,
    PooledGradientBoostingClassifier,
    PooledGradientBoostingRegressor,
)
from polytask.boost.rmtgb import MultiTaskGradientBoostingClassifier, MultiTaskGradientBoostingRegressor

__all__ = [
    "BOOSTERS",
    "ArrayTree",
    "BoostedModel",
    "TREE_BACKENDS",
    "HGBRaw",
    "MissingLightGBM",
    "MultiTaskGradientBoostingClassifier",
    "MultiTaskGradientBoostingRegressor",
    "PerTaskGradientBoostingClassifier",
    "PerTaskGradientBoostingRegressor",
    "PooledGradientBoostingClassifier",
    "PooledGradientBoostingRegressor",
    "build_booster",
    "fit_boosted",
    "load_boosted",
    "save_boosted",
    "stack_tasks",
]
