"""`polytask bench`: suite expansion and errors, SQLite storage, resume, parallel workers, leaderboard."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from polytask.bench import leaderboard, load_suite, run_bench, shipped_suites
from polytask.bench._suite import SuiteError, canonical_json, config_hash
from polytask.cli import cli

SUITE = """\
name: tiny
datasets:
  - name: table.csv
    tasks: [buy:binary, spend:regression]
models: [shared-bottom]
balancers: [equal, uncertainty]
seeds: [0, 1]
train: {epochs: 2, batch_size: 128, lr: 0.01}
"""


def _table(path: Path, n: int = 600, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "city": rng.choice(["a", "b", "c"], n)})
    df["buy"] = ((df.x1 + (df.city == "a") + rng.normal(size=n) * 0.5) > 0.5).astype(int)
    df["spend"] = df.x1 * 2 + df.x2 + rng.normal(size=n) * 0.1
    df.to_csv(path, index=False)
    return path


def _suite_dir(root: Path, text: str = SUITE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "table.csv").exists():
        _table(root / "table.csv")
    (root / "suite.yaml").write_text(text)
    return root / "suite.yaml"


def _rows(bench_dir: Path) -> dict[str, dict]:
    with sqlite3.connect(bench_dir / "bench.sqlite") as c:
        c.row_factory = sqlite3.Row
        return {r["run_id"]: dict(r) for r in c.execute("SELECT * FROM runs")}


def _metric_cells(board_dir: Path) -> dict:
    """The leaderboard without its timing and memory columns (those differ between runs)."""
    board = leaderboard(board_dir)
    return {
        ds: [(r.model, r.balancer, r.seeds, r.mean, r.std, r.delta_m, r.delta_p, r.mean_rank) for r in rows]
        for ds, rows in board.datasets.items()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The tiny suite run uninterrupted, in this process."""
    root = tmp_path_factory.mktemp("bench")
    suite = _suite_dir(root)
    summary = run_bench(suite, root / "ref", workers=0, threads=1)
    assert (summary.total, summary.executed, summary.skipped, summary.failed) == (6, 6, 0, 0)
    return suite, root / "ref"


# ----------------------------------------------------------------------------- suites
def test_config_hash_is_sha256_of_canonical_json() -> None:
    cfg = {"b": [1, 2.5], "a": {"y": None, "x": "é"}}
    text = '{"a":{"x":"é","y":null},"b":[1,2.5]}'
    assert canonical_json(cfg) == text
    assert config_hash(cfg) == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_suite_expands_grid_with_single_baselines_and_extra_rows(tmp_path: Path) -> None:
    text = SUITE.replace("models: [shared-bottom]", "models: [shared-bottom, {name: mmoe, params: {n_experts: 2}}]")
    text += "extra:\n  - {model: cgc, balancer: famo, seeds: [5]}\n  - {model: shared-bottom, seeds: [0]}\n"
    suite = load_suite(_suite_dir(tmp_path, text))
    got = [(r.model, r.balancer, r.seed) for r in suite.runs]
    # single only with equal (never crossed with balancers), then the grid, then the extra rows;
    # the second extra row duplicates a grid run and is not added twice.
    assert got == [
        ("single", "equal", 0),
        ("single", "equal", 1),
        ("shared-bottom", "equal", 0),
        ("shared-bottom", "equal", 1),
        ("shared-bottom", "uncertainty", 0),
        ("shared-bottom", "uncertainty", 1),
        ("mmoe(n_experts=2)", "equal", 0),
        ("mmoe(n_experts=2)", "equal", 1),
        ("mmoe(n_experts=2)", "uncertainty", 0),
        ("mmoe(n_experts=2)", "uncertainty", 1),
        ("cgc", "famo", 5),
    ]
    assert [r.baseline for r in suite.runs].count(True) == 2
    # Seeds share a config hash; the run id is its first 16 hex digits and the seed.
    a, b = suite.runs[2], suite.runs[3]
    assert a.config_hash == b.config_hash == config_hash(a.config)
    assert (a.run_id, b.run_id) == (f"{a.config_hash[:16]}-s0", f"{a.config_hash[:16]}-s1")
    assert len({r.run_id for r in suite.runs}) == len(suite.runs)
    # Parsing again (another process would do the same) gives the same ids.
    assert [r.run_id for r in load_suite(tmp_path / "suite.yaml").runs] == [r.run_id for r in suite.runs]


