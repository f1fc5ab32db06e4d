"""One run of a merge suite: merge the pool's models with one method (or score a reference row).

Called by the bench runner in a worker (or in the main process with ``workers=0``) in place of
``fit()``. A run writes a run directory (``config.json``, an empty ``metrics.jsonl``, ``results.json``;
no merged weights: they are cheap to recompute and large for real models) so that ``polytask report``
over the bench folder shows the per-task table and the Pareto front of the methods.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from polytask.bench._pool import Pool, open_pool
from polytask.bench._suite import canonical_json

__all__ = ["execute_merge_run", "prepare_pools"]

_POOLS: dict[str, Pool] = {}


def _pool(spec: dict[str, Any]) -> Pool:
    """The pool of a run, opened once per process (one held at a time)."""
    key = canonical_json(spec)
    if key not in _POOLS:
        _POOLS.clear()
        _POOLS[key] = open_pool(spec)
    return _POOLS[key]


def prepare_pools(pools: dict[str, dict[str, Any]], echo: Any = None, *, keep: bool = True) -> None:
    """Build (or find in the cache) every pool in this process before workers start, so that two
    workers never train the same pool at once; ``keep=False`` then lets this process forget them."""
    _POOLS.clear()  # a pool folder may have been rebuilt since an earlier bench in this process
    for label, spec in pools.items():
        t0 = time.perf_counter()
        _pool(spec)
        if echo is not None:
            echo(f"pool '{label}' ready ({time.perf_counter() - t0:.1f} s)")
    if not keep:
        _POOLS.clear()


def _write_json(path: Path, doc: Any) -> None:
    from polytask.train._checkpoint import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=1))


def _run_files(job: dict[str, Any], pool: Pool, test: dict[str, dict[str, float]], seconds: dict[str, Any]) -> None:
    cfg = job["config"]
    role = cfg["role"]
    if role == "individual":  # the single-task reference row of the report
        model, balancer = {"name": "single", "params": {}}, {"name": "individual fine-tunes", "params": {}}
    elif role == "pretrained":
        model, balancer = {"name": "pretrained", "params": {}}, {"name": "fine-tuned heads", "params": {}}
    else:
        model, balancer = dict(cfg["method"]), {"name": "merge", "params": {}}
    tasks = [t.to_dict() for t in pool.tasks]
    run_dir = Path(job["run_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    _write_json(
        run_dir / "config.json",
        {
            "data_source": {"source": job.get("dataset", "pool"), "pool": cfg["pool"]},
            "model": model,
            "balancer": balancer,
            "train_config": {"seed": job["seed"]},
            "tasks": tasks,
            "merge": cfg,
        },
    )
    (run_dir / "metrics.jsonl").write_text("", encoding="utf-8")
    _write_json(run_dir / "results.json", {"data": job.get("dataset"), "tasks": tasks, "test": test, **seconds})


def execute_merge_run(job: dict[str, Any]) -> dict[str, Any]:
    """Merge and score one run; returns its results or its error, never raises for a failed run."""
    from polytask.bench.runner import _peak_mb, _reset_peak, run_error
    from polytask.merge import DATA_DRIVEN, MERGE_METHODS, merge_state_dicts

    t0 = time.perf_counter()
    reset_ok = _reset_peak()
    cfg = job["config"]
    out: dict[str, Any] = {"run_id": job["run_id"], "status": "failed"}
    work = 0.0
    try:
        pool = _pool(cfg["pool"])
        t_work = time.perf_counter()
        merge_seconds = None
        try:
            if cfg["role"] == "individual":
                test = pool.evaluate_individual()
            elif cfg["role"] == "pretrained":
                test = pool.evaluate(pool.base)
            else:
                name, params = cfg["method"]["name"], dict(cfg["method"]["params"])
                if "seed" in MERGE_METHODS[name].defaults and "seed" not in params:
                    params["seed"] = job["seed"]
                data = None
                if name in DATA_DRIVEN:
                    data = pool.merge_data(cfg["data"]["examples"], cfg["data"]["batch_size"], job["seed"])
                t_merge = time.perf_counter()
                merged = merge_state_dicts(name, pool.base, pool.models, data=data, **params)
                merge_seconds = time.perf_counter() - t_merge
                test = pool.evaluate(merged)
        finally:
            work = time.perf_counter() - t_work
        _run_files(job, pool, test, {"merge_seconds": merge_seconds, "seconds": work})
        out.update(status="done", tasks=[t.to_dict() for t in pool.tasks], test=test, merge_seconds=merge_seconds)
    except Exception as e:  # a failed run is a result: stored with its message, the grid goes on
        out["error"] = run_error(e)
    out["peak_memory_mb"] = _peak_mb(reset_ok)
    out["fit_seconds"] = work
    out["worker_seconds"] = time.perf_counter() - t0
    return out
