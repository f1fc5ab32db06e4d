"""Loaders of the classic multi-task tables and the synthetic outlier-task generator."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from polytask.data import DATASETS, DataIntegrityError, load_dataset
from polytask.data.mtl_regression import load_mtl_frame
from polytask.data.synthetic_outliers import make_outlier_tasks

# name -> (rows, tasks, first task name, kind)
EXPECTED = {
    "school": (15362, 139, "exam_score@0", "regression"),
    "computer": (3800, 190, "rating@0", "regression"),
    "landmine": (14820, 29, "landmine@0", "binary"),
    "abalone": (4177, 3, "rings@0", "regression"),
}


@pytest.mark.parametrize("name", list(EXPECTED))
def test_real_tables_rows_tasks_and_split(name: str, data_dir: Path) -> None:
    if not (data_dir / "mtl-regression" / name).is_dir():
        pytest.skip(f"mtl-regression/{name} is not in the data directory")
    rows, n_tasks, first, kind = EXPECTED[name]
    b = load_dataset(name, seed=0)
    assert len(b.tasks) == n_tasks and b.tasks[0].name == first and b.tasks[0].kind.value == kind
    n_train, n_val, n_test = len(b.train), len(b.val), len(b.test)
    assert n_train + n_val + n_test == rows
    # per-task rounding: computer has 20 rows a task, of which 2 (not 1.6) go to validation
    assert abs(n_test / rows - 0.2) < 0.01 and abs(n_val / (n_train + n_val) - 0.1) < 0.03
    # task-column layout: each row carries exactly one task's label, and every task is in train and test
    for split in (b.train, b.test):
        owners = sum(m.long() for m in split.mask.values())
        assert bool((owners == 1).all())
        assert all(int(m.sum()) > 0 for m in split.mask.values())
    # stratified per task: each task's test share is close to 20%
    df = load_mtl_frame(name)
    sizes = df["task"].value_counts().sort_index().to_numpy()
    test_sizes = np.array([int(b.test.mask[t.name].sum()) for t in b.tasks])
    assert np.all(np.abs(test_sizes - 0.2 * sizes) <= 1)
    # another seed gives another split of the same rows
    other = load_dataset(name, seed=1)
    assert len(other.test) == n_test and not torch.equal(other.test.x["num"], b.test.x["num"])


def test_tampered_file_fails_its_sha256(data_dir: Path, tmp_path: Path) -> None:
    src = data_dir / "mtl-regression" / "abalone"
    if not src.is_dir():
        pytest.skip("mtl-regression/abalone is not in the data directory")
    dst = tmp_path / "mtl-regression" / "abalone"
    shutil.copytree(src, dst)
    for f in dst.iterdir():
        f.chmod(0o644)
    with open(dst / "abalone_target.csv", "a") as f:
        f.write("9\n")
    with pytest.raises(DataIntegrityError, match=r"abalone_target.csv: sha256 mismatch"):
        load_dataset("abalone", data_dir=tmp_path)


def test_missing_data_dir_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"mtl-regression/school/school_data.csv"):
        load_dataset("school", data_dir=tmp_path)


def test_registered() -> None:
    assert {"school", "computer", "landmine", "abalone", "synthetic-outliers"} <= set(DATASETS)


def test_generator_truth_and_determinism() -> None:
    df, is_outlier = make_outlier_tasks(n_tasks=6, n_outliers=2, n_samples=50, noise=0.0, task_scale=0.0, seed=3)
    assert is_outlier.tolist() == [True, True, False, False, False, False]
    assert df.shape == (300, 4) and df["task"].value_counts().tolist() == [50] * 6
    again, _ = make_outlier_tasks(n_tasks=6, n_outliers=2, n_samples=50, noise=0.0, task_scale=0.0, seed=3)
    assert again.equals(df)
    # Without noise and task terms, inliers share one function and outliers another: a function
    # fitted on task 2 explains task 3 exactly and task 0 not at all.
    from sklearn.neighbors import KNeighborsRegressor

    x = df[["x0", "x1"]].to_numpy()
    knn = KNeighborsRegressor(3).fit(x[df.task == 2], df.y[df.task == 2])
    err = {r: np.mean((knn.predict(x[df.task == r]) - df.y[df.task == r]) ** 2) for r in (0, 1, 3)}
    assert err[3] < 0.1 * err[0] and err[3] < 0.1 * err[1]
    with pytest.raises(ValueError, match=r"n_outliers must be in \[0, n_tasks - 1\] = \[0, 5\], got 6"):
        make_outlier_tasks(n_tasks=6, n_outliers=6)


def test_synthetic_bundle_meta() -> None:
    b = load_dataset("synthetic-outliers", seed=0, n_tasks=4, n_outliers=1, n_samples=40)
    assert [t.name for t in b.tasks] == ["y@0", "y@1", "y@2", "y@3"]
    assert b.meta["is_outlier"] == {"y@0": True, "y@1": False, "y@2": False, "y@3": False}
    assert len(b.test) == 32
