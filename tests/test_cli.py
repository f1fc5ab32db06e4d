from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from polytask.cli import cli


def _table(path: Path, n: int = 1500, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "city": rng.choice(["a", "b", "c"], n)})
    df["buy"] = ((df.x1 + (df.city == "a") + rng.normal(size=n) * 0.5) > 0.5).astype(int)
    df["spend"] = df.x1 * 2 + df.x2 + rng.normal(size=n) * 0.1
    df.loc[rng.random(n) < 0.3, "spend"] = np.nan
    df.to_csv(path, index=False)
    return path


def run(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.output


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    data = _table(root / "train.csv")
    code, out = run("fit", data, "--task", "buy:binary", "--task", "spend:regression", "--epochs", 3, "--quiet",
                    "--model", "mmoe", "--model-param", "n_experts=3", "-o", root / "run")  # fmt: skip
    assert code == 0, out
    return data, root / "run"


def test_fit_evaluate_predict_round_trip(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run_dir = trained
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"]["buy"]["auc"] > 0.75
    assert results["model"] == {"name": "mmoe", "params": {"n_experts": 3}}
    code, out = run("evaluate", run_dir, "--json")
    assert code == 0, out
    doc = json.loads(out)
    # evaluate reloads the same split and the best checkpoint: the same numbers as at the end of fit.
    assert doc["metrics"]["test"]["buy"]["auc"] == pytest.approx(results["test"]["buy"]["auc"])
    usage = doc["diagnostics"]["test"]["expert_usage"]
    assert set(usage) == {"buy", "spend"} and all(sum(u) == pytest.approx(1.0) for u in usage.values())
    code, out = run("predict", run_dir, data, "-o", tmp_path / "p.csv")
    assert code == 0, out
    pred = pd.read_csv(tmp_path / "p.csv")
    assert list(pred.columns) == ["buy", "buy:label", "spend"] and len(pred) == 1500
    assert pred["buy"].between(0, 1).all()
    # Regression predictions come back in the original units of the target.
    truth = pd.read_csv(data)["spend"]
    ok = truth.notna()
    assert np.corrcoef(pred["spend"][ok], truth[ok])[0, 1] > 0.8
    assert abs(pred["spend"].mean() - truth.mean()) < 1.0


def test_predict_maps_unseen_categories_to_unknown(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run_dir = trained
    df = pd.read_csv(data).head(5)
    df["city"] = "zzz-never-seen"
    df.to_csv(tmp_path / "new.csv", index=False)
    code, out = run("predict", run_dir, tmp_path / "new.csv", "-o", tmp_path / "p.csv")
    assert code == 0, out
    assert len(pd.read_csv(tmp_path / "p.csv")) == 5


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        (None, ["nope.csv", "--task", "a:binary"], r"table file not found: .*nope\.csv"),
        ("plain", ["--task", "nosuch:binary"], r"unknown target column 'nosuch' .*available columns: 'x1'"),
        ("plain", ["--task", "buy:binry"], r"unknown kind 'binry'; valid kinds: binary"),
        ("dup", ["--task", "b:binary"], r"duplicate column name\(s\) 'a'"),
        ("odd", ["--task", "one:binary", "--drop", "x3", "--drop", "none"], r"target 'one' has a single class '1'"),
        ("odd", ["--task", "none:binary", "--drop", "x3", "--drop", "one"], r"target 'none' has no labels"),
        (
            "odd",
            ["--task", "buy:binary", "--numeric", "x3", "--drop", "one", "--drop", "none"],
            r"numeric column 'x3' must be numeric but holds text 'abc' at row",
        ),
        ("plain", ["--task", "buy:binary", "--model", "mmoee"], r"unknown model 'mmoee'; available: .*mmoe"),
        ("plain", ["--task", "buy:binary", "--balancer", "eq"], r"unknown balancer 'eq'; available: .*equal"),
        ("plain", ["--task", "buy:binary", "--model-param", "depth=3"], r"model 'shared-bottom' has no parameter"),
        (
            "plain",
            ["--task", "buy:binary", "--task", "x2:regression", "--balancer", "f-mtl", "--balancer-param", "base=famo"],
            r"f-mtl base 'famo' is a loss-level balancer; valid gradient-level bases: .*upgrad",
        ),
        (
            "plain",
            ["--task", "buy:binary", "--task", "x2:regression", "--balancer=rep-mtl", "--balancer-param=base=mgda"],
            r"rep-mtl .*'mgda'.*equal",
        ),
    ],
)
def test_bad_input_gets_one_line_error(tmp_path: Path, make: str | None, args: list[str], message: str) -> None:
    if make == "plain":
        data = _table(tmp_path / "t.csv", n=200)
    elif make == "dup":
        data = tmp_path / "d.csv"
        data.write_text("a,a,b\n1,2,1\n3,4,0\n")
    elif make == "odd":
        df = pd.read_csv(_table(tmp_path / "t.csv", n=200))
        df["one"], df["none"], df["x3"] = 1, np.nan, df.x1.astype(str)
        df.loc[5, "x3"] = "abc"
        data = tmp_path / "odd.csv"
        df.to_csv(data, index=False)
    else:
        data = tmp_path / args.pop(0)
    code, out = run("fit", data, *args, "--epochs", 1, "--quiet", "-o", tmp_path / "run")
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    import re

    assert re.search(message, lines[0]), lines[0]


def test_predict_with_other_columns_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    data, run_dir = trained
    pd.read_csv(data).drop(columns=["x2"]).to_csv(tmp_path / "missing.csv", index=False)
    code, out = run("predict", run_dir, tmp_path / "missing.csv", "-o", tmp_path / "p.csv")
    assert code == 2 and "lacks feature column(s) 'x2'" in out
    df = pd.read_csv(data)
    df["surprise"] = 1
    df.to_csv(tmp_path / "extra.csv", index=False)
    code, out = run("predict", run_dir, tmp_path / "extra.csv", "-o", tmp_path / "p.csv")
    assert code == 2 and "'surprise'" in out
    assert not (tmp_path / "p.csv").exists()


def test_tampered_checkpoint_is_refused(trained: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    _, run_dir = trained
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    meta = json.loads((copy / "checkpoints" / "best.json").read_text())
    tensor_file = copy / "checkpoints" / meta["tensors"]
    tensor_file.write_bytes(tensor_file.read_bytes()[:-100])  # truncated
    code, out = run("evaluate", copy)
    assert code == 2 and "fails its sha256 check" in out and len(out.strip().splitlines()) == 1


def test_catalogues_list_papers() -> None:
    code, out = run("models")
    assert code == 0
    for name in ("single", "shared-bottom", "mmoe", "cgc", "ple"):
        assert f"\n{name} " in f"\n{out}"
    assert "KDD 2018" in out and "RecSys 2020" in out
    code, out = run("balancers")
    assert code == 0 and "CVPR 2018" in out
    code, out = run("datasets")
    assert code == 0 and "multi-mnist" in out and "census-group1" in out
    code, out = run("fit", "--help")
    assert code == 0 and "--resume" in out and "--balancer" in out


def _epochs_done(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "checkpoints" / "last.json").read_text())["trainer_state"]["epoch"])
    except (FileNotFoundError, ValueError, KeyError):
        return 0


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path: Path) -> None:
    """SIGKILL a real `polytask fit` process part-way, resume it, compare with an uninterrupted run."""
    data = _table(tmp_path / "big.csv", n=30000)
    args = ["fit", str(data), "--task", "buy:binary", "--task", "spend:regression", "--epochs", "6",
            "--batch-size", "32", "--patience", "100", "--quiet"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "polytask"]
    full = subprocess.run([*cmd, *args, "-o", str(tmp_path / "full")], env=env, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr
    proc = subprocess.Popen([*cmd, *args, "-o", str(tmp_path / "cut")], env=env, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while _epochs_done(tmp_path / "cut") < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    done = _epochs_done(tmp_path / "cut")
    assert 2 <= done < 6
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = subprocess.run(
        [*cmd, *args, "-o", str(tmp_path / "cut"), "--resume"], env=env, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "full" / "results.json").read_text())
    b = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert b["test"] == a["test"] and b["val"] == a["val"] and b["best_epoch"] == a["best_epoch"]
    assert len((tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()) == 6


def test_task_column_layout_end_to_end(tmp_path: Path) -> None:
    """Each row belongs to one task (e.g. one school per row): one head per task, labels masked."""
    rng = np.random.default_rng(0)
    n = 1200
    group = rng.choice(["s1", "s2", "s3"], n)
    x = rng.normal(size=n)
    slope = pd.Series(group).map({"s1": 1.0, "s2": 2.0, "s3": -1.0}).to_numpy()
    pd.DataFrame({"x": x, "school": group, "score": slope * x + rng.normal(size=n) * 0.1}).to_csv(
        tmp_path / "tc.csv", index=False
    )
    code, out = run("fit", tmp_path / "tc.csv", "--task-column", "school", "--task", "score:regression",
                    "--epochs", 15, "--lr", 0.01, "--quiet", "-o", tmp_path / "run")  # fmt: skip
    assert code == 0, out
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert [t["name"] for t in res["tasks"]] == ["score@s1", "score@s2", "score@s3"]
    # Opposite slopes are only learnable because each task has its own head and labels.
    assert all(res["test"][t]["r2"] > 0.9 for t in ("score@s1", "score@s2", "score@s3"))