def test_shipped_suites_parse() -> None:
    shipped = shipped_suites()
    assert {"multimnist", "census-group1"} <= set(shipped)
    mm = load_suite("multimnist")
    assert len(mm.runs) == 3 + 2 * 4 * 3
    assert mm.datasets["multi-mnist"]["params"]["n_train"] == 20000


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("balancers: [equal, uncertainty]", "balancers:\n  - equal\n  - pcgard"),
            "suite.yaml line 8: key 'balancers': unknown balancer 'pcgard'; available: ",
        ),
        (
            ("models: [shared-bottom]", "models: [shared-botom]"),
            "suite.yaml line 5: key 'models': unknown model 'shared-botom'; available: ",
        ),
        (
            ("models: [shared-bottom]", "models: [{name: mmoe, params: {n_expert: 3}}]"),
            "suite.yaml line 5: key 'models': model 'mmoe' has no parameter ['n_expert']; valid: ",
        ),
        (
            ("  - name: table.csv", "  - name: census-grup1"),
            "suite.yaml line 3: key 'datasets': unknown data set 'census-grup1' (no built-in set and no file ",
        ),
        (
            ("train: {epochs: 2, batch_size: 128, lr: 0.01}", "train:\n  epochs: 2\n  learning_rate: 0.1"),
            "suite.yaml line 10: key 'train.learning_rate': unknown training setting; valid: epochs, ",
        ),
        (("seeds: [0, 1]", "seeds: [0, one]"), "suite.yaml line 7: key 'seeds': seeds are integers, got 'one'"),
        (
            ("seeds: [0, 1]", "seeds: [0, 1]\nseeds: [2]"),
            "suite.yaml line 8: not valid YAML: key 'seeds' appears twice",
        ),
        (("balancers: [equal, uncertainty]", "balancers: [equal, uncertainty"), "suite.yaml line 7: not valid YAML"),
        (("name: tiny", "name: tiny\nworkers: 2"), "suite.yaml line 2: key 'workers': unknown key; valid: name, "),
    ],
)
def test_suite_errors_name_line_and_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    assert edit[0] in SUITE
    path = _suite_dir(tmp_path, SUITE.replace(*edit))
    with pytest.raises(SuiteError) as err:
        load_suite(path)
    assert str(err.value).startswith(message), str(err.value)
    assert "\n" not in str(err.value)


def test_unknown_suite_file_lists_shipped_suites() -> None:
    with pytest.raises(FileNotFoundError, match=r"suite file nope.yaml does not exist; shipped suites: .*multimnist"):
        load_suite("nope.yaml")


# ----------------------------------------------------------------------------- runs and storage
def test_runs_are_run_directories_and_sqlite_rows(reference: tuple[Path, Path]) -> None:
    _, ref = reference
    rows = _rows(ref)
    assert len(rows) == 6 and {r["status"] for r in rows.values()} == {"done"}
    with sqlite3.connect(ref / "bench.sqlite") as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    for run_id, r in rows.items():
        results = json.loads((ref / "runs" / run_id / "results.json").read_text())
        assert json.loads(r["test"]) == results["test"]
        assert json.loads(r["config"])["seed"] == r["seed"] and run_id.endswith(f"-s{r['seed']}")
        assert r["config_hash"] == config_hash({k: v for k, v in json.loads(r["config"]).items() if k != "seed"})
        assert r["seconds_per_epoch"] > 0 and r["peak_memory_mb"] > 10 and r["epochs_run"] == 2
        assert 0 <= r["runner_seconds"] < 1.0  # in-process: nothing but the SQLite writes and bookkeeping
        assert r["started_at"] <= r["finished_at"]


def test_interrupted_bench_resumes_skipping_finished_runs(reference: tuple[Path, Path], tmp_path: Path) -> None:
    suite, ref = reference
    seen: list[str] = []

    def interrupt(spec, result) -> None:  # type: ignore[no-untyped-def]
        seen.append(spec.run_id)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_bench(suite, tmp_path / "b", workers=0, threads=1, on_result=interrupt)
    statuses = {k: r["status"] for k, r in _rows(tmp_path / "b").items()}
    assert sorted(statuses.values()) == ["done", "done", "pending", "pending", "pending", "pending"]
    again = run_bench(suite, tmp_path / "b", workers=0, threads=1)
    assert (again.executed, again.skipped) == (4, 2)
    assert {r["attempts"] for k, r in _rows(tmp_path / "b").items() if k in seen} == {1}  # not trained again
    assert _metric_cells(tmp_path / "b") == _metric_cells(ref)
    third = run_bench(suite, tmp_path / "b", workers=0, threads=1)
    assert (third.executed, third.skipped) == (0, 6)


