"""`polytask sweep`: an Optuna study stored in SQLite, resumed by name, best trial re-trained."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner

from polytask.bench import load_space, sweep
from polytask.bench._suite import SuiteError
from polytask.cli import cli
from polytask.data import load_table
from polytask.evaluate import primary_score
from polytask.train import TrainConfig
from test_bench import _table

SPACE = """\
train:
  lr: {type: float, low: 1.0e-3, high: 1.0e-1, log: true}
  weight_decay: {type: categorical, choices: [0.0, 1.0e-4]}
  batch_size: 128
model:
  n_experts: {type: int, low: 2, high: 3}
"""
TASKS = ["buy:binary", "spend:regression"]


def _cli(*args: object) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sweep")
    (root / "space.yaml").write_text(SPACE)
    return _table(root / "table.csv", n=500), root / "space.yaml"


def test_sweep_stores_three_trials_and_resumes_to_five(files: tuple[Path, Path], tmp_path: Path) -> None:
    table, space = files
    kw = {"model": "mmoe", "space": space, "output": tmp_path, "config": TrainConfig(epochs=2)}
    first = sweep(table, TASKS, trials=3, **kw)
    url = f"sqlite:///{(tmp_path / 'study.db').resolve()}"
    study = optuna.load_study(study_name="table-mmoe-equal", storage=url)
    assert len(study.trials) == 3 and first.ran == 3 and first.n_trials == 3
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    # The objective is the validation selection score, recomputed here from each trial's stored val metrics.
    tasks = load_table(table, TASKS).tasks
    for t in study.trials:
        assert t.value == pytest.approx(primary_score(tasks, t.user_attrs["val"]))
        assert set(t.params) == {"train.lr", "train.weight_decay", "model.n_experts"}
    best = max(study.trials, key=lambda t: t.value)
    assert first.best_trial == best.number and first.best_value == pytest.approx(best.value)
    assert first.best_params["train"]["batch_size"] == 128  # fixed values of the space are applied
    assert first.best_params["model"] == {"n_experts": best.params["model.n_experts"]}

    second = sweep(table, TASKS, trials=5, **kw)
    study = optuna.load_study(study_name="table-mmoe-equal", storage=url)
    assert second.ran == 2 and len(study.trials) == 5
    assert [t.number for t in study.trials] == [0, 1, 2, 3, 4]
    # The best trial was re-trained into a fresh run directory with its test metrics reported.
    run_dir = Path(second.run_dir)
    assert run_dir.name == f"best-trial-{second.best_trial}"
    results = json.loads((run_dir / "results.json").read_text())
    assert results["test"] == second.test and results["model"]["params"]["n_experts"] in (2, 3)
    summary = json.loads((tmp_path / "sweep.json").read_text())
    assert summary["n_trials"] == 5 and summary["test"] == second.test
    assert sweep(table, TASKS, trials=5, **kw).ran == 0


def test_cli_sweep_and_study_with_other_settings(files: tuple[Path, Path], tmp_path: Path) -> None:
    table, space = files
    common = ("--task", TASKS[0], "--task", TASKS[1], "--space", space, "--epochs", 1, "--quiet", "-o", tmp_path)
    code, out, err = _cli("sweep", table, "--model", "mmoe", "--trials", 2, "--study", "s", *common)
    assert code == 0, err
    assert "study 's': 2 trial(s), 2 run now" in out and "test:" in out
    code, _, err = _cli("sweep", table, "--model", "mmoe", "--balancer", "dwa", "--trials", 3, "--study", "s", *common)
    assert code == 2 and err.count("\n") == 1
    assert "error: study 's' in sqlite:///" in err and "was made for other settings (differs in balancer)" in err
    assert len(optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'study.db'}").trials) == 2


@pytest.mark.parametrize(
    ("storage", "shown"),
    [
        ("postgresql://bench:secret@127.0.0.1:1/polytask", "postgresql://bench:***@127.0.0.1:1/polytask"),
        ("sqlite:///{tmp}/missing/dir/study.db", "sqlite:///{tmp}/missing/dir/study.db"),
    ],
)
def test_unreachable_storage_is_a_one_line_error(
    files: tuple[Path, Path], tmp_path: Path, storage: str, shown: str
) -> None:
    table, space = files
    url, shown = storage.format(tmp=tmp_path), shown.format(tmp=tmp_path)
    code, _, err = _cli("sweep", table, "--task", TASKS[0], "--space", space, "--trials", 1, "--model", "mmoe",
                        "--storage", url, "-o", tmp_path / "out", "--quiet")  # fmt: skip
    assert code == 2
    assert err.startswith(f"error: cannot open Optuna storage {shown}: ") and err.count("\n") == 1
    assert "secret" not in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "train:\n  lr: {type: float, low: 0.1, high: 0.01}\n",
            "space.yaml line 2: key 'train.lr': low 0.1 > high 0.01",
        ),
        (
            "model:\n  n_expert: {type: int, low: 2, high: 4}\n",
            "space.yaml line 2: key 'model.n_expert': model 'mmoe' has no parameter 'n_expert'; valid: ",
        ),
        (
            "train:\n  lr: 0.1\n  epochs: {type: uniform}\n",
            "space.yaml line 3: key 'train.epochs': type must be one of",
        ),
        ("optimizer:\n  lr: 0.1\n", "space.yaml line 1: key 'optimizer': unknown group; valid: model, balancer, train"),
        ("train:\n  lr: 0.1\n", "space.yaml: nothing to search"),
    ],
)
def test_space_errors_name_line_and_key(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "space.yaml").write_text(text)
    with pytest.raises(SuiteError) as err:
        load_space(tmp_path / "space.yaml", "mmoe", "equal")
    assert str(err.value).startswith(message), str(err.value)
