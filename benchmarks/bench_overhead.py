"""Runner overhead of ``polytask bench``: time per run spent outside training.

A bench of many tiny runs (a synthetic two-task table made here; 1 epoch of a small MLP, so that
training is short and the runner's own costs are visible) is run into a fresh BENCH_DIR, for each
worker mode; each run's overhead is what the runner's main process spent on it beyond ``fit()``
in the worker: dispatch, SQLite writes (status, result, Δm/Δp refresh), IPC, and for the first run
of a worker the process start (spawn + imports) and the data set load. Reported: the median over
runs (then the median over repeats), the 90th percentile, the first run, and the cost of skipping a
finished run on resume (a second ``run_bench`` of the complete suite, divided by its run count).

    python benchmarks/bench_overhead.py                 # 3 repeats x (workers 0, 1, 2)
    python benchmarks/bench_overhead.py --repeats 1     # quick
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from _common import ROOT, command_line, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.bench import run_bench

SUITE = """\
name: overhead
datasets:
  - name: table.csv
    tasks: [buy:binary, spend:regression]
models: [shared-bottom]
balancers: [equal, uncertainty, dwa]
seeds: [{seeds}]
train: {{epochs: 1, batch_size: 256}}
"""


def _table(path: Path, n: int) -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"x1": rng.normal(size=n), "x2": rng.normal(size=n), "city": rng.choice(list("abcde"), n)})
    df["buy"] = ((df.x1 + (df.city == "a") + rng.normal(size=n) * 0.5) > 0.5).astype(int)
    df["spend"] = df.x1 * 2 + df.x2 + rng.normal(size=n) * 0.1
    df.to_csv(path, index=False)


def _measure(root: Path, workers: int, threads: int, seeds: int) -> dict[str, Any]:
    suite = root / "suite.yaml"
    suite.write_text(SUITE.format(seeds=", ".join(str(s) for s in range(seeds))))
    bench = Path(tempfile.mkdtemp(prefix=f"bench-w{workers}-", dir=root))
    t0 = time.perf_counter()
    summary = run_bench(suite, bench, workers=workers, threads=threads)
    wall = time.perf_counter() - t0
    with sqlite3.connect(bench / "bench.sqlite") as c:
        rows = c.execute("SELECT runner_seconds, fit_seconds FROM runs ORDER BY started_at").fetchall()
    overhead = [r[0] for r in rows]
    fit = [r[1] for r in rows]
    t1 = time.perf_counter()
    again = run_bench(suite, bench, workers=workers, threads=threads)
    skip = (time.perf_counter() - t1) / again.total
    assert summary.failed == 0 and again.executed == 0
    steady = overhead[workers:] if workers else overhead[1:]  # the first run of each worker pays its start
    return {
        "runs": len(rows),
        "wall_s": wall,
        "overhead_median_s": statistics.median(overhead),
        "overhead_mean_s": statistics.fmean(overhead),
        "overhead_steady_median_s": statistics.median(steady),
        "overhead_p90_s": statistics.quantiles(overhead, n=10)[-1],
        "overhead_first_s": overhead[0],
        "fit_median_s": statistics.median(fit),
        "skip_per_run_s": skip,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=10, help="seeds per row (runs = 4 x seeds)")
    ap.add_argument("--rows", type=int, default=4000)
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--note", default="", help="what else ran on the machine meanwhile")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "bench_overhead.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "bench_overhead.md")
    args = ap.parse_args()
    set_threads(1)
    mach = machine(1)
    results: dict[str, list[dict[str, Any]]] = {str(w): [] for w in args.workers}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        root = Path(tmp)
        _table(root / "table.csv", args.rows)
        for _ in range(args.repeats):
            for w in args.workers:  # interleaved, so that machine noise hits every mode alike
                results[str(w)].append(_measure(root, w, 1, args.seeds))

    def med(w: str, key: str) -> float:
        return statistics.median(r[key] for r in results[w])

    summary = {w: {k: med(w, k) for k in results[w][0] if k != "runs"} for w in results}
    write_json(
        args.json,
        {"date": now_utc(), "machine": mach, "command": command_line(), "summary": summary, "repeats": results},
    )
    runs = results[str(args.workers[0])][0]["runs"]
    lines = [
        "# Bench runner overhead per run",
        "",
        f"- date: {now_utc()}",
        f"- machine: {machine_line(mach)}",
        f"- command: `{command_line()}`",
        *([f"- note: {args.note}"] if args.note else []),
        "",
        f"A bench of {runs} tiny runs (synthetic table of {args.rows} rows, two tasks; single-task rows + "
        "shared-bottom x 3 loss balancers x "
        f"{args.seeds} seeds; 1 epoch each) run into a fresh BENCH_DIR per mode and repeat; {args.repeats} "
        "repeat(s), interleaved; each figure is the median over repeats. Overhead of a run: the runner's wall "
        "time for it (dispatch to stored row) minus the worker's `fit()` time, so it holds dispatch, the SQLite "
        "writes, IPC and, for each worker's first run, the process start (spawn + imports) and the data load. "
        "`mean` spreads the worker starts over the bench's runs; `steady` leaves out the first run of each "
        "worker. `skip` is the cost per run of a resumed bench whose "
        "runs are all finished. Workers = 0 trains in the runner's own process. One torch thread per worker.",
        "",
        "| workers | median overhead s | mean s | steady median s | p90 s | first run s | median fit s "
        "| median overhead / fit | skip per run s | wall s |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for w, s in summary.items():
        lines.append(
            f"| {w} | {s['overhead_median_s']:.4f} | {s['overhead_mean_s']:.4f} | {s['overhead_steady_median_s']:.4f} "
            f"| {s['overhead_p90_s']:.4f} "
            f"| {s['overhead_first_s']:.2f} | {s['fit_median_s']:.3f} | "
            f"{s['overhead_median_s'] / s['fit_median_s']:.3f} | {s['skip_per_run_s']:.4f} | {s['wall_s']:.1f} |"
        )
    target = max(s["overhead_median_s"] for s in summary.values())
    lines += [
        "",
        f"Target: under 1 s per run. Largest median overhead: {target:.4f} s "
        f"({'met' if target < 1 else 'NOT met'}). The first run of a worker costs the process start (torch import) "
        "and the data load once; peak memory per run is the worker's VmHWM reset at the run's start "
        "(`/proc/self/clear_refs`), so it includes the interpreter, torch and the cached data set.",
        "",
    ]
    write_text(args.md, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
