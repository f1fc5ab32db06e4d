"""Benchmark harness: comparisons against single-task baselines under one protocol, suites run into
an SQLite-backed bench with resume and parallel workers, its leaderboard, and Optuna sweeps.

Suites either train (data sets x architectures x balancers x seeds) or merge (``kind: merge``: a
pool of fine-tuned models x merge methods with parameter grids x seeds; pools from :data:`POOLS`)."""

from polytask.bench._pool import POOLS, CheckpointPool, Pool, build_finetune_pool, open_pool, register_pool
from polytask.bench._suite import RunSpec, Suite, SuiteError, load_suite, parse_suite, shipped_suites
from polytask.bench.compare import CompareResult, compare
from polytask.bench.leaderboard import Leaderboard, LeaderboardRow, leaderboard
from polytask.bench.runner import BenchSummary, run_bench
from polytask.bench.sweep import SearchSpace, SweepResult, load_space, sweep

__all__ = [
    "POOLS",
    "BenchSummary",
    "CheckpointPool",
    "CompareResult",
    "Leaderboard",
    "LeaderboardRow",
    "Pool",
    "RunSpec",
    "SearchSpace",
    "Suite",
    "SuiteError",
    "SweepResult",
    "build_finetune_pool",
    "compare",
    "leaderboard",
    "load_space",
    "load_suite",
    "open_pool",
    "parse_suite",
    "register_pool",
    "run_bench",
    "shipped_suites",
    "sweep",
]
