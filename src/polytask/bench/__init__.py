"""Benchmark harness: comparisons against single-task baselines under one protocol."""

from polytask.bench.compare import CompareResult, compare

__all__ = ["CompareResult", "compare"]
