"""The leaderboard of a bench, computed from its SQLite file alone.

Per data set and per (model, balancer): test metrics mean ± std over seeds (sample std), Δm% and Δp
against the single-task rows of the same grid on the same seeds (means over the seeds both have),
mean rank over the (task, metric) pairs among the rows of the data set (1 is best), the median
seconds per training epoch and the median peak memory of the runs. Metrics are those the suite
selected (``metrics:``), else each task's primary metric.

For a merge suite (``kind: merge``) the rows of a pool are its individual fine-tuned models (the
reference), the pretrained model and every merge method (with its parameters); beside the per-task
metrics they show the normalised score (merged / individual, in %), Δm% and Δp against the
individual models, the mean rank and the median seconds of the merge itself.
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from polytask.evaluate import delta_m, delta_p, format_mean_std, mean_rank, mean_std
from polytask.tasks import Task

__all__ = ["Leaderboard", "LeaderboardRow", "gain_pair", "leaderboard", "normalised_score", "selected_metrics"]

_NAN = float("nan")


def selected_metrics(tasks: Sequence[Mapping[str, Any]], metrics: Any = None) -> dict[str, list[str]]:
    """``{task: [metric, ...]}``: the suite's selection (a list for every task, or per task), else primaries."""
    names = [t["name"] for t in tasks]
    if isinstance(metrics, Mapping):
        return {t: list(metrics[t]) for t in names if t in metrics}
    if metrics:
        return {t: list(metrics) for t in names}
    return {t["name"]: [Task.from_dict(dict(t)).primary_metric] for t in tasks}


def gain_pair(
    test: Mapping[str, Mapping[str, float]] | None,
    base: Mapping[str, Mapping[str, float]] | None,
    tasks: Sequence[Mapping[str, Any]] | None,
    metrics: Any = None,
) -> tuple[float | None, float | None]:
    """(Δm%, Δp) of one run against its baseline on the selected metrics; ``None`` when undefined."""
    if not test or not base or not tasks:
        return None, None
    sel = selected_metrics(tasks, metrics)
    try:
        return delta_m(test, base, metrics=sel), delta_p(test, base, metrics=sel)
    except ValueError:
        return None, None


@dataclass
class LeaderboardRow:
    dataset: str
    model: str
    balancer: str
    seeds: list[int]
    baseline: bool
    mean: dict[str, dict[str, float]]
    std: dict[str, dict[str, float]]
    delta_m: float = _NAN
    delta_p: float = _NAN
    mean_rank: float = _NAN
    seconds_per_epoch: float = _NAN
    peak_memory_mb: float = _NAN
    normalised: float = _NAN  # merge suites: mean over the selected metrics of merged / individual, in %
    merge_seconds: float = _NAN

    @property
    def label(self) -> str:
        return f"{self.model} / {self.balancer}"


