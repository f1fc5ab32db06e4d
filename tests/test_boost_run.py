"""Boosting models in run directories: ``polytask fit --model rmtgb`` and evaluate / predict on the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from polytask.boost import BoostedModel, fit_boosted
from polytask.cli import cli
from polytask.data import InputSpec, TaskTensors, load_dataset
from polytask.tasks import Task, TaskKind
from polytask.train import TrainConfig, evaluate, fit, load_run, predict

SMALL = {"n_estimators": 10, "n_outlier_estimators": 10, "n_task_estimators": 5}


@pytest.mark.parametrize("model", ["rmtgb", "mtgb", "gbdt-per-task", "gbdt-pooled"])
def test_fit_evaluate_predict_on_the_run_directory(model: str, tmp_path: Path) -> None:
    out = tmp_path / model
    params = {k: v for k, v in SMALL.items() if model == "rmtgb" or k != "n_outlier_estimators"}
    if model.startswith("gbdt"):
        params = {"max_iter": 10}
    opts = {"n_tasks": 4, "n_outliers": 1, "n_samples": 40}
    res = fit(
        "synthetic-outliers",
        model=model,
        model_params=params,
        output=out,
        data_options=opts,
        config=TrainConfig(seed=1),
    )
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == {"name": model, "params": params} and results["test"] == res.test
    assert set(res.test) == {"y@0", "y@1", "y@2", "y@3"} and all("rmse" in m for m in res.test.values())
    run = load_run(out)
    assert isinstance(run.model, BoostedModel)
    assert evaluate(out)["test"] == res.test  # same split rebuilt, same model reloaded from JSON
    frame = load_dataset("synthetic-outliers", seed=0, **opts)
    csv = tmp_path / "rows.csv"
    pd.DataFrame(frame.test.x["num"].numpy(), columns=["x0", "x1"]).to_csv(csv, index=False)
    pred = predict(out, csv)
    assert list(pred.columns) == ["y@0", "y@1", "y@2", "y@3"] and len(pred) == len(frame.test)
    doc = json.loads((out / "checkpoints" / "booster.json").read_text())  # plain JSON, nothing pickled
    assert doc["format"] == "polytask-booster/1"


def test_cli_fit_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    args = [
        "fit",
        "synthetic-outliers",
        "--data-param",
        "n_samples=30",
        "--data-param",
        "n_tasks=3",
        "--model",
        "rmtgb",
        "--model-param",
        "n_estimators=5",
        "--model-param",
        "n_task_estimators=2",
        "--model-param",
        "n_outlier_estimators=3",
        "--output",
        str(tmp_path / "r"),
        "--quiet",
    ]
    ok = runner.invoke(cli, args)
    assert ok.exit_code == 0, ok.output
    assert "run written to" in ok.output
    again = runner.invoke(cli, args)
    assert again.exit_code == 2 and again.output.strip().splitlines()[-1].startswith("error: ")
    bad = runner.invoke(cli, [*args[:-3], "--balancer", "pcgrad", "--output", str(tmp_path / "b"), "--quiet"])
    assert bad.exit_code == 2
    assert "error: --balancer pcgrad does not apply to boosting model 'rmtgb'" in bad.output
    unknown = runner.invoke(cli, [*args[:-3], "--model-param", "depth=3", "--output", str(tmp_path / "c")])
    assert unknown.exit_code == 2 and "boosting model 'rmtgb' has no parameter ['depth']" in unknown.output


def test_nan_targets_are_left_out_and_counted(tmp_path: Path) -> None:
    """A task-column training table with 3 NaN targets in 120 rows: 3 rows left out of the fit, counted."""
    rng = np.random.default_rng(0)
    paths = {}
    for name, n in (("train", 120), ("val", 30), ("test", 30)):
        df = pd.DataFrame({"x0": rng.normal(size=n), "school": np.tile(["a", "b", "c"], n // 3)})
        df["y"] = df["x0"] + 0.1 * rng.normal(size=n)
        if name == "train":
            df.loc[[3, 50, 51], "y"] = np.nan
        paths[name] = tmp_path / f"{name}.csv"
        df.to_csv(paths[name], index=False)
    opts = {"task_column": "school", "val": str(paths["val"]), "test": str(paths["test"])}
    params = {"n_estimators": 5, "n_task_estimators": 2}
    with pytest.warns(UserWarning, match=r"^3 of 120 training row\(s\) have no label \(NaN or missing target\) and are "
                      r"left out of the mtgb fit$"):  # fmt: skip
        fit(str(paths["train"]), ["y:regression"], model="mtgb", model_params=params, output=tmp_path / "r",
            data_options=opts)  # fmt: skip
    assert load_run(tmp_path / "r").model.n_unlabelled_rows == 3  # saved with the model


def test_task_with_too_few_training_rows_is_named_by_its_name() -> None:
    """The estimator sees task indices; the harness names the task ('y@tiny', not 'task 1') and the minimum."""
    n = 30
    tasks = [Task("y@a", TaskKind.REGRESSION), Task("y@tiny", TaskKind.REGRESSION)]
    own = torch.arange(n) < n - 1  # y@tiny labels one row
    x = {"num": torch.randn(n, 2, generator=torch.Generator().manual_seed(0))}
    data = TaskTensors(x, {"y@a": x["num"][:, 0], "y@tiny": x["num"][:, 1]}, {"y@a": own, "y@tiny": ~own})
    spec = InputSpec("tabular", n_numeric=2)
    with pytest.raises(ValueError, match=r"^task 'y@tiny' has 1 labelled training row\(s\); a boosting model needs at "
                       r"least 2 per task: drop or merge"):  # fmt: skip
        fit_boosted("rmtgb", tasks, spec, data)
    none = TaskTensors(x, data.y, {"y@a": torch.ones(n, dtype=torch.bool), "y@tiny": torch.zeros(n, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"task\(s\) \['y@tiny'\] have no labelled training rows"):
        fit_boosted("gbdt-per-task", tasks, spec, none)
