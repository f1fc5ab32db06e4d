"""Boosting models in run directories: ``polytask fit --model rmtgb`` and evaluate / predict on the run."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner

from polytask.boost import BoostedModel
from polytask.cli import cli
from polytask.data import load_dataset
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