@dataclass
class Leaderboard:
    suite: str
    datasets: dict[str, list[LeaderboardRow]] = field(default_factory=dict)
    columns: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "train"  # or "merge"

    # ------------------------------------------------------------------ rendering
    def _merge_table(self, dataset: str) -> tuple[list[str], list[list[str]]]:
        cols = self.columns[dataset]
        header = ["method", "seeds", *(f"{t} {m}" for t, m in cols)]
        header += ["normalised %", "Δm% ↓", "Δp ↑", "mean rank", "merge s", "peak MiB"]
        body = []
        for r in self.datasets[dataset]:
            cells = [r.model, ",".join(map(str, r.seeds))]
            for t, m in cols:
                v, s = r.mean.get(t, {}).get(m, _NAN), r.std.get(t, {}).get(m, _NAN)
                cells.append("—" if math.isnan(v) else format_mean_std(v, s) if len(r.seeds) > 1 else f"{v:.4f}")
            cells += [_num(r.normalised, ".1f"), _num(r.delta_m, "+.2f"), _num(r.delta_p, "+.2f")]
            cells += [_num(r.mean_rank, ".2f"), _num(r.merge_seconds, ".2f"), _num(r.peak_memory_mb, ".0f")]
            body.append(cells)
        return header, body

    def _table(self, dataset: str) -> tuple[list[str], list[list[str]]]:
        if self.kind == "merge":
            return self._merge_table(dataset)
        cols = self.columns[dataset]
        header = ["model", "balancer", "seeds", *(f"{t} {m}" for t, m in cols)]
        header += ["Δm% ↓", "Δp ↑", "mean rank", "s / epoch", "peak MiB"]
        body = []
        for r in self.datasets[dataset]:
            cells = [r.model, r.balancer, ",".join(map(str, r.seeds))]
            for t, m in cols:
                v, s = r.mean.get(t, {}).get(m, _NAN), r.std.get(t, {}).get(m, _NAN)
                cells.append("—" if math.isnan(v) else format_mean_std(v, s) if len(r.seeds) > 1 else f"{v:.4f}")
            cells += [_num(r.delta_m, "+.2f"), _num(r.delta_p, "+.2f"), _num(r.mean_rank, ".2f")]
            cells += [_num(r.seconds_per_epoch, ".2f"), _num(r.peak_memory_mb, ".0f")]
            body.append(cells)
        return header, body

    def _summary(self) -> str:
        c = self.counts
        return ", ".join(f"{c.get(s, 0)} {s}" for s in ("done", "failed", "running", "pending") if c.get(s))

    def to_markdown(self) -> str:
        lines = [f"runs: {self._summary() or 'none'}", ""]
        for ds in self.datasets:
            header, body = self._table(ds)
            lines += [f"### {ds}", "", "| " + " | ".join(header) + " |"]
            lines.append("|" + "|".join([" --- "] * 2 + [" ---: "] * (len(header) - 2)) + "|")
            lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in body]
            lines.append("")
        for f in self.failed:
            lines.append(f"- failed: {self._what(f)} seed {f['seed']}: {f['error']}")
        return "\n".join(lines).rstrip() + "\n"

    def _what(self, run: Mapping[str, Any]) -> str:
        return f"{run['dataset']} {run['model']}" + ("" if self.kind == "merge" else f" / {run['balancer']}")

    def print(self, file: TextIO | None = None) -> None:
        """A rich table per data set on a terminal; markdown otherwise."""
        out = sys.stdout if file is None else file
        isatty = getattr(out, "isatty", None)
        if not (isatty is not None and isatty()):
            print(self.to_markdown(), file=out, end="")
            return
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text

        console = Console(file=out)
        for ds in self.datasets:
            header, body = self._table(ds)
            table = Table(title=f"{self.suite}: {ds}")
            for i, h in enumerate(header):
                table.add_column(h, justify="left" if i < 2 else "right", no_wrap=True)
            for row in body:
                table.add_row(*(Text(c) for c in row))
            console.print(table)
        console.print(Text(f"runs: {self._summary() or 'none'}"))
        for f in self.failed:
            console.print(Text(f"failed: {self._what(f)} seed {f['seed']}: {f['error']}"))


def _num(v: float, fmt: str) -> str:
    return "—" if v is None or math.isnan(v) else format(v, fmt)


def _mean_over(runs: Sequence[Mapping[str, Any]], seeds: set[int]) -> dict[str, dict[str, float]]:
    chosen = [r["test"] for r in runs if r["seed"] in seeds]
    return {t: {m: statistics.fmean(x[t][m] for x in chosen) for m in chosen[0][t]} for t in chosen[0]}


def _median_of(runs: list[dict[str, Any]], key: str) -> float:
    """Median of ``key`` over the runs that recorded it (NaN when none did)."""
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else _NAN


def _assign_ranks(entries: list[LeaderboardRow], sel: Any) -> None:
    """Each row's mean rank over the selected metrics among ``entries`` (left NaN when undefined)."""
    try:
        ranks = mean_rank({e.label: e.mean for e in entries}, metrics=sel)
    except ValueError:
        return
    for e in entries:
        e.mean_rank = ranks[e.label]


def _seed_row(ds: str, model: str, balancer: str, runs: list[dict[str, Any]]) -> LeaderboardRow:
    """A leaderboard row for one group of runs: its seeds and, per task and metric, the mean and std of
    their test metrics (deltas, timings and ranks are filled in by the caller)."""
    runs = sorted(runs, key=lambda r: r["seed"])
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for t in runs[0]["test"]:
        for m in runs[0]["test"][t]:
            mean.setdefault(t, {})[m], std.setdefault(t, {})[m] = mean_std([r["test"][t][m] for r in runs])
    return LeaderboardRow(ds, model, balancer, [r["seed"] for r in runs], bool(runs[0]["baseline"]), mean, std)


