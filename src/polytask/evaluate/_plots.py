"""Matplotlib figures for the HTML report, each rendered to PNG bytes (Agg, no pyplot global state).

matplotlib is an optional dependency (``pip install polytask[plots]``); :func:`require_matplotlib`
turns its absence into a one-line error.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = [
    "MissingPlotsDependency",
    "cosine_strip",
    "curves",
    "expert_usage",
    "pareto_parallel",
    "pareto_scatter",
    "require_matplotlib",
    "weights_over_time",
]


class MissingPlotsDependency(ImportError):
    """matplotlib is not installed."""


def require_matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        from matplotlib.figure import Figure
    except ImportError:
        raise MissingPlotsDependency(
            "the report draws its plots with matplotlib, which is not installed: pip install 'polytask[plots]'"
        ) from None
    return Figure


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return buf.getvalue()


def _integer_epochs(ax: Any) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def curves(
    series: Mapping[str, Mapping[str, Mapping[str, Sequence[float]]]],
    tasks: Sequence[str],
    val_metric: Mapping[str, str],
) -> bytes:
    """One row per task: training loss and validation metric per epoch, one line per method.

    ``series[method][task]`` holds ``"train_loss"`` and ``"val"`` lists (one value per epoch).
    """
    figure = require_matplotlib()
    fig = figure(figsize=(10, 2.6 * len(tasks)), layout="constrained")
    axes = fig.subplots(len(tasks), 2, squeeze=False)
    colors = _colors(len(series))
    for row, task in enumerate(tasks):
        for col, (key, title) in enumerate(
            (("train_loss", "training loss"), ("val", f"validation {val_metric[task]}"))
        ):
            ax = axes[row][col]
            for color, (method, by_task) in zip(colors, series.items(), strict=True):
                values = by_task.get(task, {}).get(key, [])
                if values:
                    ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, color=color, label=method)
            ax.set_title(f"{task}: {title}", fontsize=10)
            ax.set_xlabel("epoch")
            _integer_epochs(ax)
            ax.grid(alpha=0.3)
    axes[0][1].legend(fontsize=8, loc="best")
    return _png(fig)


def pareto_scatter(
    points: Mapping[str, tuple[float, float]], front: Sequence[str], axes_names: tuple[str, str]
) -> bytes:
    """Two task metrics, one labelled point per method; the non-dominated points joined in order."""
    figure = require_matplotlib()
    fig = figure(figsize=(6.5, 5), layout="constrained")
    ax = fig.subplots()
    for name, (x, y) in points.items():
        on = name in front
        ax.scatter([x], [y], s=50 if on else 30, color="tab:red" if on else "tab:gray", zorder=3)
        ax.annotate(
            name, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8, fontweight="bold" if on else "normal"
        )
    ordered = sorted((points[n] for n in front), key=lambda p: p[0])
    if len(ordered) > 1:
        ax.plot(
            [p[0] for p in ordered],
            [p[1] for p in ordered],
            color="tab:red",
            lw=1.5,
            zorder=2,
            label="Pareto front (non-dominated)",
        )
        ax.legend(fontsize=8)
    ax.set_xlabel(axes_names[0])
    ax.set_ylabel(axes_names[1])
    ax.margins(0.15)
    ax.grid(alpha=0.3)
    return _png(fig)


def pareto_parallel(
    points: Mapping[str, Sequence[float]], front: Sequence[str], axes_names: Sequence[str], higher: Sequence[bool]
) -> bytes:
    """Parallel coordinates for three or more task metrics; each axis scaled to the methods' range,
    oriented so that up is better; front methods in colour, dominated ones grey and dashed."""
    figure = require_matplotlib()
    fig = figure(figsize=(max(6.0, 1.8 * len(axes_names)), 4.5), layout="constrained")
    ax = fig.subplots()
    cols = list(zip(*points.values(), strict=True))
    lo = [min(c) for c in cols]
    hi = [max(c) for c in cols]

    def scaled(i: int, v: float) -> float:
        s = 0.5 if hi[i] == lo[i] else (v - lo[i]) / (hi[i] - lo[i])
        return s if higher[i] else 1.0 - s

    colors = iter(_colors(max(len(front), 1)))
    xs = list(range(len(axes_names)))
    for name, vals in points.items():
        ys = [scaled(i, v) for i, v in enumerate(vals)]
        if name in front:
            ax.plot(xs, ys, marker="o", color=next(colors), lw=2, label=name)
        else:
            ax.plot(xs, ys, marker="o", color="tab:gray", lw=1, ls="--", alpha=0.7, label=f"{name} (dominated)")
    ax.set_xticks(
        xs,
        [
            f"{n}\n{'↑' if h else '↓'} best {max(c) if h else min(c):.4g}"
            for n, h, c in zip(axes_names, higher, cols, strict=True)
        ],
        fontsize=8,
    )
    ax.set_yticks([0, 1], ["worst", "best"])
    for x in xs:
        ax.axvline(x, color="black", lw=0.5)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    return _png(fig)


def _panels(n: int, max_cols: int, width: float, height: float, pad: tuple[float, float] = (0.0, 0.0)) -> Any:
    """A figure of ``n`` panels of ``width`` x ``height`` inches in rows of at most ``max_cols``; returns
    the figure and its flat array of axes, the ones beyond ``n`` hidden."""
    figure = require_matplotlib()
    cols = min(n, max_cols)
    rows = math.ceil(n / cols)
    fig = figure(figsize=(width * cols + pad[0], height * rows + pad[1]), layout="constrained")
    grid = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in grid[n:]:
        ax.set_visible(False)
    return fig, grid


def cosine_strip(matrices: Sequence[tuple[int, Sequence[Sequence[float]]]], tasks: Sequence[str], title: str) -> bytes:
    """A strip of task-gradient cosine heat maps, one per (epoch, K x K matrix), colour scale [-1, 1]."""
    n = len(matrices)
    k = len(tasks)
    cols = min(n, 4)  # wrapped in rows of four so that the labels stay readable
    size = 1.4 + 0.4 * k
    fig, grid = _panels(n, cols, size, size + 0.4, pad=(1.0, 0.3))
    axes = list(grid[:n])
    image = None
    for ax, (epoch, m) in zip(axes, matrices, strict=True):
        image = ax.imshow(m, vmin=-1, vmax=1, cmap="RdBu")
        ax.set_title(f"epoch {epoch}", fontsize=9)
        ax.set_xticks(range(k), tasks, rotation=90, fontsize=7)
        ax.set_yticks(range(k), tasks if axes.index(ax) % cols == 0 else [""] * k, fontsize=7)
        if k <= 6:
            for i in range(k):
                for j in range(k):
                    v = m[i][j]
                    # White on the saturated ends of the colour map, black in the pale middle.
                    colour = "white" if abs(v) > 0.6 else "black"
                    ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color=colour)
    fig.suptitle(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(grid), shrink=0.8, label="cosine")
    return _png(fig)


def weights_over_time(series: Mapping[str, Mapping[str, Sequence[float]]]) -> bytes:
    """One panel per method: the balancer's mean weight per task and epoch."""
    fig, axes = _panels(len(series), 3, 4.2, 2.8)
    for ax, (method, by_task) in zip(axes, series.items(), strict=False):
        for task, values in by_task.items():
            ax.plot(range(1, len(values) + 1), values, marker="o", ms=3, label=task)
        ax.set_title(method, fontsize=9)
        ax.set_xlabel("epoch")
        _integer_epochs(ax)
        ax.set_ylabel("weight")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _png(fig)


def expert_usage(usage: Mapping[str, Mapping[str, Sequence[float]]]) -> bytes:
    """One heat map per mixture-of-experts method: each task's mean gate weight on each expert."""
    fig, axes = _panels(len(usage), 3, 4.5, 2.6)
    for ax, (method, by_task) in zip(axes, usage.items(), strict=False):
        tasks = list(by_task)
        width = max(len(v) for v in by_task.values())
        m = [list(by_task[t]) + [math.nan] * (width - len(by_task[t])) for t in tasks]
        image = ax.imshow(m, cmap="viridis", vmin=0, aspect="auto")
        ax.set_title(method, fontsize=9)
        ax.set_yticks(range(len(tasks)), tasks, fontsize=8)
        ax.set_xticks(range(width), [str(i) for i in range(width)], fontsize=7)
        ax.set_xlabel("expert")
        fig.colorbar(image, ax=ax, shrink=0.8, label="share")
    return _png(fig)
