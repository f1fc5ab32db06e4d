"""Every balancer on Multi-MNIST and Census-Income group 1: task metrics, Δm%, mean rank, s/epoch.

One architecture per data set (hard parameter sharing, as in LibMTL's and the papers' balancer
comparisons), one training protocol for every balancer, best epoch on validation; the single-task
row (two networks trained alone, same protocol) is the reference for Δm%. Mean rank is over the
tasks' primary metric (accuracy / AUC) among the multi-task rows of a data set; the overall rank
averages both data sets.

    python benchmarks/balancers_multimnist.py                        # all balancers, 3 seeds (~45 min, 1 core)
    python benchmarks/balancers_multimnist.py --datasets multi-mnist --seeds 1 --balancers equal upgrad

Results are stored after every run in ``benchmarks/results/balancers.json``; a killed run resumes
and skips the runs already stored there (``--fresh`` starts over). Writes
``<out>/benchmarks/balancers.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

from _common import ROOT, command_line, fmt_cell, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.balance import BALANCERS
from polytask.data import DataBundle, load_dataset
from polytask.evaluate import delta_m, mean_rank
from polytask.train import TrainConfig, fit

#: name -> (loader options, architecture, architecture params, training protocol, metric, label)
SETTINGS: dict[str, dict[str, Any]] = {
    "multi-mnist": {
        "data": {"n_train": 20000},
        "model": "shared-bottom",
        "model_params": {},
        # The Multi-MNIST benchmark's protocol (chosen there on validation), on 20k images and 5 epochs.
        "train": {"epochs": 5, "batch_size": 256, "lr": 1e-2, "schedule": "cosine", "patience": 5},
        "metric": "accuracy",
        "label": "Multi-MNIST (LeNet shared-bottom, 20k training images, 5 epochs)",
    },
    "census-group1": {
        "data": {"numeric_levels": 5},
        "model": "shared-bottom",
        "model_params": {"emb_dim": 4, "dropout": 0.3},
        # The Census benchmark's protocol (chosen there on validation), 6 instead of 12 epochs.
        "train": {"epochs": 6, "batch_size": 512, "lr": 4e-3, "schedule": "cosine", "weight_decay": 0.5, "patience": 5},
        "metric": "auc",
        "label": "Census-Income group 1 (income, marital; MLP shared-bottom, 6 epochs)",
    },
}
SINGLE = "single-task"
RESULTS = ROOT / "benchmarks" / "results" / "balancers.json"


def run_one(bundle: DataBundle, setting: dict[str, Any], balancer: str, seed: int) -> dict[str, Any]:
    cfg = TrainConfig(**{**setting["train"], "seed": seed})
    model = "single" if balancer == SINGLE else setting["model"]
    t0 = time.perf_counter()
    try:
        res = fit(
            bundle,
            model=model,
            model_params=setting["model_params"],
            balancer="equal" if balancer == SINGLE else balancer,
            config=cfg,
            progress=False,
        )
    except Exception as exc:  # a diverging method is a result too
        return {"error": f"{type(exc).__name__}: {exc}", "seconds": time.perf_counter() - t0}
    assert res.test is not None
    return {
        "test": res.test,
        "best_epoch": res.best_epoch,
        "seconds_per_epoch": res.seconds_per_epoch,
        "seconds": time.perf_counter() - t0,
    }


def summarise(runs: dict[str, dict[str, Any]], tasks: list[str], metric: str) -> dict[str, Any]:
    """Per method: mean test metric per task, Δm% against single-task, s/epoch; ranks among MTL rows."""
    rows: dict[str, Any] = {}
    for method, by_seed in runs.items():
        ok = [r for r in by_seed.values() if "test" in r]
        if not ok:
            rows[method] = {"error": next(iter(by_seed.values()))["error"]}
            continue
        rows[method] = {
            "per_seed": {t: [r["test"][t][metric] for r in ok] for t in tasks},
            "mean": {t: {metric: statistics.fmean(r["test"][t][metric] for r in ok)} for t in tasks},
            "seconds_per_epoch": statistics.median(r["seconds_per_epoch"] for r in ok),
            "failed_seeds": len(by_seed) - len(ok),
        }
    base = rows.get(SINGLE, {}).get("mean")
    for row in rows.values():
        if "mean" in row and base is not None:
            row["delta_m"] = delta_m(row["mean"], base, metrics=[metric])
    mtl = {m: r["mean"] for m, r in rows.items() if m != SINGLE and "mean" in r}
    if mtl:
        for m, rank in mean_rank(mtl, tasks, [metric]).items():
            rows[m]["rank"] = rank
    return rows


def table(rows: dict[str, Any], tasks: list[str], metric: str) -> str:
    head = ["method", "level", *(f"{t} {metric}" for t in tasks), "Δm% ↓", "mean rank ↓", "s / epoch"]
    lines = ["| " + " | ".join(head) + " |", "| --- | --- |" + " ---: |" * (len(head) - 2)]

    def order(m: str) -> tuple[int, float]:
        return (0, 0.0) if m == SINGLE else (1, rows[m].get("rank", math.inf))

    for m in sorted(rows, key=order):
        row = rows[m]
        level = "—" if m == SINGLE else BALANCERS[m].cls.level
        if "error" in row:
            lines.append(f"| {m} | {level} | " + " | ".join(["failed"] * len(tasks)) + " | — | — | — |")
            continue
        cells = [fmt_cell(row["per_seed"][t]) for t in tasks]
        dm = f"{row['delta_m']:+.2f}" if "delta_m" in row else "—"
        rank = f"{row['rank']:.1f}" if "rank" in row else "—"
        note = f" ({row['failed_seeds']} seed(s) failed)" if row["failed_seeds"] else ""
        spe = f"{row['seconds_per_epoch']:.2f}"
        lines.append(f"| {m}{note} | {level} | " + " | ".join([*cells, dm, rank, spe]) + " |")
    return "\n".join(lines)


def overall(summaries: dict[str, dict[str, Any]]) -> str:
    """Methods ranked by their rank averaged over data sets, with Δm% on each."""
    names = sorted({m for rows in summaries.values() for m in rows if m != SINGLE})
    scores = {}
    for m in names:
        ranks = [rows[m]["rank"] for rows in summaries.values() if "rank" in rows.get(m, {})]
        scores[m] = statistics.fmean(ranks) if len(ranks) == len(summaries) else math.inf
    head = ["method", *(f"Δm% {d}" for d in summaries), "mean rank (all)"]
    lines = ["| " + " | ".join(head) + " |", "| --- |" + " ---: |" * (len(head) - 1)]
    for m in sorted(names, key=lambda n: scores[n]):
        cells = [f"{rows[m]['delta_m']:+.2f}" if "delta_m" in rows.get(m, {}) else "—" for rows in summaries.values()]
        rank = f"{scores[m]:.2f}" if math.isfinite(scores[m]) else "—"
        lines.append(f"| {m} | " + " | ".join([*cells, rank]) + " |")
    return "\n".join(lines)


def markdown(doc: dict[str, Any]) -> str:
    meta = doc["meta"]
    parts = [
        "# Balancers on Multi-MNIST and Census-Income",
        "",
        f"- date: {meta['date']}",
        f"- machine: {machine_line(meta['machine'])}",
        f"- command: `{meta['command']}`",
        f"- total run time (training of the runs in this file): {meta['runtime_s'] / 60:.1f} min",
        "",
        f"Protocol: every balancer with its registered defaults; test metric mean ± std (sample std) over seeds "
        f"{meta['seeds']}, best epoch on validation (mean of the tasks' primary metric; per task for the "
        "single-task row). Δm% (lower is better) is against the single-task row of the same data set; mean "
        "rank (1 is best) is over the tasks' metric among the multi-task rows; s/epoch is the median over seeds "
        "of each run's median training epoch. F-MTL runs UPGrad on the loss and flatness gradients; Rep-MTL "
        "regularises equal weighting. Settings per data set come from the architecture benchmarks "
        "(`multimnist.md`, `census_mmoe.md`), chosen there for equal weighting on validation; no balancer was "
        "tuned here, so the table compares defaults, not each method at its best.",
        "",
        *([f"Note: {meta['note']}", ""] if meta.get("note") else []),
        "## Overall",
        "",
        overall(doc["summary"]),
    ]
    for name, rows in doc["summary"].items():
        s = SETTINGS[name]
        parts += ["", f"## {s['label']}", "", f"Training: {json.dumps(s['train'])}; data: {json.dumps(s['data'])}.", ""]
        parts.append(table(rows, doc["tasks"][name], s["metric"]))
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    ap.add_argument("--balancers", nargs="+", default=None, help="default: every registered balancer")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--fresh", action="store_true", help="ignore runs already stored in the results file")
    ap.add_argument("--out", type=Path, default=ROOT / "docs")
    ap.add_argument("--results", type=Path, default=RESULTS, help="the JSON file runs are stored in")
    ap.add_argument("--rerun", nargs="*", default=[], help="balancers whose stored runs are discarded and run again")
    ap.add_argument("--note", default="", help="a remark printed under the protocol (e.g. on machine load)")
    args = ap.parse_args()
    set_threads(args.threads)
    methods = [SINGLE, *(args.balancers or sorted(BALANCERS))]
    seeds = list(range(args.seeds))
    stored: dict[str, Any] = {}
    if args.results.exists() and not args.fresh:
        stored = json.loads(args.results.read_text()).get("runs", {})
    doc: dict[str, Any] = {"runs": stored, "tasks": {}, "summary": {}}
    t_start = time.perf_counter()
    for name in args.datasets:
        setting = SETTINGS[name]
        bundle = load_dataset(name, seed=0, **setting["data"])
        tasks = [t.name for t in bundle.tasks]
        doc["tasks"][name] = tasks
        runs = doc["runs"].setdefault(name, {})
        for method in args.rerun:
            runs.pop(method, None)
        for method in methods:
            for seed in seeds:
                if str(seed) in runs.get(method, {}):
                    continue
                r = run_one(bundle, setting, method, seed)
                runs.setdefault(method, {})[str(seed)] = r
                status = r.get("error") or " ".join(f"{t} {r['test'][t][setting['metric']]:.4f}" for t in tasks)
                print(f"{name} {method} seed {seed}: {status} ({r['seconds']:.0f} s)", flush=True)
                write_json(args.results, doc)
        # every method stored for these seeds, not only the ones run now (a rerun of one method
        # keeps the others' rows)
        selected = {
            m: {s: by_seed[str(s)] for s in seeds}
            for m, by_seed in runs.items()
            if all(str(s) in by_seed for s in seeds)
        }
        doc["summary"][name] = summarise(selected, tasks, setting["metric"])
    doc["meta"] = {
        "date": now_utc(),
        "machine": machine(args.threads),
        "command": command_line(),
        "seeds": seeds,
        "runtime_s": sum(
            r["seconds"] for d in args.datasets for by_seed in doc["runs"][d].values() for r in by_seed.values()
        ),
        "note": args.note,
        "wall_s_this_invocation": time.perf_counter() - t_start,
    }
    write_json(args.results, doc)
    write_text(args.out / "benchmarks" / "balancers.md", markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
