"""Multi-task gain against single-task baselines (Δm%, Δp) and mean rank across methods.

Results are nested dicts ``{task name: {metric name: value}}`` (keys may also be :class:`Task` objects);
metric directions come from :data:`polytask.tasks.METRIC_HIGHER_IS_BETTER`. Both gains are reported,
named, because the field uses both and they disagree when tasks have different numbers of metrics:

Δm% — Maninis, Radosavovic & Kokkinos, "Attentive Single-Tasking of Multiple Tasks", CVPR 2019, in the
convention of Nash-MTL (Navon et al., ICML 2022) and FAMO (Liu et al., NeurIPS 2023); mean over all K
(task, metric) pairs, LOWER is better (negative: multi-task learning helped)::

    Δm% = 100/K · Σ_k (-1)^{δ_k} (M_mt,k - M_b,k) / |M_b,k|,     δ_k = 1 if metric k is higher-is-better

Δp — LibMTL (Lin & Zhang, "LibMTL: A Python Library for Multi-Task Learning", JMLR 2023); average
within each task first, then over the T tasks, HIGHER is better::

    Δp = 100/T · Σ_t 1/N_t Σ_i (-1)^{s_t,i} (M_mt,t,i - M_b,t,i) / |M_b,t,i|,   s_t,i = 1 if lower-is-better

The papers divide by M_b; we divide by |M_b|, which is identical for the usual non-negative metrics and
keeps the sign meaning "better / worse" for a negative baseline (e.g. r2 < 0).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TypeAlias

from polytask.tasks import METRIC_HIGHER_IS_BETTER, Task

__all__ = ["delta_m", "delta_p", "mean_rank"]

Results: TypeAlias = Mapping[str | Task, Mapping[str, float]]
MetricSelection: TypeAlias = Mapping[str | Task, Sequence[str]] | Sequence[str]


def delta_m(
    mt: Results,
    base: Results,
    tasks: Sequence[Task | str] | None = None,
    metrics: MetricSelection | None = None,
) -> float:
    """Δm% of multi-task results ``mt`` against single-task baselines ``base``; lower is better.

    Args:
        mt, base: ``{task: {metric: value}}``.
        tasks: tasks that enter (default: every task of ``mt``, or the keys of a ``metrics`` mapping).
        metrics: which metrics enter: ``{task: [metric, ...]}`` or one list for every task (e.g. ``["auc"]``);
            default: every metric present in both ``mt`` and ``base`` for that task.
    """
    rel = _relative_gains(mt, base, tasks, metrics)
    values = [-r if METRIC_HIGHER_IS_BETTER[m] else r for t in rel for m, r in rel[t].items()]
    return 100.0 * sum(values) / len(values)


def delta_p(
    mt: Results,
    base: Results,
    tasks: Sequence[Task | str] | None = None,
    metrics: MetricSelection | None = None,
) -> float:
    """Δp (LibMTL) of ``mt`` against ``base``: per-task mean first, then mean over tasks; higher is better.

    Arguments as in :func:`delta_m`.
    """
    rel = _relative_gains(mt, base, tasks, metrics)
    per_task = [
        sum(r if METRIC_HIGHER_IS_BETTER[m] else -r for m, r in by_metric.items()) / len(by_metric)
        for by_metric in rel.values()
    ]
    return 100.0 * sum(per_task) / len(per_task)


def mean_rank(
    results: Mapping[str, Results],
    tasks: Sequence[Task | str] | None = None,
    metrics: MetricSelection | None = None,
) -> dict[str, float]:
    """Mean rank of each method over all (task, metric) pairs; 1 is best, ties get their average rank.

    ``results`` is ``{method: {task: {metric: value}}}``; tasks default to those of the first method
    (every method must have them), metrics to those present for every method.
    """
    if not results:
        raise ValueError("mean_rank needs at least one method")
    named = [(f"method '{name}'", _by_name(r)) for name, r in results.items()]
    pairs = _select_pairs(named, tasks, metrics)
    methods = list(results)
    totals = dict.fromkeys(methods, 0.0)
    for t, m in pairs:
        sign = 1.0 if METRIC_HIGHER_IS_BETTER[m] else -1.0
        score = [sign * _value(res, who, t, m) for who, res in named]  # higher score = better
        for i, s in enumerate(score):
            better = sum(o > s for o in score)
            ties = sum(o == s for o in score) - 1
            totals[methods[i]] += 1 + better + ties / 2
    return {name: total / len(pairs) for name, total in totals.items()}


# --------------------------------------------------------------------------------- helpers
def _name(t: Task | str) -> str:
    return t.name if isinstance(t, Task) else str(t)


def _by_name(results: Results) -> dict[str, Mapping[str, float]]:
    return {_name(t): v for t, v in results.items()}


def _relative_gains(
    mt: Results, base: Results, tasks: Sequence[Task | str] | None, metrics: MetricSelection | None
) -> dict[str, dict[str, float]]:
    """``{task: {metric: (M_mt - M_b) / |M_b|}}`` over the selected pairs, validated."""
    mt_n, base_n = _by_name(mt), _by_name(base)
    named = [("multi-task results", mt_n), ("baseline", base_n)]
    out: dict[str, dict[str, float]] = {}
    for t, m in _select_pairs(named, tasks, metrics):
        v, b = _value(mt_n, "multi-task results", t, m), _value(base_n, "baseline", t, m)
        if b == 0:
            raise ValueError(f"baseline {m} of task '{t}' is 0: relative gain divides by zero")
        out.setdefault(t, {})[m] = (v - b) / abs(b)
    return out


def _select_pairs(
    named: list[tuple[str, Mapping[str, Mapping[str, float]]]],
    tasks: Sequence[Task | str] | None,
    metrics: MetricSelection | None,
) -> list[tuple[str, str]]:
    """The (task, metric) pairs that enter, checked to exist in every results dict and to have a direction."""
    per_task: dict[str, Sequence[str]] = {}
    common: Sequence[str] | None = None
    if isinstance(metrics, Mapping):
        per_task = {_name(t): list(ms) for t, ms in metrics.items()}
    elif metrics is not None:
        if isinstance(metrics, str):
            raise TypeError("metrics must be a list of metric names or a {task: [metric, ...]} mapping")
        common = list(metrics)
    if tasks is not None:
        names = [_name(t) for t in tasks]
    elif per_task:
        names = list(per_task)
    else:
        names = list(named[0][1])
    if not names:
        raise ValueError("no task to compare")
    pairs: list[tuple[str, str]] = []
    for t in names:
        for who, res in named:
            if t not in res:
                raise ValueError(f"task '{t}' is missing from the {who}")
        chosen = per_task.get(t, common)
        if chosen is None:
            chosen = [m for m in named[0][1][t] if all(m in res[t] for _, res in named[1:])]
            if not chosen:
                raise ValueError(f"task '{t}': no metric is present in every results dict")
        elif not chosen:
            raise ValueError(f"task '{t}': empty metric selection")
        for m in chosen:
            if m not in METRIC_HIGHER_IS_BETTER:
                known = ", ".join(METRIC_HIGHER_IS_BETTER)
                raise ValueError(f"task '{t}': metric '{m}' has no known direction (known: {known})")
            pairs.append((t, m))
    return pairs


def _value(res: Mapping[str, Mapping[str, float]], who: str, t: str, m: str) -> float:
    if m not in res[t]:
        raise ValueError(f"metric '{m}' of task '{t}' is missing from the {who}")
    v = float(res[t][m])
    if not math.isfinite(v):
        raise ValueError(f"{who}: {m} of task '{t}' is {v}; gains need finite values")
    return v
