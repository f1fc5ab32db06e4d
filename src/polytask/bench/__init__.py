"""Benchmark harness: comparisons against single-task baselines under one protocol, suites run into
an SQLite-backed bench with resume and parallel workers, its leaderboard, and Optuna sweeps."""

from polytask.bench._suite import RunSpec, Suite, SuiteError, load_suite, parse_suite, shipped_suites
from polytask.bench.compare import CompareResult, compare
from polytask.bench.leaderboard import Leaderboard, LeaderboardRow, leaderboard
from polytask.bench.runner import BenchSummary, run_bench
from polytask.bench.sweep import SearchSpace, SweepResult, load_space, sweep

__all__ = [
    "BenchSummary",
    "CompareResult",
    "Leaderboard",
    "LeaderboardRow",
    "RunSpec",
    "SearchSpace",
    "Suite",
    "SuiteError",
    "SweepResult",
    "compare",
    "leaderboard",
    "load_space",
    "load_suite",
    "parse_suite",
    "run_bench",
    "shipped_suites",
    "sweep",
]
