"""Result tables: one row per method, one column per (task, metric), plus the gain columns.

Cell values may be floats, ``(mean, std)`` pairs (rendered ``0.9412 ± 0.0012``) or ready strings.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import TextIO, TypeAlias

from polytask.tasks import Task

__all__ = ["format_mean_std", "mean_std", "metrics_table", "print_table"]

Cell: TypeAlias = float | tuple[float, float] | str
Rows: TypeAlias = Mapping[str, Mapping[str | Task, Mapping[str, Cell]]]
_MISSING = "—"


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0.0 for a single value) of e.g. per-seed results."""
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_std needs at least one value")
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1))


def format_mean_std(mean: float, std: float, digits: int = 4) -> str:
    """``format_mean_std(0.94123, 0.00118) == "0.9412 ± 0.0012"``."""
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def metrics_table(
    rows: Rows,
    tasks: Sequence[Task | str] | None = None,
    gains: Mapping[str, Mapping[str, float]] | None = None,
    *,
    digits: int = 4,
) -> str:
    """Markdown table of ``rows`` (``{method: {task: {metric: value}}}``) and ``gains`` (``{method: {"Δm%": x}}``).

    Columns are ``task/metric`` for the given ``tasks`` (default: every task in ``rows``), with a
    :class:`Task`'s metrics in its own order, followed by one column per gain name (signed, 2 decimals).
    """
    header, body = _cells(rows, tasks, gains, digits)
    lines = [
        "| " + " | ".join(_md(h) for h in header) + " |",
        "|" + "|".join([" --- "] + [" ---: "] * (len(header) - 1)) + "|",
    ]
    lines += ["| " + " | ".join(_md(c) for c in row) + " |" for row in body]
    return "\n".join(lines)


def print_table(
    rows: Rows,
    tasks: Sequence[Task | str] | None = None,
    gains: Mapping[str, Mapping[str, float]] | None = None,
    *,
    title: str | None = None,
    digits: int = 4,
    file: TextIO | None = None,
) -> None:
    """Print :func:`metrics_table`: a rich table on a terminal, plain markdown otherwise (pipes, files, CI)."""
    out = sys.stdout if file is None else file
    isatty = getattr(out, "isatty", None)
    if isatty is not None and isatty():
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        header, body = _cells(rows, tasks, gains, digits)
        table = Table(title=title)
        table.add_column(header[0])
        for h in header[1:]:
            table.add_column(h, justify="right")
        for row in body:
            table.add_row(*(Text(c) for c in row))  # Text: no markup interpretation of names
        Console(file=out).print(table)
        return
    if title:
        print(f"**{title}**\n", file=out)
    print(metrics_table(rows, tasks, gains, digits=digits), file=out)


# --------------------------------------------------------------------------------- helpers
def _cells(
    rows: Rows,
    tasks: Sequence[Task | str] | None,
    gains: Mapping[str, Mapping[str, float]] | None,
    digits: int,
) -> tuple[list[str], list[list[str]]]:
    by_name = {method: {_name(t): v for t, v in res.items()} for method, res in rows.items()}
    if tasks is None:
        tasks = list(dict.fromkeys(t for res in by_name.values() for t in res))
    columns: list[tuple[str, str]] = []
    for task in tasks:
        t = _name(task)
        seen = list(dict.fromkeys(m for res in by_name.values() for m in res.get(t, {})))
        order = [m for m in task.metrics if m in seen] if isinstance(task, Task) else []
        columns += [(t, m) for m in order + [m for m in seen if m not in order]]
    gains = gains or {}
    gain_names = list(dict.fromkeys(g for by in gains.values() for g in by))
    methods = list(dict.fromkeys([*rows, *gains]))
    header = ["method", *(f"{t}/{m}" for t, m in columns), *gain_names]
    body = []
    for method in methods:
        res = by_name.get(method, {})
        cells = [method]
        cells += [_fmt(res[t][m], digits) if m in res.get(t, {}) else _MISSING for t, m in columns]
        cells += [f"{gains[method][g]:+.2f}" if g in gains.get(method, {}) else _MISSING for g in gain_names]
        body.append(cells)
    return header, body


def _fmt(v: Cell, digits: int) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, tuple):
        return format_mean_std(v[0], v[1], digits)
    return f"{float(v):.{digits}f}"


def _md(s: str) -> str:
    return str(s).replace("|", "\\|")


def _name(t: Task | str) -> str:
    return t.name if isinstance(t, Task) else str(t)
