"""A resumable grid of training runs for the benchmark scripts: rows x seeds, stored after every run.

A *row* is one (architecture, balancer, parameters) setting on one data set; its runs are stored by
seed in a JSON file as they finish, so a killed benchmark resumes where it stopped. A row whose model
is ``single-per-task:MODEL`` trains ``MODEL`` on each task alone (the single-task baseline of an
architecture family) and reports the tasks side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _common import ROOT, fmt_cell, set_threads, write_json
from polytask.data import DataBundle
from polytask.evaluate import delta_m, delta_p, mean_rank
from polytask.nn import build_model
from polytask.train import TrainConfig, fit

__all__ = [
    "PER_TASK",
    "Row",
    "Store",
    "add_grid_arguments",
    "count_parameters",
    "run_grid",
    "run_row_seed",
    "summarise",
    "table",
]

PER_TASK = "single-per-task:"


@dataclass(frozen=True)
class Row:
    """One setting: ``key`` names it in the results file and the table."""

    key: str
    model: str
    balancer: str = "equal"
    model_params: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    label: str = ""


class Store:
    """``{dataset: {row key: {seed: run}}}`` in one JSON file, written after every run."""

    def __init__(self, path: Path, fresh: bool = False) -> None:
        self.path = path
        self.doc: dict[str, Any] = {}
        if path.exists() and not fresh:
            self.doc = json.loads(path.read_text()).get("runs", {})

    def get(self, dataset: str, key: str, seed: int) -> dict[str, Any] | None:
        return self.doc.get(dataset, {}).get(key, {}).get(str(seed))

    def put(self, dataset: str, key: str, seed: int, run: dict[str, Any], meta: dict[str, Any]) -> None:
        self.doc.setdefault(dataset, {}).setdefault(key, {})[str(seed)] = run
        write_json(self.path, {"meta": meta, "runs": self.doc})

    def drop(self, keys: list[str]) -> None:
        for rows in self.doc.values():
            for k in keys:
                rows.pop(k, None)


def count_parameters(bundle: DataBundle, row: Row) -> int:
    if row.model.startswith(PER_TASK):
        model = row.model[len(PER_TASK) :]
        return sum(
            sum(p.numel() for p in build_model(model, [t], bundle.input_spec, **row.model_params).parameters())
            for t in bundle.tasks
        )
    net = build_model(row.model, bundle.tasks, bundle.input_spec, **row.model_params)
    return sum(p.numel() for p in net.parameters())


def run_row_seed(bundle: DataBundle, row: Row, base_train: dict[str, Any], seed: int) -> dict[str, Any]:
    """Train one row with one seed; a diverging or failing run is recorded as an error (a result too)."""
    cfg = TrainConfig(**{**base_train, **row.train, "seed": seed})
    t0 = time.perf_counter()
    try:
        if row.model.startswith(PER_TASK):
            model = row.model[len(PER_TASK) :]
            test: dict[str, Any] = {}
            spe = 0.0
            for task in bundle.tasks:
                res = fit(bundle.select_tasks([task.name]), model=model, model_params=row.model_params,
                          balancer="equal", config=cfg, progress=False)  # fmt: skip
                assert res.test is not None
                test.update(res.test)
                spe += res.seconds_per_epoch
            return {"test": test, "seconds_per_epoch": spe, "seconds": time.perf_counter() - t0}
        res = fit(bundle, model=row.model, model_params=row.model_params, balancer=row.balancer, config=cfg,
                  progress=False)  # fmt: skip
    except Exception as exc:
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    assert res.test is not None
    return {"test": res.test, "best_epoch": res.best_epoch, "seconds_per_epoch": res.seconds_per_epoch,
            "seconds": time.perf_counter() - t0}  # fmt: skip


def summarise(
    runs: dict[str, dict[str, Any]], tasks: list[str], metric: str, baselines: dict[str, str]
) -> dict[str, Any]:
    """Per row: per-seed metric per task, means, s/epoch; Δm%/Δp against ``baselines[row]`` (a row
    key); mean rank over the rows that are not baselines."""
    rows: dict[str, Any] = {}
    for key, by_seed in runs.items():
        ok = [r for r in by_seed.values() if "test" in r]
        if not ok:
            rows[key] = {"error": next(iter(by_seed.values()))["error"], "n": 0}
            continue
        rows[key] = {
            "per_seed": {t: [r["test"][t][metric] for r in ok] for t in tasks},
            "mean": {t: {metric: statistics.fmean(r["test"][t][metric] for r in ok)} for t in tasks},
            "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in ok),
            "n": len(ok),
            "failed_seeds": len(by_seed) - len(ok),
        }
    for key, row in rows.items():
        base = rows.get(baselines.get(key, ""), {}).get("mean")
        if "mean" in row and base is not None and baselines.get(key) != key:
            row["delta_m"] = delta_m(row["mean"], base, metrics=[metric])
            row["delta_p"] = delta_p(row["mean"], base, metrics=[metric])
    base_keys = set(baselines.values())
    mtl = {k: r["mean"] for k, r in rows.items() if k not in base_keys and "mean" in r}
    if mtl:
        for k, rank in mean_rank(mtl, tasks, [metric]).items():
            rows[k]["rank"] = rank
    return rows


def table(
    rows: dict[str, Any],
    order: list[str],
    tasks: list[str],
    metric: str,
    extra: Callable[[str], list[str]] | None = None,
    extra_head: tuple[str, ...] = (),
) -> str:
    """Markdown: one line per row key in ``order`` that has results."""
    head = ["row", *(f"{t} {metric}" for t in tasks), "Δm% ↓", "Δp ↑", "mean rank ↓", "seeds", "s / epoch", *extra_head]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for key in (k for k in order if k in rows):
        row = rows[key]
        more = extra(key) if extra else []
        if "error" in row:
            fail = ["failed"] * len(tasks) + ["—"] * 5
            lines.append(f"| {key} | " + " | ".join([*fail, *more]) + f" |  <!-- {row['error'][:80]} -->")
            continue
        cells = [fmt_cell(row["per_seed"][t]) for t in tasks]
        dm = f"{row['delta_m']:+.2f}" if "delta_m" in row else "—"
        dp = f"{row['delta_p']:+.2f}" if "delta_p" in row else "—"
        rank = f"{row['rank']:.1f}" if "rank" in row and math.isfinite(row["rank"]) else "—"
        note = f" ({row['failed_seeds']} seed(s) failed)" if row.get("failed_seeds") else ""
        lines.append(
            f"| {key}{note} | "
            + " | ".join([*cells, dm, dp, rank, str(row["n"]), f"{row['seconds_per_epoch']:.1f}", *more])
            + " |"
        )
    return "\n".join(lines)


def add_grid_arguments(ap: argparse.ArgumentParser, name: str) -> None:
    """The options every grid script shares; ``name`` names its results JSON and doc."""
    ap.add_argument("--rows", nargs="*", default=None, help="row keys (default: all)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1, help="runs trained at once, one process each")
    ap.add_argument("--fresh", action="store_true", help="ignore the runs stored in the results file")
    ap.add_argument("--report-only", action="store_true", help="write the doc from the stored runs; train nothing")
    ap.add_argument("--note", default="", help="a remark printed under the protocol (e.g. on machine load)")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / f"{name}.json")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / f"{name}.md")


_BUNDLES: dict[str, DataBundle] = {}


def _init_worker(bundles: dict[str, DataBundle], threads: int) -> None:
    set_threads(threads)
    _BUNDLES.update(bundles)


def _run_in_worker(ds: str, row: Row, base_train: dict[str, Any], seed: int) -> dict[str, Any]:
    return run_row_seed(_BUNDLES[ds], row, base_train, seed)


def run_grid(
    store: Store,
    todo: list[tuple[int, str, Row]],
    bundles: dict[str, DataBundle],
    base_train: dict[str, Any],
    metric: str,
    meta: dict[str, Any],
    report_only: bool = False,
    workers: int = 1,
    threads: int = 1,
) -> float:
    """Train every (seed, data set, row) of ``todo`` not stored yet, storing each run as it finishes;
    returns the training seconds of all stored runs. ``workers > 1`` trains that many runs at once in
    spawned processes of ``threads`` threads each (the parent alone writes the store)."""
    missing = [] if report_only else [(s, ds, r) for s, ds, r in todo if store.get(ds, r.key, s) is None]

    def record(seed: int, ds: str, row: Row, run: dict[str, Any]) -> None:
        res = run.get("test")
        shown = ", ".join(f"{t} {m[metric]:.4f}" for t, m in res.items()) if res else run["error"][:120]
        print(f"{ds} | {row.key} | seed {seed}: {shown} ({run['seconds']:.0f} s)", flush=True)
        store.put(ds, row.key, seed, run, meta)

    if workers <= 1:
        for seed, ds, row in missing:
            record(seed, ds, row, run_row_seed(bundles[ds], row, base_train, seed))
    elif missing:
        used = {ds: bundles[ds] for ds in {ds for _, ds, _ in missing}}
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(used, threads)) as pool:
            futures = {
                pool.submit(_run_in_worker, ds, row, base_train, seed): (seed, ds, row) for seed, ds, row in missing
            }
            for fut in as_completed(futures):
                record(*futures[fut], fut.result())
    return sum(r.get("seconds", 0.0) for rows in store.doc.values() for by in rows.values() for r in by.values())
