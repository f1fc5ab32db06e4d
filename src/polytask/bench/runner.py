"""Run a suite: every run of the grid once, stored in ``BENCH_DIR/bench.sqlite`` as it finishes.

Each run is a normal run directory ``BENCH_DIR/runs/<hash16>-s<seed>/`` (config, metrics log,
checkpoints, results), trained by :func:`polytask.train.fit` on the same splits for every seed; a
merge suite's run merges its pool's models instead (:mod:`polytask.bench._merge_run`; the pools are
built or read from the cache in the main process first).
A rerun skips finished runs and continues half-finished ones from their ``last`` checkpoint (the
trainer's resume), so a killed bench loses at most the epochs since the last checkpoint.

Workers: ``workers >= 1`` trains in that many long-lived processes (spawn start method), each with
``threads`` torch threads (default: usable cores // workers); the main process alone writes the
SQLite file. ``workers = 0`` trains in this process (debugging).

Peak memory is the peak resident set size (VmHWM) of the process that trained the run, reset at the
run's start through ``/proc/self/clear_refs`` (Linux); it includes the interpreter, torch and the
cached data set of that process, i.e. what a user would need to hold the run. Where the reset is
not available the lifetime peak ``ru_maxrss`` is stored instead (an upper bound).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import shutil
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytask.bench._store import BenchStore
from polytask.bench._suite import RunSpec, Suite, canonical_json, load_suite

__all__ = ["BenchSummary", "execute_run", "run_bench", "usable_cores"]


@dataclass
class BenchSummary:
    total: int
    executed: int
    skipped: int
    failed: int
    seconds: float
    overhead: list[float]  # runner seconds outside fit() per executed run

    def line(self) -> str:
        return (
            f"{self.executed} run(s) executed ({self.failed} failed), {self.skipped} already finished; "
            f"{self.seconds:.1f} s"
        )


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------- worker side
_BUNDLES: dict[str, Any] = {}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb(reset_ok: bool) -> float:
    if reset_ok:
        try:
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        except OSError:
            pass
    scale = 1024.0 * 1024.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _bundle(data: dict[str, Any], path: str | None) -> Any:
    """The data set of a run, loaded once per process (every run of a data set uses the same splits)."""
    from polytask.train import load_data

    key = canonical_json([data, path])
    if key not in _BUNDLES:
        _BUNDLES.clear()  # one data set held at a time: a worker's memory stays that of one run
        _BUNDLES[key] = load_data(
            path or data["name"], data["tasks"] or None, seed=data["split_seed"], **data["params"]
        )
    return _BUNDLES[key]


def _watch_parent(parent: int) -> None:
    # A worker whose runner was killed must not go on writing into a run directory that a resumed
    # bench will train again: it exits as soon as it is orphaned.
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _init_worker(threads: int) -> None:
    import threading

    import torch

    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    torch.set_num_threads(threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(threads)
    except ImportError:  # pragma: no cover - ships with scikit-learn
        pass


def run_error(e: BaseException) -> str:
    """A failed run's stored error: the exception type and the first line of its message."""
    msg = str(e.args[0]) if e.args else repr(e)
    return f"{type(e).__name__}: {msg.splitlines()[0] if msg else ''}"


