"""The classic multi-task tables of the R-MTGB paper, in the task-column layout.

School (Goldstein 1991; 15,362 pupils of 139 schools, exam score), Computer (Lenk et al. 1996;
3,800 ratings by 190 raters of 20 computer profiles each, likelihood of purchase 0-10), Landmine
(Xue et al. 2007; 14,820 radar readings from 29 fields, landmine yes/no) and Abalone (UCI; 4,177
shells in 3 tasks, number of rings), as used by Emami, Martínez-Muñoz & Hernández-Lobato,
"Robust-Multi-Task Gradient Boosting", ESWA 2025 (files mirrored from GAA-UAM/R-MTGB).

Each data set is ``mtl-regression/<name>/<name>_data.csv`` (features + a ``task`` column; ``Task``
in abalone) and ``<name>_target.csv`` (one target column), checked against their sha256. Splits
follow the paper: 80/20 train/test per task by ``seed`` (stratified per task); a validation slice of
``val_fraction`` of each task's training rows is cut off for model selection. Tasks are named
``<target>@<task value>``.
"""

from __future__ import annotations

import os

import pandas as pd

from polytask.data import _datadir
from polytask.data._bundle import DataBundle, register_dataset
from polytask.data._table import TableEncoder, load_task_column_pair, split_indices

__all__ = ["MTL_REGRESSION", "abalone", "computer", "landmine", "load_mtl_frame", "school"]

# name -> (task column in the file, target name we give the one target column, kind)
MTL_REGRESSION: dict[str, tuple[str, str, str]] = {
    "school": ("task", "exam_score", "regression"),
    "computer": ("task", "rating", "regression"),
    "landmine": ("task", "landmine", "binary"),
    "abalone": ("Task", "rings", "regression"),
}
_SOURCE = "as used by the R-MTGB paper (GAA-UAM/R-MTGB); mtl-regression/ in the data mirror"


def load_mtl_frame(name: str, data_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """Features, the task column (renamed ``task``) and the target (renamed, see :data:`MTL_REGRESSION`)."""
    if name not in MTL_REGRESSION:
        raise KeyError(f"unknown multi-task table '{name}'; available: {', '.join(MTL_REGRESSION)}")
    task_col, target, _ = MTL_REGRESSION[name]
    data = _datadir.resolve(f"mtl-regression/{name}/{name}_data.csv", root=data_dir)
    tgt = _datadir.resolve(f"mtl-regression/{name}/{name}_target.csv", root=data_dir)
    df = load_task_column_pair(data, tgt, task_col)
    old_target = df.columns[-1]
    df = df.rename(columns={old_target: target, task_col: "task"})
    # Numeric column names ('0'..'8' in landmine) read better as features with a prefix.
    return df.rename(columns={c: f"f{c}" for c in df.columns if str(c).isdigit()})


def _load(name: str, data_dir: str | os.PathLike[str] | None, seed: int, val_fraction: float) -> DataBundle:
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    _, target, kind = MTL_REGRESSION[name]
    df = load_mtl_frame(name, data_dir)
    groups = df["task"].to_numpy()
    # 20% test per task, then val_fraction of each task's remaining 80% for validation.
    tr, va, te = split_indices(len(df), val_fraction * 0.8, 0.2, seed, groups=groups)
    train_df, val_df, test_df = df.iloc[tr], df.iloc[va], df.iloc[te]
    enc = TableEncoder(
        [(target, kind)], task_column="task", numeric=[c for c in df.columns if c not in (target, "task")]
    )
    enc.fit(train_df)
    return DataBundle.encoded(
        name,
        enc,
        train_df,
        val_df,
        test_df,
        {
            "source": f"mtl-regression/{name}",
            "split": {
                "how": "80/20 train/test per task (R-MTGB paper), val_fraction of each task's training rows for val",
                "seed": seed,
                "rows": len(df),
                "tasks": int(pd.Series(groups).nunique()),
                "train": len(tr),
                "val": len(va),
                "test": len(te),
            },
        },
    )


@register_dataset("school", "School: exam scores of 15,362 pupils in 139 schools (regression, task column)", _SOURCE)
def school(data_dir: str | os.PathLike[str] | None = None, seed: int = 0, val_fraction: float = 0.1) -> DataBundle:
    """139 regression tasks (schools); 80/20 per task by ``seed``, ``val_fraction`` of train for validation."""
    return _load("school", data_dir, seed, val_fraction)


@register_dataset("computer", "Computer: 190 raters x 20 computer profiles, purchase likelihood (regression)", _SOURCE)
def computer(data_dir: str | os.PathLike[str] | None = None, seed: int = 0, val_fraction: float = 0.1) -> DataBundle:
    """190 regression tasks (raters); 80/20 per task by ``seed``, ``val_fraction`` of train for validation."""
    return _load("computer", data_dir, seed, val_fraction)


@register_dataset("landmine", "Landmine: 14,820 radar readings from 29 fields, landmine or not (binary)", _SOURCE)
def landmine(data_dir: str | os.PathLike[str] | None = None, seed: int = 0, val_fraction: float = 0.1) -> DataBundle:
    """29 binary tasks (fields); 80/20 per task by ``seed``, ``val_fraction`` of train for validation."""
    return _load("landmine", data_dir, seed, val_fraction)


@register_dataset("abalone", "Abalone: rings of 4,177 shells, 3 tasks (regression)", _SOURCE)
def abalone(data_dir: str | os.PathLike[str] | None = None, seed: int = 0, val_fraction: float = 0.1) -> DataBundle:
    """3 regression tasks; 80/20 per task by ``seed``, ``val_fraction`` of train for validation."""
    return _load("abalone", data_dir, seed, val_fraction)