def test_half_finished_run_resumes_from_its_last_checkpoint(reference: tuple[Path, Path], tmp_path: Path) -> None:
    """A run whose process died after epoch 1 continues at epoch 2 and ends exactly as the uninterrupted run."""
    from polytask.train import TrainConfig, fit, load_checkpoint, save_checkpoint

    suite, ref = reference
    spec = load_suite(suite).runs[2]
    cfg = spec.config
    run_dir = tmp_path / "b" / "runs" / spec.run_id
    # What a kill after epoch 1 leaves: the run directory with its epoch-1 `last` checkpoint.
    fit(spec.data_path, cfg["data"]["tasks"], model=cfg["model"]["name"], balancer=cfg["balancer"]["name"],
        config=TrainConfig(**{**cfg["train"], "epochs": 1, "seed": spec.seed}), output=run_dir,
        progress=False)  # fmt: skip
    tensors, meta = load_checkpoint(run_dir / "checkpoints" / "last.json")
    assert meta["trainer_state"]["epoch"] == 1
    meta["train_config"]["epochs"] = 2  # the bench's setting (constant schedule: nothing else depends on it)
    own = ("format", "serial", "tensors", "sha256")  # written by save_checkpoint itself
    save_checkpoint(run_dir / "checkpoints", "last", tensors, {k: v for k, v in meta.items() if k not in own})
    summary = run_bench(suite, tmp_path / "b", workers=0, threads=1)
    assert summary.executed == 6
    row = _rows(tmp_path / "b")[spec.run_id]
    assert row["status"] == "done", row["error"]
    assert row["resumed"] == 1 and row["epochs_run"] == 2
    assert json.loads(row["test"]) == json.loads(_rows(ref)[spec.run_id]["test"])
    assert sum(r["resumed"] for r in _rows(tmp_path / "b").values()) == 1


def test_parallel_workers_store_the_same_rows_as_one_worker(reference: tuple[Path, Path], tmp_path: Path) -> None:
    suite, ref = reference
    summary = run_bench(suite, tmp_path / "par", workers=2, threads=1)
    assert (summary.executed, summary.failed) == (6, 0)
    one, two = _rows(ref), _rows(tmp_path / "par")
    assert set(one) == set(two)
    for run_id in one:
        for col in ("config_hash", "config", "status", "tasks", "val", "test", "delta_m", "delta_p", "epochs_run"):
            assert one[run_id][col] == two[run_id][col], (run_id, col)
    assert _metric_cells(tmp_path / "par") == _metric_cells(ref)


def _hand_gain(mt: dict, base: dict) -> tuple[float, float]:
    """Δm% and Δp on the primary metrics (buy: auc, spend: r2; both higher-is-better), one metric per task."""
    rel = [(mt["buy"]["auc"] - base["buy"]["auc"]) / abs(base["buy"]["auc"])]
    rel.append((mt["spend"]["r2"] - base["spend"]["r2"]) / abs(base["spend"]["r2"]))
    return -100 * sum(rel) / 2, 100 * sum(rel) / 2


def test_leaderboard_gains_equal_a_hand_computation(reference: tuple[Path, Path]) -> None:
    _, ref = reference
    rows = list(_rows(ref).values())
    by_group: dict[tuple[str, str], dict[int, dict]] = {}
    for r in rows:
        by_group.setdefault((r["model"], r["balancer"]), {})[r["seed"]] = json.loads(r["test"])
    base = by_group[("single", "equal")]
    for r in rows:  # per-run columns: against the single-task run of the same seed
        dm, dp = _hand_gain(json.loads(r["test"]), base[r["seed"]])
        assert r["delta_m"] == pytest.approx(dm, abs=1e-9) and r["delta_p"] == pytest.approx(dp, abs=1e-9)

    def mean(runs: dict[int, dict]) -> dict:
        return {t: {m: statistics.fmean(x[t][m] for x in runs.values()) for m in ("auc", "r2") if m in runs[0][t]}
                for t in ("buy", "spend")}  # fmt: skip

    board = leaderboard(ref)
    entries = board.datasets["table.csv"]
    assert (entries[0].model, entries[0].balancer) == ("single", "equal")
    assert board.columns["table.csv"] == [("buy", "auc"), ("spend", "r2")]
    for e in entries:
        runs = by_group[(e.model, e.balancer)]
        dm, dp = _hand_gain(mean(runs), mean(base))
        assert e.delta_m == pytest.approx(dm, abs=1e-9) and e.delta_p == pytest.approx(dp, abs=1e-9)
        auc = [runs[s]["buy"]["auc"] for s in (0, 1)]
        assert e.mean["buy"]["auc"] == pytest.approx(statistics.fmean(auc))
        assert e.std["buy"]["auc"] == pytest.approx(statistics.stdev(auc))
    # Mean rank over the two (task, metric) pairs, 1 = best, among the three rows.
    scores = {(e.model, e.balancer): (e.mean["buy"]["auc"], e.mean["spend"]["r2"]) for e in entries}
    for e in entries:
        mine = scores[(e.model, e.balancer)]
        ranks = [1 + sum(o[i] > mine[i] for o in scores.values()) for i in range(2)]
        assert e.mean_rank == pytest.approx(sum(ranks) / 2)
    md = board.to_markdown()
    assert "| model | balancer | seeds | buy auc | spend r2 | Δm% ↓ | Δp ↑ | mean rank | s / epoch | peak MiB |" in md
    assert "| single | equal | 0,1 |" in md and "runs: 6 done" in md