def leaderboard(bench_dir: str | Path) -> Leaderboard:
    """Read ``BENCH_DIR/bench.sqlite`` and build the leaderboard (no training, no data loading)."""
    from polytask.bench._store import BenchStore

    with BenchStore(Path(bench_dir) / "bench.sqlite", create=False) as store:
        meta = store.meta()
        rows = store.rows()
    metrics = meta.get("protocol", {}).get("metrics")
    kind = (meta.get("protocol", {}).get("train") or {}).get("kind", "train")
    board = Leaderboard(str(meta.get("suite", Path(bench_dir).name)), kind=kind)
    for r in rows:
        board.counts[r["status"]] = board.counts.get(r["status"], 0) + 1
    board.failed = [r for r in rows if r["status"] == "failed"]
    done = [r for r in rows if r["status"] == "done" and r["test"]]
    for ds in dict.fromkeys(r["dataset"] for r in done):
        ds_rows = [r for r in done if r["dataset"] == ds]
        tasks = ds_rows[0]["tasks"]
        sel = selected_metrics(tasks, metrics)
        board.columns[ds] = [(t, m) for t, ms in sel.items() for m in ms]
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in ds_rows:
            groups.setdefault((r["model"], r["balancer"]), []).append(r)
        base_runs = next((g for g in groups.values() if g[0]["baseline"]), None)
        if kind == "merge":
            board.datasets[ds] = _merge_entries(ds, groups, base_runs, sel)
            continue
        entries = []
        for (model, balancer), runs in groups.items():
            row = _seed_row(ds, model, balancer, runs)
            if base_runs is not None:
                common = {r["seed"] for r in runs} & {r["seed"] for r in base_runs}
                if common:
                    try:
                        mt, base = _mean_over(runs, common), _mean_over(base_runs, common)
                        row.delta_m, row.delta_p = delta_m(mt, base, metrics=sel), delta_p(mt, base, metrics=sel)
                    except ValueError:
                        pass
            row.seconds_per_epoch = _median_of(runs, "seconds_per_epoch")
            row.peak_memory_mb = _median_of(runs, "peak_memory_mb")
            entries.append(row)
        _assign_ranks(entries, sel)
        entries.sort(key=lambda e: (not e.baseline, math.inf if math.isnan(e.delta_m) else e.delta_m, e.label))
        board.datasets[ds] = entries
    return board


def normalised_score(
    test: Mapping[str, Mapping[str, float]],
    ref: Mapping[str, Mapping[str, float]],
    metrics: Mapping[str, Sequence[str]],
) -> float:
    """Mean over the selected (task, metric) pairs of ``test / ref`` in % (``ref / test`` for lower-is-better
    metrics), so 100 means "as good as the individual models". A merged value may be negative (r2: a
    negative ratio); NaN when a reference value is not positive, or a lower-is-better value is not."""
    from polytask.tasks import METRIC_HIGHER_IS_BETTER

    ratios = []
    for t, ms in metrics.items():
        for m in ms:
            v, b = float(test[t][m]), float(ref[t][m])
            higher = METRIC_HIGHER_IS_BETTER[m]
            if b <= 0 or (not higher and v <= 0) or not (math.isfinite(v) and math.isfinite(b)):
                return _NAN
            ratios.append(v / b if higher else b / v)
    return 100.0 * statistics.fmean(ratios) if ratios else _NAN


def _merge_entries(
    ds: str,
    groups: Mapping[tuple[str, str], list[dict[str, Any]]],
    base_runs: list[dict[str, Any]] | None,
    sel: Mapping[str, Sequence[str]],
) -> list[LeaderboardRow]:
    """A merge pool's rows: individual fine-tunes (the reference), the pretrained model, each merge method.

    The reference does not depend on the merge seed, so every row is compared with it, averaged
    over the row's own seeds."""
    ref = _mean_over(base_runs, {r["seed"] for r in base_runs}) if base_runs else None
    entries = []
    for (label, role), runs in groups.items():
        row = _seed_row(ds, label, role, runs)
        if ref is not None:
            try:
                row.delta_m, row.delta_p = delta_m(row.mean, ref, metrics=sel), delta_p(row.mean, ref, metrics=sel)
                row.normalised = normalised_score(row.mean, ref, sel)
            except (ValueError, KeyError):
                pass
        row.peak_memory_mb = _median_of(runs, "peak_memory_mb")
        row.merge_seconds = _median_of(runs, "merge_seconds")
        entries.append(row)
    _assign_ranks(entries, sel)
    order = {"individual": 0, "pretrained": 1}
    entries.sort(key=lambda e: (order.get(e.balancer, 2), math.inf if math.isnan(e.delta_m) else e.delta_m, e.model))
    return entries
