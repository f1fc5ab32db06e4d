"""One self-contained HTML report for a run directory or a folder of runs.

A *run directory* is a folder holding ``config.json``, ``metrics.jsonl`` and ``results.json`` (what
``polytask fit`` writes; ``polytask compare`` and ``polytask bench`` write one per run). The report
finds every run directory below the given folder, groups the runs by data set, then by method
(model and its parameters / balancer and its parameters), averaging over training seeds, and draws:

* training loss and validation primary metric per epoch and task;
* the per-task test metrics, mean ± std over seeds, with Δm% and Δp against the ``single`` model's
  runs on the same data when there are any (:mod:`polytask.evaluate.gain`);
* the Pareto front of the methods' per-task primary test metrics (2 tasks: a scatter with the
  non-dominated points joined and labelled; 3 or more: parallel coordinates);
* task-gradient cosine similarity per epoch (heat maps) for runs whose balancer formed the Gramian;
* the balancer's task weights per epoch;
* expert usage per task for mixture-of-experts models (from the logged diagnostics).

Images are inline base64 PNGs and the CSS is inline: the file makes no network request and runs no
script. matplotlib is optional (``pip install polytask[plots]``).
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from polytask.evaluate import _plots
from polytask.evaluate.gain import delta_m, delta_p
from polytask.evaluate.tables import format_mean_std, mean_std
from polytask.tasks import METRIC_HIGHER_IS_BETTER, Task

__all__ = ["RunRecord", "find_runs", "load_run_record", "pareto_front", "render_report", "write_report"]

RUN_FILES = ("config.json", "metrics.jsonl", "results.json")
BASELINE_MODEL = "single"
MAX_HEATMAPS = 8  # epochs shown per cosine strip (evenly spaced, always the first and the last)


@dataclass
class RunRecord:
    """One run directory's files, parsed."""

    path: Path
    config: dict[str, Any]
    history: list[dict[str, Any]]
    results: dict[str, Any]

    @property
    def data(self) -> str:
        src = self.config.get("data_source") or {}
        return str(src.get("source") or self.results.get("data") or "?")

    @property
    def model(self) -> str:
        return str((self.config.get("model") or {}).get("name", "?"))

    @property
    def method(self) -> str:
        """``model(params) / balancer(params)``: runs that differ only by seed share it."""
        return f"{_with_params(self.config.get('model'))} / {_with_params(self.config.get('balancer'))}"

    @property
    def seed(self) -> int:
        return int((self.config.get("train_config") or {}).get("seed", 0))

    @property
    def tasks(self) -> list[Task]:
        specs = self.results.get("tasks") or self.config.get("tasks") or []
        try:
            return [Task.from_dict(t) for t in specs]
        except (TypeError, ValueError, KeyError) as e:
            raise ValueError(f"{self.path / 'results.json'}: task descriptions not understood ({e})") from None

    def split_metrics(self) -> tuple[str, dict[str, dict[str, float]]]:
        """The test metrics, or the validation ones for a run without a test split."""
        if self.results.get("test"):
            return "test", self.results["test"]
        return "val", self.results.get("val") or {}


def _with_params(spec: Mapping[str, Any] | None) -> str:
    if not spec:
        return "?"
    params = spec.get("params") or {}
    inner = ", ".join(f"{k}={v}" for k, v in sorted(params.items()))
    return f"{spec.get('name', '?')}({inner})" if inner else str(spec.get("name", "?"))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (line {e.lineno}): {e.msg}") from None


