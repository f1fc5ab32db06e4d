"""The bench's embedded SQLite file: one row per run, written as runs finish.

WAL mode, every write in its own transaction, and only the runner's main process writes, so a
killed bench leaves every finished row intact and the file never half-written. ``meta`` keeps the
suite's protocol (training settings, data set definitions, metric selection) to refuse a rerun
whose suite changed incompatibly. For merge runs ``fit_seconds`` is the run's work (merge and
evaluation) and ``merge_seconds`` the merge alone.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from polytask.bench._suite import RunSpec, Suite, canonical_json

__all__ = ["SCHEMA_VERSION", "BenchStore"]

SCHEMA_VERSION = 1

_SCHEMA = """
BEGIN;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    dataset TEXT NOT NULL,
    model TEXT NOT NULL,
    balancer TEXT NOT NULL,
    seed INTEGER NOT NULL,
    baseline INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL CHECK (status IN ('pending', 'running', 'done', 'failed')),
    tasks TEXT,
    val TEXT,
    test TEXT,
    delta_m REAL,
    delta_p REAL,
    seconds_per_epoch REAL,
    peak_memory_mb REAL,
    fit_seconds REAL,
    merge_seconds REAL,
    runner_seconds REAL,
    best_epoch TEXT,
    epochs_run INTEGER,
    resumed INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL
);
CREATE INDEX IF NOT EXISTS runs_by_dataset ON runs (dataset, seed);
COMMIT;
"""

_JSON_COLUMNS = ("config", "tasks", "val", "test", "best_epoch")


def _describe_change(old: Any, new: Any, path: str = "") -> str:
    """The first differing key of two JSON documents, e.g. ``train.lr: 0.01 -> 0.02``."""
    if isinstance(old, dict) and isinstance(new, dict):
        for k in sorted(set(old) | set(new)):
            if k in old and k in new:
                if old[k] != new[k]:
                    return _describe_change(old[k], new[k], f"{path}.{k}" if path else k)
            elif k in old:
                return f"{path}.{k}" if path else k
    return f"{path}: {json.dumps(old)} -> {json.dumps(new)}"


class BenchStore:
    """``BENCH_DIR/bench.sqlite``."""

    def __init__(self, path: str | Path, *, create: bool = True) -> None:
        self.path = Path(path)
        if not create and not self.path.is_file():
            raise FileNotFoundError(
                f"{self.path} does not exist: run `polytask bench SUITE -o {self.path.parent}` first"
            )
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            if create:
                self.conn.executescript(_SCHEMA)  # one transaction; every statement is idempotent
                columns = {r[1] for r in self.conn.execute("PRAGMA table_info(runs)")}
                if "merge_seconds" not in columns:  # a bench file from before merge suites
                    self.conn.execute("ALTER TABLE runs ADD COLUMN merge_seconds REAL")
            else:
                self.conn.execute("SELECT 1 FROM runs LIMIT 1")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path} is not a polytask bench database ({e})") from None
        self.conn.row_factory = sqlite3.Row

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> BenchStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
        except BaseException:
            self.conn.execute("ROLLBACK")
            raise
        else:
            self.conn.execute("COMMIT")

    # ------------------------------------------------------------------ meta
    def meta(self) -> dict[str, Any]:
        rows = self.conn.execute("SELECT key, value FROM meta").fetchall()
        return {r["key"]: json.loads(r["value"]) for r in rows}

    def bind_suite(self, suite: Suite) -> None:
        """Record the suite's protocol, or refuse a suite whose protocol differs from the stored one."""
        meta = self.meta()
        protocol = json.loads(canonical_json(suite.protocol()))
        old = meta.get("protocol")
        if old is not None:
            if old.get("train") != protocol["train"] or old.get("metrics") != protocol["metrics"]:
                change = _describe_change(
                    {"train": old.get("train"), "metrics": old.get("metrics")},
                    {"train": protocol["train"], "metrics": protocol["metrics"]},
                )
                raise ValueError(
                    f"{self.path.parent} holds bench '{meta.get('suite', '?')}' run with other settings ({change}); "
                    "its stored runs would not be comparable: restore the suite or choose another -o BENCH_DIR"
                )
            for label, ds in protocol["datasets"].items():
                if label in old["datasets"] and old["datasets"][label] != ds:
                    change = _describe_change(old["datasets"][label], ds, f"datasets.{label}")
                    raise ValueError(
                        f"{self.path.parent} holds bench '{meta.get('suite', '?')}' with data set '{label}' defined "
                        f"differently ({change}); restore the suite or choose another -o BENCH_DIR"
                    )
            protocol["datasets"] = {**old["datasets"], **protocol["datasets"]}
        with self.transaction() as c:
            for key, value in (("schema", SCHEMA_VERSION), ("suite", suite.name), ("protocol", protocol)):
                c.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    # ------------------------------------------------------------------ runs
    def add_runs(self, specs: list[RunSpec]) -> None:
        now = time.time()
        with self.transaction() as c:
            c.executemany(
                "INSERT OR IGNORE INTO runs (run_id, config_hash, config, dataset, model, balancer, seed, baseline,"
                " status, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?)",
                [
                    (
                        s.run_id,
                        s.config_hash,
                        canonical_json({**s.config, "seed": s.seed}),
                        s.dataset,
                        s.model,
                        s.balancer,
                        s.seed,
                        int(s.baseline),
                        now,
                    )
                    for s in specs
                ],
            )

    def statuses(self) -> dict[str, str]:
        return {r["run_id"]: r["status"] for r in self.conn.execute("SELECT run_id, status FROM runs")}

    def mark_running(self, run_id: str) -> None:
        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status='running', started_at=?, attempts=attempts+1, error=NULL WHERE run_id=?",
                (time.time(), run_id),
            )

    def store_result(self, run_id: str, result: dict[str, Any], runner_seconds: float, metrics: Any) -> None:
        """Write one finished run and refresh Δm/Δp of its data set and seed, in one transaction."""

        def js(key: str) -> str | None:
            return json.dumps(result[key]) if result.get(key) is not None else None

        with self.transaction() as c:
            c.execute(
                "UPDATE runs SET status=?, tasks=?, val=?, test=?, seconds_per_epoch=?, peak_memory_mb=?,"
                " fit_seconds=?, merge_seconds=?, runner_seconds=?, best_epoch=?, epochs_run=?, resumed=?, error=?,"
                " finished_at=? WHERE run_id=?",
                (
                    result["status"],
                    js("tasks"),
                    js("val"),
                    js("test"),
                    _finite(result.get("seconds_per_epoch")),
                    _finite(result.get("peak_memory_mb")),
                    _finite(result.get("fit_seconds")),
                    _finite(result.get("merge_seconds")),
                    runner_seconds,
                    js("best_epoch"),
                    result.get("epochs_run"),
                    int(bool(result.get("resumed"))),
                    result.get("error"),
                    time.time(),
                    run_id,
                ),
            )
            row = c.execute("SELECT dataset, seed FROM runs WHERE run_id=?", (run_id,)).fetchone()
            self._refresh_gains(c, row["dataset"], row["seed"], metrics)

    def set_runner_seconds(self, run_id: str, seconds: float) -> None:
        with self.transaction() as c:
            c.execute("UPDATE runs SET runner_seconds=? WHERE run_id=?", (seconds, run_id))

    def _refresh_gains(self, c: sqlite3.Connection, dataset: str, seed: int, metrics: Any) -> None:
        from polytask.bench.leaderboard import gain_pair

        rows = [self._decode(r) for r in c.execute("SELECT * FROM runs WHERE dataset=? AND status='done'", (dataset,))]
        # A merge pool's reference (its individual fine-tunes) does not depend on the merge seed.
        merge = any(r["config"].get("kind") == "merge" for r in rows)
        rows = [r for r in rows if merge or r["seed"] == seed]
        base = next((r for r in rows if r["baseline"]), None)
        for r in rows:
            dm, dp = gain_pair(r["test"], base["test"], r["tasks"], metrics) if base else (None, None)
            c.execute("UPDATE runs SET delta_m=?, delta_p=? WHERE run_id=?", (dm, dp, r["run_id"]))

    def rows(self, status: str | None = None) -> list[dict[str, Any]]:
        query = "SELECT * FROM runs" + (" WHERE status=?" if status else "") + " ORDER BY created_at, rowid"
        return [self._decode(r) for r in self.conn.execute(query, (status,) if status else ())]

    @staticmethod
    def _decode(row: sqlite3.Row) -> dict[str, Any]:
        out = dict(row)
        for key in _JSON_COLUMNS:
            if out.get(key) is not None:
                out[key] = json.loads(out[key])
        return out


def _finite(v: Any) -> float | None:
    return float(v) if v is not None and math.isfinite(float(v)) else None
