"""Merge suites: parsing and line-pointing errors, pools (deterministic, cached), store + resume,
the merge leaderboard (normalised score, Δm) on hand-checked cases, workers, report and CLI."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file

from polytask.bench import leaderboard, load_suite, run_bench
from polytask.bench._pool import POOL_FORMAT, CheckpointPool, build_finetune_pool, open_pool
from polytask.bench._store import BenchStore
from polytask.bench._suite import SuiteError, parse_suite
from polytask.bench.leaderboard import normalised_score
from polytask.cli import cli
from polytask.evaluate import delta_m

TRAIN = "{epochs: 2, batch_size: 64, lr: 0.01}"
POOL = f"""\
pool:
  name: finetune
  params:
    dataset: table.csv
    tasks: [buy:binary, spend:regression]
    pretrain: {TRAIN}
    finetune: {TRAIN}
"""
SUITE = (
    "kind: merge\nname: tiny-merge\n"
    + POOL
    + """\
methods:
  - {name: task-arithmetic, grid: {lam: [0.5, 1.0]}}
  - {name: dare, params: {density: 0.5}}
  - ties
  - regmean
seeds: [0, 1]
data: {examples: 32, batch_size: 16}
"""
)


def _table(path: Path, n: int = 400, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "x3": rng.normal(size=n)})
    df["buy"] = ((df.x1 - df.x3 + rng.normal(size=n) * 0.5) > 0).astype(int)
    df["spend"] = df.x1 * 2 + df.x2 + rng.normal(size=n) * 0.1
    df.to_csv(path, index=False)
    return path


def _suite(root: Path, text: str = SUITE) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "table.csv").exists():
        _table(root / "table.csv")
    (root / "suite.yaml").write_text(text)
    return root / "suite.yaml"


def _cells(bench_dir: Path) -> dict:
    """The leaderboard without timing and memory columns."""
    board = leaderboard(bench_dir)
    return {
        ds: [(r.model, r.seeds, r.mean, r.std, r.delta_m, r.delta_p, r.normalised, r.mean_rank) for r in rows]
        for ds, rows in board.datasets.items()
    }


@pytest.fixture(scope="module")
def bench(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("merge-bench")
    suite = _suite(root)
    summary = run_bench(suite, root / "bench", workers=0, threads=1)
    # individual + pretrained + 2 task-arithmetic + dare x 2 seeds + ties + regmean x 2 seeds
    assert (summary.total, summary.executed, summary.failed) == (9, 9, 0)
    return suite, root / "bench"


# ----------------------------------------------------------------------------- parsing
def test_merge_suite_expands_grid_and_seeds(tmp_path: Path) -> None:
    suite = load_suite(_suite(tmp_path))
    rows = [(r.model, r.balancer, r.seed, r.baseline) for r in suite.runs]
    assert rows == [
        ("individual", "individual", 0, True),
        ("pretrained", "pretrained", 0, False),
        ("task-arithmetic(lam=0.5)", "merge", 0, False),
        ("task-arithmetic(lam=1.0)", "merge", 0, False),
        ("dare(density=0.5)", "merge", 0, False),  # a `seed` parameter: once per seed
        ("dare(density=0.5)", "merge", 1, False),
        ("ties", "merge", 0, False),  # deterministic: once
        ("regmean", "merge", 0, False),  # data-driven: once per seed (the data rows are drawn by seed)
        ("regmean", "merge", 1, False),
    ]
    by_label = {r.model: r for r in suite.runs}
    assert by_label["task-arithmetic(lam=1.0)"].config["method"] == {"name": "task-arithmetic", "params": {"lam": 1.0}}
    assert by_label["regmean"].config["data"] == {"examples": 32, "batch_size": 16}
    assert "data" not in by_label["ties"].config
    assert len({r.run_id for r in suite.runs}) == 9
    assert suite.train == {"kind": "merge"}
    # the table file is resolved against the suite's folder and hashed with the pool
    assert suite.datasets["finetune(table)"]["params"]["dataset"] == str((tmp_path / "table.csv").resolve())


def test_fixed_seed_parameter_runs_once(tmp_path: Path) -> None:
    text = SUITE.replace("{name: dare, params: {density: 0.5}}", "{name: dare, params: {seed: 7}}")
    suite = load_suite(_suite(tmp_path, text))
    assert [r.seed for r in suite.runs if r.model.startswith("dare")] == [0]


@pytest.mark.parametrize(
    ("replace", "by", "message"),
    [
        (
            "  - ties\n",
            "  - tiez\n",
            "line 13: key 'methods': unknown merge method 'tiez'; available: adamerging, atlas",
        ),
        (
            "grid: {lam: [0.5, 1.0]}",
            "grid: {lamda: [0.5, 1.0]}",
            "line 11: key 'methods.grid.lamda': 'task-arithmetic' has no parameter 'lamda'; valid: lam, weights",
        ),
        ("grid: {lam: [0.5, 1.0]}", "grid: {lam: 0.5}", "line 11: key 'methods.grid.lam': needs a non-empty list"),
        ("  - ties\n", "  - map\n", "line 13: key 'methods': merge method 'map' returns a Pareto set of models"),
        ("seeds: [0, 1]", "seedz: [0, 1]", "line 15: key 'seedz': unknown key of a merge suite; valid: kind, name"),
        ("  name: finetune\n", "  name: fine-tune\n", "line 4: key 'pool': unknown merge pool 'fine-tune'; available:"),
        (
            "    pretrain: {",
            "    pretrian: {",
            "line 5: key 'pool': merge pool 'finetune' has no parameter ['pretrian']; valid: data_params, dataset",
        ),
        ("data: {examples: 32", "data: {examples: 0", "line 16: key 'data.examples': must be a positive integer"),
        ("kind: merge", "kind: merj", "line 1: key 'kind': unknown suite kind 'merj'; valid: train, merge"),
    ],
)
def test_bad_merge_suite_points_at_line_and_key(tmp_path: Path, replace: str, by: str, message: str) -> None:
    assert replace in SUITE
    path = _suite(tmp_path, SUITE.replace(replace, by))
    with pytest.raises(SuiteError) as e:
        load_suite(path)
    assert str(e.value).startswith(f"suite.yaml {message}"), str(e.value)
    assert "\n" not in str(e.value)


def test_pool_path_must_be_a_pool_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    text = "kind: merge\npool: {path: empty}\nmethods: [ties]\n"
    with pytest.raises(
        SuiteError, match=r"^s\.yaml line 2: key 'pool': .*empty is not a pool folder \(no pool\.json\)$"
    ):
        parse_suite(text, source="s.yaml", base_dir=tmp_path)


# ----------------------------------------------------------------------------- pools
def test_pool_built_twice_with_one_seed_is_identical(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv")
    kw = {"dataset": str(table), "tasks": ["buy:binary", "spend:regression"], "pretrain": {"epochs": 1}}
    a = build_finetune_pool(**kw, finetune={"epochs": 1}, seed=3, output=tmp_path / "a")
    b = build_finetune_pool(**kw, finetune={"epochs": 1}, seed=3, output=tmp_path / "b")
    c = build_finetune_pool(**kw, finetune={"epochs": 1}, seed=4, output=tmp_path / "c")
    doc_a, doc_b = (json.loads((p / "pool.json").read_text()) for p in (a, b))
    assert doc_a["format"] == POOL_FORMAT and doc_a["sha256"] == doc_b["sha256"]
    for name in ["base.safetensors", "buy.safetensors", "spend.safetensors"]:
        ta, tb, tc = (load_file(str(p / name)) for p in (a, b, c))
        assert all(torch.equal(ta[k], tb[k]) for k in ta)
        assert not all(torch.equal(ta[k], tc[k]) for k in ta)  # another seed, another pool
    pool = CheckpointPool(a)
    # the merged tensors are the shared trunk; the towers stay each task's own
    assert pool.base and all(not k.startswith("towers.") for k in pool.base)
    buy, spend = pool.models
    assert not all(torch.equal(buy[k], spend[k]) for k in buy)
    full_buy = load_file(str(a / "buy.safetensors"))
    base = load_file(str(a / "base.safetensors"))
    assert torch.equal(full_buy["towers.1.out.weight"], base["towers.1.out.weight"])  # spend's tower untouched
    assert not torch.equal(full_buy["towers.0.out.weight"], base["towers.0.out.weight"])


def test_pool_is_cached_by_its_settings(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv")
    spec = {"name": "finetune", "params": {"dataset": str(table), "tasks": ["buy:binary"], "pretrain": {"epochs": 1}}}
    first = open_pool(spec)
    assert isinstance(first, CheckpointPool)
    stamp = (first.folder / "pool.json").stat().st_mtime_ns
    again = open_pool(spec)
    assert again.folder == first.folder and (again.folder / "pool.json").stat().st_mtime_ns == stamp
    assert first.folder.parent.name == "merge-pools"


def test_tampered_pool_file_is_refused(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv")
    folder = build_finetune_pool(
        dataset=str(table), tasks=["buy:binary"], pretrain={"epochs": 1}, output=tmp_path / "p"
    )
    doc = json.loads((folder / "pool.json").read_text())
    doc["sha256"]["buy.safetensors"] = "0" * 64
    (folder / "pool.json").write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"buy\.safetensors does not match its sha256 in pool\.json"):
        CheckpointPool(folder)


def test_merge_data_rows_come_from_validation_and_depend_on_seed(tmp_path: Path) -> None:
    table = _table(tmp_path / "t.csv")
    pool = CheckpointPool(build_finetune_pool(dataset=str(table), tasks=["buy:binary"], output=tmp_path / "p"))
    val = pool._data().val.x["num"]
    a, b, a2 = (pool.merge_data(20, 8, s) for s in (0, 1, 0))
    xa = torch.cat([x["num"] for x, _ in a.tasks[0].batches])
    assert xa.shape[0] == 20 and [len(y) for _, y in a.tasks[0].batches] == [8, 8, 4]
    assert all(bool((val == row).all(1).any()) for row in xa)  # every row is a validation row
    assert torch.equal(xa, torch.cat([x["num"] for x, _ in a2.tasks[0].batches]))
    assert not torch.equal(xa, torch.cat([x["num"] for x, _ in b.tasks[0].batches]))


# ----------------------------------------------------------------------------- store, resume, leaderboard
def test_merge_runs_are_stored_with_metrics_and_timings(bench: tuple[Path, Path]) -> None:
    _, bench_dir = bench
    with sqlite3.connect(bench_dir / "bench.sqlite") as c:
        c.row_factory = sqlite3.Row
        rows = [dict(r) for r in c.execute("SELECT * FROM runs")]
    assert {r["status"] for r in rows} == {"done"}
    base = next(r for r in rows if r["baseline"])
    for r in rows:
        assert set(json.loads(r["test"])) == {"buy", "spend"}
        assert r["peak_memory_mb"] > 0 and r["fit_seconds"] >= 0
        assert (r["merge_seconds"] is not None) == (r["balancer"] == "merge")
        dm = delta_m(json.loads(r["test"]), json.loads(base["test"]), metrics={"buy": ["auc"], "spend": ["r2"]})
        assert r["delta_m"] == pytest.approx(dm)  # against the seed-independent individual row
    assert base["delta_m"] == 0.0


def test_rerun_merges_nothing_and_reproduces_the_leaderboard(bench: tuple[Path, Path]) -> None:
    suite, bench_dir = bench
    before = _cells(bench_dir)
    summary = run_bench(suite, bench_dir, workers=0, threads=1)
    assert (summary.executed, summary.skipped) == (0, 9)
    assert _cells(bench_dir) == before
    # a run lost mid-way (left 'running' by a killed bench) is merged again, alone
    with sqlite3.connect(bench_dir / "bench.sqlite") as c:
        c.execute("UPDATE runs SET status='running' WHERE model='ties'")
    summary = run_bench(suite, bench_dir, workers=0, threads=1)
    assert (summary.executed, summary.skipped) == (1, 8)
    assert _cells(bench_dir) == before


def test_merge_leaderboard_rows_and_normalised_score(bench: tuple[Path, Path]) -> None:
    _, bench_dir = bench
    board = leaderboard(bench_dir)
    assert board.kind == "merge"
    rows = board.datasets["finetune(table)"]
    assert [r.model for r in rows[:2]] == ["individual", "pretrained"]
    ref = rows[0]
    assert (ref.normalised, ref.delta_m, ref.delta_p) == (100.0, 0.0, 0.0)
    dm = [r.delta_m for r in rows[2:]]
    assert dm == sorted(dm)
    for r in rows:
        by_hand = 50.0 * (
            r.mean["buy"]["auc"] / ref.mean["buy"]["auc"] + r.mean["spend"]["r2"] / ref.mean["spend"]["r2"]
        )
        assert r.normalised == pytest.approx(by_hand)
    dare = next(r for r in rows if r.model.startswith("dare"))
    assert dare.seeds == [0, 1] and not np.isnan(dare.merge_seconds)
    md = board.to_markdown()
    assert (
        "| method | seeds | buy auc | spend r2 | normalised % | Δm% ↓ | Δp ↑ | mean rank | merge s | peak MiB |" in md
    )
    assert "| individual | 0 |" in md and "| 100.0 | +0.00 | +0.00 |" in md


def test_normalised_score_hand_values() -> None:
    ref = {"a": {"accuracy": 0.8}, "b": {"rmse": 2.0}}
    merged = {"a": {"accuracy": 0.6}, "b": {"rmse": 4.0}}
    sel = {"a": ["accuracy"], "b": ["rmse"]}
    assert normalised_score(merged, ref, sel) == pytest.approx(100 * (0.75 + 0.5) / 2)  # lower rmse: ref / merged
    assert normalised_score(ref, ref, sel) == 100.0
    assert np.isnan(normalised_score(merged, {"a": {"accuracy": 0.0}, "b": {"rmse": 2.0}}, sel))
    assert np.isnan(normalised_score({"a": {"accuracy": 0.6}, "b": {"rmse": 0.0}}, ref, sel))
    r2 = {"a": ["r2"]}  # a negative merged r2 against a positive reference: a negative ratio
    assert normalised_score({"a": {"r2": -0.25}}, {"a": {"r2": 0.5}}, r2) == pytest.approx(-50.0)


def test_task_arithmetic_lam_one_on_one_model_reproduces_it(tmp_path: Path) -> None:
    """base + 1 * (model - base) is the model: the same scores as the individual row."""
    text = (
        "kind: merge\n"
        + POOL.replace("[buy:binary, spend:regression]", "[buy:binary]")
        + "methods: [{name: task-arithmetic, params: {lam: 1.0}}]\nmetrics: [auc, accuracy]\npretrained: false\n"
    )
    run_bench(_suite(tmp_path, text), tmp_path / "b", workers=0, threads=1)
    rows = leaderboard(tmp_path / "b").datasets["finetune(table)"]
    assert [r.model for r in rows] == ["individual", "task-arithmetic(lam=1.0)"]
    ind, ta = rows
    assert ta.mean["buy"]["auc"] == pytest.approx(ind.mean["buy"]["auc"], abs=1e-7)
    assert ta.normalised == pytest.approx(100.0) and ta.delta_m == pytest.approx(0.0, abs=1e-6)
    assert ta.mean_rank == pytest.approx(1.5)  # tied with the individual model


def test_merge_suite_in_a_worker_process(tmp_path: Path) -> None:
    text = "kind: merge\n" + POOL + "methods: [average]\npretrained: false\n"
    suite = _suite(tmp_path, text)
    run_bench(suite, tmp_path / "w0", workers=0, threads=1)
    summary = run_bench(suite, tmp_path / "w1", workers=1, threads=1)
    assert (summary.executed, summary.failed) == (2, 0)
    assert _cells(tmp_path / "w1") == _cells(tmp_path / "w0")


def test_failed_merge_is_stored_with_its_error(tmp_path: Path) -> None:
    text = "kind: merge\n" + POOL + "methods: [{name: ties, params: {density: 1.5}}]\npretrained: false\n"
    run_bench(_suite(tmp_path, text), tmp_path / "b", workers=0, threads=1)
    board = leaderboard(tmp_path / "b")
    assert board.counts == {"done": 1, "failed": 1}
    assert board.failed[0]["error"].startswith("ValueError: ") and "density" in board.failed[0]["error"]
    assert "- failed: finetune(table) ties(density=1.5) seed 0: ValueError" in board.to_markdown()


def test_old_bench_file_gains_the_merge_seconds_column(tmp_path: Path) -> None:
    BenchStore(tmp_path / "bench.sqlite").close()
    with sqlite3.connect(tmp_path / "bench.sqlite") as c:
        c.execute("ALTER TABLE runs DROP COLUMN merge_seconds")
    BenchStore(tmp_path / "bench.sqlite").close()
    with sqlite3.connect(tmp_path / "bench.sqlite") as c:
        assert "merge_seconds" in {r[1] for r in c.execute("PRAGMA table_info(runs)")}


def test_train_and_merge_suites_do_not_share_a_bench_dir(bench: tuple[Path, Path], tmp_path: Path) -> None:
    _, bench_dir = bench
    train_suite = "datasets: [{name: t.csv, tasks: ['buy:binary']}]\nmodels: [shared-bottom]\ntrain: {epochs: 1}\n"
    _table(tmp_path / "t.csv")
    suite = parse_suite(train_suite, base_dir=tmp_path)
    with pytest.raises(ValueError, match=r"run with other settings \(train\.kind"):
        run_bench(suite, bench_dir, workers=0)


# ----------------------------------------------------------------------------- report, CLI, shipped suite
def test_report_over_a_merge_bench(bench: tuple[Path, Path]) -> None:
    pytest.importorskip("matplotlib")
    from polytask.evaluate.report import render_report

    _, bench_dir = bench
    doc, ids = render_report(bench_dir)
    assert "Data set: finetune(table)" in doc
    assert "single / individual fine-tunes" in doc and "ties / merge" in doc
    assert ids == ["fig-finetune-table-pareto"]  # merges have no training curves: the Pareto front only


def test_cli_bench_and_leaderboard_of_a_merge_suite(bench: tuple[Path, Path], tmp_path: Path) -> None:
    suite, bench_dir = bench
    res = CliRunner().invoke(cli, ["bench", str(suite), "-o", str(bench_dir)])
    assert res.exit_code == 0, res.output
    assert "0 run(s) executed (0 failed), 9 already finished" in res.output
    assert "| individual | 0 |" in res.output
    bad = _suite(tmp_path, SUITE.replace("  - ties\n", "  - tiez\n"))
    res = CliRunner().invoke(cli, ["bench", str(bad), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1].startswith("error: suite.yaml line 13: key 'methods': unknown merge")


def test_shipped_merge_suite_parses() -> None:
    suite = load_suite("merge-multimnist")
    assert suite.name == "merge-multimnist" and suite.train == {"kind": "merge"}
    assert suite.datasets == {"multi-mnist-lenet": {"name": "multimnist-lenet", "params": {"seed": 0}}}
    assert suite.runs[0].model == "individual" and suite.runs[0].baseline
    assert all(r.config["kind"] == "merge" for r in suite.runs)


def test_cli_lists_pool_builders() -> None:
    res = CliRunner().invoke(cli, ["pools"])
    assert res.exit_code == 0
    names = [line.split()[0] for line in res.output.splitlines() if line and not line.startswith(" ")]
    assert names == ["finetune", "glue-minilm", "multimnist-lenet"]
    assert "params: seed=0, n_train=20000, n_val=2000" in res.output


def test_shipped_glue_merge_suite_parses() -> None:
    suite = load_suite("merge-glue-minilm")
    assert suite.datasets == {"glue-minilm": {"name": "glue-minilm", "params": {}}}
    assert [r.model for r in suite.runs][:2] == ["individual", "pretrained"]
    assert suite.metrics["stsb"] == ["pearson"] and suite.metrics["mrpc"] == ["f1"] and len(suite.runs) == 8