def load_run_record(run_dir: str | Path) -> RunRecord:
    """Parse one run directory; a malformed file is a one-line ``ValueError`` naming it."""
    run_dir = Path(run_dir)
    missing = [f for f in RUN_FILES if not (run_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{run_dir} is not a run directory: {', '.join(missing)} missing")
    history = []
    path = run_dir / "metrics.jsonl"
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            history.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {i} is not valid JSON: {e.msg}") from None
    return RunRecord(run_dir, _read_json(run_dir / "config.json"), history, _read_json(run_dir / "results.json"))


def find_runs(root: str | Path) -> list[RunRecord]:
    """Every run directory at or below ``root``, in path order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} does not exist or is not a directory")
    found = sorted({p.parent for p in root.rglob("results.json") if all((p.parent / f).is_file() for f in RUN_FILES)})
    return [load_run_record(p) for p in found]


def pareto_front(points: Mapping[str, Sequence[float]], higher_is_better: Sequence[bool]) -> list[str]:
    """Names of the non-dominated points: no other point is at least as good on every coordinate and
    strictly better on one. Points with a NaN coordinate are never on the front."""
    signs = [1.0 if h else -1.0 for h in higher_is_better]
    scored = {n: [s * float(v) for s, v in zip(signs, p, strict=True)] for n, p in points.items()}
    valid = {n: p for n, p in scored.items() if not any(math.isnan(v) for v in p)}
    front = []
    for name, p in valid.items():
        dominated = any(
            all(a >= b for a, b in zip(q, p, strict=True)) and any(a > b for a, b in zip(q, p, strict=True))
            for other, q in valid.items()
            if other != name
        )
        if not dominated:
            front.append(name)
    return front


# --------------------------------------------------------------------------------- aggregation
def _group(runs: Sequence[RunRecord]) -> dict[str, dict[str, list[RunRecord]]]:
    """``{data set: {method: [runs sorted by seed]}}``."""
    out: dict[str, dict[str, list[RunRecord]]] = {}
    for r in runs:
        out.setdefault(r.data, {}).setdefault(r.method, []).append(r)
    for methods in out.values():
        for rs in methods.values():
            rs.sort(key=lambda r: r.seed)
    return out


def _mean_metrics(runs: Sequence[RunRecord]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """Mean and std over seeds of each (task, metric) present in every run."""
    per_run = [r.split_metrics()[1] for r in runs]
    mean: dict[str, dict[str, float]] = {}
    std: dict[str, dict[str, float]] = {}
    for task in per_run[0]:
        for metric in per_run[0][task]:
            vals = [m.get(task, {}).get(metric) for m in per_run]
            if any(v is None for v in vals):
                continue
            mu, sd = mean_std([float(v) for v in vals])
            mean.setdefault(task, {})[metric] = mu
            std.setdefault(task, {})[metric] = sd
    return mean, std


def _epoch_series(runs: Sequence[RunRecord], get: Any) -> list[float]:
    """Per-epoch mean over seeds of ``get(record)`` (epochs that every seed reached)."""
    lists = [[get(h) for h in r.history] for r in runs]
    n = min((len(v) for v in lists), default=0)
    out = []
    for i in range(n):
        vals = [v[i] for v in lists if v[i] is not None and not math.isnan(v[i])]
        out.append(sum(vals) / len(vals) if vals else math.nan)
    return out


def _dig(record: Mapping[str, Any], *keys: str) -> float | None:
    cur: Any = record
    for k in keys:
        if not isinstance(cur, Mapping) or k not in cur:
            return None
        cur = cur[k]
    return float(cur) if isinstance(cur, int | float) else None


# --------------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px auto;max-width:1180px;color:#222;
 padding:0 16px}
h1{font-size:1.6em;margin-bottom:0}h2{border-bottom:2px solid #ddd;padding-bottom:4px;margin-top:2em}
h3{margin-top:1.6em}.meta{color:#666;margin-top:4px}
table{border-collapse:collapse;margin:8px 0;font-size:0.86em}th,td{border:1px solid #ccc;padding:4px 8px}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.base td{background:#f7faff}figure{margin:12px 0}figure img{max-width:100%;border:1px solid #eee}
figcaption{color:#555;font-size:0.86em;margin-top:4px}.note{color:#555;font-size:0.9em}
"""


def _img(fig_id: str, title: str, png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    t = html.escape(title)
    return (
        f'<figure id="{fig_id}"><img id="{fig_id}-img" class="plot" title="{t}" alt="{t}" '
        f'src="data:image/png;base64,{data}"><figcaption>{html.escape(caption)}</figcaption></figure>'
    )


def _slug(s: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in s).strip("-").lower() or "x"


def _metrics_table(
    methods: Mapping[str, list[RunRecord]], tasks: Sequence[Task], baseline: str | None
) -> tuple[str, dict[str, dict[str, float]]]:
    stats = {m: _mean_metrics(rs) for m, rs in methods.items()}
    columns = [(t.name, m) for t in tasks for m in t.metrics if any(m in s[0].get(t.name, {}) for s in stats.values())]
    gains: dict[str, dict[str, float]] = {}
    if baseline is not None:
        base = stats[baseline][0]
        for m, (mean, _) in stats.items():
            try:
                gains[m] = {"Δm%": delta_m(mean, base), "Δp": delta_p(mean, base)}
            except ValueError:
                gains[m] = {"Δm%": math.nan, "Δp": math.nan}
    head = "".join(
        f"<th>{html.escape(t)}<br>{html.escape(m)} {'↑' if METRIC_HIGHER_IS_BETTER[m] else '↓'}</th>"
        for t, m in columns
    )
    if gains:
        head += "<th>Δm% ↓</th><th>Δp ↑</th>"
    rows = []
    for m, rs in methods.items():
        mean, std = stats[m]
        cells = []
        for t, metric in columns:
            if metric in mean.get(t, {}):
                mu, sd = mean[t][metric], std[t][metric]
                cells.append(format_mean_std(mu, sd) if len(rs) > 1 else f"{mu:.4f}")
            else:
                cells.append("—")
        if gains:
            cells += ["—" if math.isnan(v) else f"{v:+.2f}" for v in (gains[m]["Δm%"], gains[m]["Δp"])]
        cls = ' class="base"' if m == baseline else ""
        tds = "".join(f'<td class="num">{c}</td>' for c in cells)
        rows.append(f"<tr{cls}><td>{html.escape(m)}</td><td class=num>{len(rs)}</td>{tds}</tr>")
    table = f"<table><tr><th>method</th><th>seeds</th>{head}</tr>{''.join(rows)}</table>"
    return table, gains


def _cosine_epochs(history: Sequence[Mapping[str, Any]]) -> list[int]:
    logged = [i for i, h in enumerate(history) if isinstance(h.get("grad_cosine"), Mapping)]
    if len(logged) <= MAX_HEATMAPS:
        return logged
    step = (len(logged) - 1) / (MAX_HEATMAPS - 1)
    return sorted({logged[round(i * step)] for i in range(MAX_HEATMAPS)})


def _dataset_section(data: str, methods: dict[str, list[RunRecord]], root: Path) -> tuple[str, list[str]]:
    """The HTML of one data set's section and the ids of the figures it holds."""
    first = next(iter(methods.values()))[0]
    tasks = first.tasks
    names = [t.name for t in tasks]
    sid = _slug(data)
    ids: list[str] = []
    parts = [f'<h2 id="data-{sid}">Data set: {html.escape(data)}</h2>']
    n_runs = sum(len(v) for v in methods.values())
    split = first.split_metrics()[0]
    parts.append(
        f'<p class="meta">{n_runs} run(s), {len(methods)} method(s); tasks: '
        + ", ".join(f"{html.escape(t.name)} ({t.kind.value}, primary {t.primary_metric})" for t in tasks)
        + "</p>"
    )
    baseline = next((m for m, rs in methods.items() if rs[0].model == BASELINE_MODEL), None)
    table, _ = _metrics_table(methods, tasks, baseline)
    parts.append(f"<h3>Per-task {split} metrics</h3>")
    note = (
        f"Δm% (lower is better) and Δp (higher is better) against <b>{html.escape(baseline)}</b>, over every "
        "metric shown; mean ± sample std over seeds."
        if baseline
        else "No single-task runs (model <code>single</code>) for this data set: no Δm% / Δp."
    )
    parts.append(f'<p class="note">{note} Best epoch chosen on validation.</p>{table}')

    # Curves.
    series = {
        m: {
            t: {
                "train_loss": _epoch_series(rs, lambda h, t=t: _dig(h, "train_loss", t)),
                "val": _epoch_series(rs, lambda h, t=t, p=task.primary_metric: _dig(h, "val", t, p)),
            }
            for t, task in zip(names, tasks, strict=True)
        }
        for m, rs in methods.items()
    }
    if any(v["train_loss"] for by in series.values() for v in by.values()):
        fid = f"fig-{sid}-curves"
        png = _plots.curves(series, names, {t.name: t.primary_metric for t in tasks})
        parts.append("<h3>Training and validation curves</h3>")
        parts.append(
            _img(
                fid,
                f"{data}: training loss and validation metric per epoch",
                png,
                "Mean over seeds per epoch; validation metric is each task's primary metric.",
            )
        )
        ids.append(fid)

    # Pareto front of the primary test metrics.
    if len(tasks) >= 2 and len(methods) >= 2:
        points = {}
        for m, rs in methods.items():
            mean, _ = _mean_metrics(rs)
            points[m] = [mean.get(t.name, {}).get(t.primary_metric, math.nan) for t in tasks]
        higher = [METRIC_HIGHER_IS_BETTER[t.primary_metric] for t in tasks]
        front = pareto_front(points, higher)
        axes = [f"{t.name} {t.primary_metric}" for t in tasks]
        fid = f"fig-{sid}-pareto"
        if len(tasks) == 2:
            png = _plots.pareto_scatter({m: (p[0], p[1]) for m, p in points.items()}, front, (axes[0], axes[1]))
            kind = "scatter"
        else:
            png = _plots.pareto_parallel(points, front, axes, higher)
            kind = "parallel coordinates"
        parts.append("<h3>Pareto front across methods</h3>")
        parts.append(
            _img(
                fid,
                f"{data}: Pareto front of {split} {', '.join(axes)}",
                png,
                f"{kind}; non-dominated: {', '.join(front) or 'none'}.",
            )
        )
        ids.append(fid)

    # Task-gradient cosine similarity.
    cos_parts = []
    for m, rs in methods.items():
        run = rs[0]
        chosen = _cosine_epochs(run.history)
        if not chosen:
            continue
        mats = [
            (
                int(run.history[i].get("epoch", i + 1)),
                [[float(run.history[i]["grad_cosine"].get(a, {}).get(b, math.nan)) for b in names] for a in names],
            )
            for i in chosen
        ]
        fid = f"fig-{sid}-cosine-{_slug(m)}"
        if fid in ids:  # two method names with the same slug
            fid += f"-{len(ids)}"
        png = _plots.cosine_strip(mats, names, f"{m} (seed {run.seed})")
        norms = run.history[chosen[-1]].get("grad_norm") or {}
        norm_txt = ", ".join(f"{t} {float(v):.3g}" for t, v in norms.items())
        cos_parts.append(
            _img(
                fid,
                f"{data}: task-gradient cosine similarity, {m}",
                png,
                f"Mean over each epoch's steps; gradient norms at the last epoch shown: {norm_txt}.",
            )
        )
        ids.append(fid)
    if cos_parts:
        parts.append("<h3>Task-gradient cosine similarity over training</h3>")
        parts += cos_parts

    # Balancer weights.
    weights = {}
    for m, rs in methods.items():
        if rs[0].model == BASELINE_MODEL:
            continue
        by_task = {t: _epoch_series(rs, lambda h, t=t: _dig(h, "weights", t)) for t in names}
        if any(by_task.values()):
            weights[m] = by_task
    if weights:
        fid = f"fig-{sid}-weights"
        parts.append("<h3>Balancer weights over training</h3>")
        parts.append(
            _img(
                fid,
                f"{data}: balancer weights per epoch",
                _plots.weights_over_time(weights),
                "Each epoch's mean over steps of the weight the balancer applied to each task.",
            )
        )
        ids.append(fid)

    # Expert usage.
    usage = {}
    for m, rs in methods.items():
        last = next((h for h in reversed(rs[0].history) if isinstance(h.get("diagnostics"), Mapping)), None)
        u = (last or {}).get("diagnostics", {}).get("expert_usage")
        if (
            isinstance(u, Mapping)
            and u
            and all(isinstance(v, list) and v and all(isinstance(x, int | float) for x in v) for v in u.values())
        ):
            usage[m] = u
    if usage:
        fid = f"fig-{sid}-experts"
        parts.append("<h3>Expert usage (mixture-of-experts models)</h3>")
        parts.append(
            _img(
                fid,
                f"{data}: expert usage per task",
                _plots.expert_usage(usage),
                "Mean gate weight of each task on each expert, on the validation split at the last epoch.",
            )
        )
        ids.append(fid)

    # Runs.
    rows = []
    for m, rs in methods.items():
        for r in rs:
            rel = os.path.relpath(r.path, root)
            spe = r.results.get("seconds_per_epoch")
            spe_txt = f"{float(spe):.2f}" if isinstance(spe, int | float) and math.isfinite(spe) else "—"
            rows.append(
                f"<tr><td>{html.escape(m)}</td><td class=num>{r.seed}</td><td>{html.escape(rel)}</td>"
                f"<td class=num>{html.escape(_best_epoch(r.results.get('best_epoch')))}</td>"
                f"<td class=num>{len(r.history)}</td><td class=num>{spe_txt}</td></tr>"
            )
    parts.append(
        "<h3>Runs</h3><table><tr><th>method</th><th>seed</th><th>directory</th><th>best epoch</th>"
        f"<th>epochs</th><th>s/epoch</th></tr>{''.join(rows)}</table>"
    )
    return "\n".join(parts), ids


def _best_epoch(best: Any) -> str:
    """``3``, or ``buy 2, spend 3`` for independent single-task models (one best epoch per task)."""
    if isinstance(best, Mapping):
        return ", ".join(f"{t} {e}" for t, e in best.items())
    return "—" if best is None else str(best)


def render_report(root: str | Path) -> tuple[str, list[str]]:
    """The report's HTML for every run at or below ``root`` and the ids of its figures."""
    root = Path(root)
    runs = find_runs(root)
    if not runs:
        raise FileNotFoundError(
            f"{root}: no run directories found (a run directory holds {', '.join(RUN_FILES)}); "
            "pass a `polytask fit` output, a `polytask compare` output or a bench directory"
        )
    _plots.require_matplotlib()
    groups = _group(runs)
    sections, ids = [], []
    for data, methods in groups.items():
        body, fig_ids = _dataset_section(data, methods, root)
        sections.append(body)
        ids += fig_ids
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    title = f"polytask report: {root.resolve().name}"
    doc = (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f'<p class="meta">{len(runs)} run(s) under {html.escape(str(root))}; generated {stamp}.</p>'
        + "\n".join(sections)
        + "</body></html>\n"
    )
    return doc, ids


def write_report(root: str | Path, output: str | Path | None = None) -> Path:
    """Write the report for ``root`` to ``output`` (default ``root/report.html``), atomically."""
    doc, _ = render_report(root)
    out = Path(output) if output is not None else Path(root) / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(doc)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out
