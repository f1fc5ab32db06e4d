"""Evaluation: per-task metrics on present labels, multi-task gain (Δm%, Δp), mean rank, result tables, reports."""

from polytask.evaluate.gain import delta_m, delta_p, mean_rank
from polytask.evaluate.metrics import compute_metrics, evaluate_predictions, primary_score
from polytask.evaluate.report import find_runs, pareto_front, write_report
from polytask.evaluate.tables import format_mean_std, mean_std, metrics_table, print_table

__all__ = [
    "compute_metrics",
    "delta_m",
    "delta_p",
    "evaluate_predictions",
    "find_runs",
    "format_mean_std",
    "mean_rank",
    "mean_std",
    "metrics_table",
    "pareto_front",
    "primary_score",
    "print_table",
    "write_report",
]