def test_changed_suite_is_refused_and_nothing_stored_is_lost(reference: tuple[Path, Path], tmp_path: Path) -> None:
    import shutil

    suite, ref = reference
    bench = tmp_path / "copy"
    shutil.copytree(ref, bench)
    before = _rows(bench)
    changed = suite.parent / "changed.yaml"
    changed.write_text(suite.read_text().replace("lr: 0.01", "lr: 0.02"))
    with pytest.raises(ValueError, match=r"holds bench 'tiny' run with other settings \(train.lr: 0.01 -> 0.02\)"):
        run_bench(changed, bench, workers=0, threads=1)
    assert _rows(bench) == before
    # Adding a balancer is compatible: only its runs are trained.
    added = suite.parent / "added.yaml"
    added.write_text(suite.read_text().replace("[equal, uncertainty]", "[equal, uncertainty, dwa]"))
    summary = run_bench(added, bench, workers=0, threads=1)
    assert (summary.executed, summary.skipped) == (2, 6)
    after = _rows(bench)
    assert all(after[k] == v for k, v in before.items())


def _cli(*args: object) -> tuple[int, str, str]:
    res = CliRunner().invoke(cli, [str(a) for a in args])
    if res.exception is not None and not isinstance(res.exception, SystemExit):
        raise res.exception
    return res.exit_code, res.stdout, res.stderr


def test_cli_bench_leaderboard_and_errors(reference: tuple[Path, Path], tmp_path: Path) -> None:
    suite, ref = reference
    code, out, err = _cli("bench", "--leaderboard", ref, "--markdown", tmp_path / "board.md")
    assert code == 0, err
    assert (tmp_path / "board.md").read_text() == leaderboard(ref).to_markdown()
    assert "| single | equal | 0,1 |" in out
    # A failing run (no test split) is stored with its error; the grid goes on; rerun skips it.
    text = SUITE.replace("    tasks: [buy:binary, spend:regression]",
                         "    tasks: [buy:binary, spend:regression]\n    params: {test_fraction: 0}")  # fmt: skip
    failing = _suite_dir(tmp_path / "f", text)
    code, out, err = _cli("bench", failing, "-o", tmp_path / "fb", "--workers", 0, "--threads", 1)
    assert code == 0, err
    assert "FAILED: ValueError: data set 'table.csv' has no test split" in out
    assert "6 run(s) executed (6 failed)" in out
    code, out, _ = _cli("bench", failing, "-o", tmp_path / "fb", "--workers", 0)
    assert "0 run(s) executed (0 failed), 6 already finished" in out
    # Malformed suite over an existing bench: one line, exit 2, the stored rows untouched.
    before = _rows(ref)
    bad = suite.parent / "bad.yaml"
    bad.write_text(suite.read_text().replace("[equal, uncertainty]", "[equal, pcgard]"))
    code, out, err = _cli("bench", bad, "-o", ref)
    assert code == 2
    assert err.startswith("error: bad.yaml line 6: key 'balancers': unknown balancer 'pcgard'; available: aligned-mtl")
    assert err.count("\n") == 1
    assert _rows(ref) == before
    code, _, err = _cli("bench", "--leaderboard", tmp_path / "nothing")
    assert code == 2 and err.startswith("error: ") and "bench.sqlite does not exist" in err