def execute_run(job: dict[str, Any]) -> dict[str, Any]:
    """Train one run (in a worker); returns its results or its error, never raises for a failed run."""
    if job["config"].get("kind") == "merge":
        from polytask.bench._merge_run import execute_merge_run

        return execute_merge_run(job)
    from polytask.train import TrainConfig, fit

    t0 = time.perf_counter()
    reset_ok = _reset_peak()
    cfg, run_dir = job["config"], Path(job["run_dir"])
    out: dict[str, Any] = {"run_id": job["run_id"], "status": "failed"}
    fit_seconds = 0.0
    try:
        bundle = _bundle(cfg["data"], job.get("data_path"))
        resume = (run_dir / "checkpoints" / "last.json").is_file()
        if run_dir.exists() and not resume:
            shutil.rmtree(run_dir)  # stopped before its first checkpoint: nothing worth keeping
        config = TrainConfig(**{**cfg["train"], "seed": job["seed"]})
        t_fit = time.perf_counter()
        try:
            res = fit(
                bundle,
                model=cfg["model"]["name"],
                model_params=cfg["model"]["params"],
                balancer=cfg["balancer"]["name"],
                balancer_params=cfg["balancer"]["params"],
                config=config,
                output=run_dir,
                resume=resume,
                progress=False,
                device=job.get("device", "auto"),
            )
        finally:
            fit_seconds = time.perf_counter() - t_fit
        if res.test is None:
            raise ValueError(f"data set '{cfg['data']['name']}' has no test split; the leaderboard needs one")
        out.update(
            status="done",
            tasks=[t.to_dict() for t in bundle.tasks],
            val=res.val,
            test=res.test,
            seconds_per_epoch=res.seconds_per_epoch,
            best_epoch=res.best_epoch,
            epochs_run=len(res.history),
            resumed=resume,
        )
    except Exception as e:  # a failed run is a result: stored with its message, the grid goes on
        out["error"] = run_error(e)
    out["peak_memory_mb"] = _peak_mb(reset_ok)
    out["fit_seconds"] = fit_seconds
    out["worker_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- main side
def _job(spec: RunSpec, bench_dir: Path, device: str) -> dict[str, Any]:
    return {
        "device": device,
        "run_id": spec.run_id,
        "config": spec.config,
        "seed": spec.seed,
        "data_path": spec.data_path,
        "run_dir": str(bench_dir / "runs" / spec.run_id),
        "dataset": spec.dataset,
    }


def run_bench(
    suite: Suite | str | Path,
    output: str | Path,
    *,
    workers: int = 1,
    threads: int | None = None,
    retry_failed: bool = False,
    echo: Callable[[str], Any] | None = None,
    on_result: Callable[[RunSpec, dict[str, Any]], Any] | None = None,
    device: str = "auto",
) -> BenchSummary:
    """Run every unfinished run of ``suite`` into ``output`` (BENCH_DIR); see the module docstring.

    ``device`` is where training runs train (``auto``: the GPU when torch sees one; several workers
    then share it). It is not part of a run's identity: a bench resumed elsewhere keeps its runs.
    Merge runs always merge on the CPU.

    ``on_result(spec, result)`` is called after each run is stored (e.g. to stop early by raising).
    """
    t_start = time.perf_counter()
    suite = suite if isinstance(suite, Suite) else load_suite(suite)
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    from polytask.train import resolve_device

    resolve_device(device)  # a bad --device fails here, not once per run in the workers
    bench_dir = Path(output)
    threads = threads or max(1, usable_cores() // max(workers, 1))
    bench_dir.mkdir(parents=True, exist_ok=True)
    store = BenchStore(bench_dir / "bench.sqlite")
    try:
        store.bind_suite(suite)
        store.add_runs(suite.runs)
        status = store.statuses()
        todo = [s for s in suite.runs if status[s.run_id] != "done" and (retry_failed or status[s.run_id] != "failed")]
        summary = BenchSummary(len(suite.runs), 0, len(suite.runs) - len(todo), 0, 0.0, [])
        if echo is not None and summary.skipped:
            echo(f"{summary.skipped} of {summary.total} run(s) already in {bench_dir / 'bench.sqlite'}: skipped")
        metrics = suite.metrics
        if todo and suite.train.get("kind") == "merge":
            from polytask.bench._merge_run import prepare_pools

            prepare_pools({s.dataset: s.config["pool"] for s in todo}, echo, keep=workers == 0)

        def finished(spec: RunSpec, result: dict[str, Any], t_dispatch: float) -> None:
            store.store_result(spec.run_id, result, 0.0, metrics)
            # Everything this run cost the runner beyond fit(): dispatch, data loading, IPC, the write above.
            overhead = time.perf_counter() - t_dispatch - result["fit_seconds"]
            store.set_runner_seconds(spec.run_id, overhead)
            summary.executed += 1
            summary.failed += result["status"] == "failed"
            summary.overhead.append(overhead)
            if echo is not None:
                done = summary.skipped + summary.executed
                what = f"{spec.dataset} {spec.model} / {spec.balancer} seed {spec.seed}"
                if spec.config.get("kind") == "merge":  # the method is the row; no balancer
                    what = f"{spec.dataset} {spec.model} seed {spec.seed}"
                if result["status"] == "done":
                    tail = f"{result['fit_seconds']:.1f} s" + (" (resumed)" if result.get("resumed") else "")
                else:
                    tail = f"FAILED: {result['error']}"
                echo(f"[{done}/{summary.total}] {what}: {tail}")
            if on_result is not None:
                on_result(spec, result)

        if workers == 0:
            import torch

            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            _BUNDLES.clear()  # files may have changed since an earlier bench in this process
            try:
                for spec in todo:
                    t0 = time.perf_counter()
                    store.mark_running(spec.run_id)
                    finished(spec, execute_run(_job(spec, bench_dir, device)), t0)
            finally:
                torch.set_num_threads(before)
        elif todo:
            _run_pool(todo, bench_dir, store, workers, threads, finished, device)
    finally:
        store.close()
    summary.seconds = time.perf_counter() - t_start
    return summary


def _run_pool(
    todo: list[RunSpec],
    bench_dir: Path,
    store: BenchStore,
    workers: int,
    threads: int,
    finished: Callable[[RunSpec, dict[str, Any], float], None],
    device: str,
) -> None:
    ctx = mp.get_context("spawn")  # fork would copy this process's torch thread pools and locks
    pending = list(todo)

    def new_pool() -> ProcessPoolExecutor:
        n = min(workers, len(pending))
        return ProcessPoolExecutor(n, mp_context=ctx, initializer=_init_worker, initargs=(threads,))

    pool = new_pool()
    in_flight: dict[Future[dict[str, Any]], tuple[RunSpec, float]] = {}
    try:
        while pending or in_flight:
            while pending and len(in_flight) < workers:
                spec = pending.pop(0)
                store.mark_running(spec.run_id)
                in_flight[pool.submit(execute_run, _job(spec, bench_dir, device))] = (spec, time.perf_counter())
            done, _ = wait(list(in_flight), timeout=0.5, return_when=FIRST_COMPLETED)  # timeout: Ctrl-C stays live
            broken = False
            for fut in done:
                spec, t0 = in_flight.pop(fut)
                try:
                    result = fut.result()
                except BrokenProcessPool:
                    # A worker died (killed, out of memory): its run fails, the grid goes on in new workers.
                    result = {"run_id": spec.run_id, "status": "failed", "fit_seconds": 0.0,
                              "error": "a worker process died during the run (killed or out of memory?)"}  # fmt: skip
                    broken = True
                finished(spec, result, t0)
            if broken:
                for fut, (spec, _t0) in in_flight.items():
                    fut.cancel()
                    pending.insert(0, spec)  # not this run's fault: run it again
                in_flight.clear()
                _stop(pool)
                pool = new_pool()
        pool.shutdown(wait=True)
    finally:
        _stop(pool)


def _stop(pool: ProcessPoolExecutor) -> None:
    """Shut the pool down now, killing workers that are still training (an interrupted bench)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())  # no public API for this before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for p in processes:
        if p.is_alive():
            p.terminate()
