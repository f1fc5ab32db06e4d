"""Multi-task boosting and MultiTab-Net on the classic multi-task tables, against per-task and pooled GBDT.

Per data set (School, Computer, Landmine, Abalone, and the synthetic generator with 0 / 2 / 5 planted
outlier tasks out of 16): test RMSE over all test rows in the target's units (Landmine: AUC averaged
over its 29 tasks) as mean ± std over seeds, for R-MTGB, MT-GB, one GBDT per task, one pooled GBDT
with the task id as a categorical feature (scikit-learn trees), R-MTGB and per-task GBDT with LightGBM
trees (when LightGBM is installed), MultiTab-Net and MMoE; median fit time; and R-MTGB's outlier scores
against the planted truth on the synthetic sets.

Protocol: seed ``s`` splits every task 80/20 (the R-MTGB paper's protocol, stratified per task) and
seeds the model. The networks hold out 10% of each task's training rows for best-epoch selection;
the tree models, which have fixed hyper-parameters and no selection, fit on the whole 80%. Every
model predicts targets standardised per task with the training statistics (``polytask fit``'s
protocol), reported back in original units.

Every (data set, row, seed) is stored in the results file as it finishes, and a rerun skips what is
stored, so a killed run resumes where it stopped:

    python benchmarks/mtl_tabular.py                              # everything not stored yet, 5 seeds
    python benchmarks/mtl_tabular.py --rows multitab mmoe          # only the networks
    python benchmarks/mtl_tabular.py --rows rmtgb mtgb --remeasure  # these rows again, the others kept
    python benchmarks/mtl_tabular.py --fresh                       # ignore every stored run
    python benchmarks/mtl_tabular.py --report-only                 # rewrite the doc from the stored runs

Writes ``benchmarks/results/mtl_tabular.json`` and ``docs/benchmarks/mtl_tabular.md``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import time
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from _common import command_line, fmt_cell, machine, machine_line, now_utc, set_threads, write_json, write_text
from _grid import Row, Store, add_grid_arguments
from polytask.boost import fit_boosted, stack_tasks
from polytask.data import DataBundle, TaskTensors, load_dataset
from polytask.tasks import TaskKind
from polytask.train import TrainConfig, fit

# Cheapest first.
DATASETS = ("synthetic-0", "synthetic-2", "synthetic-5", "abalone", "landmine", "computer", "school")
#: Estimator sizes, fixed for every data set (no tuning).
_RMTGB = {"n_estimators": 100, "n_outlier_estimators": 50, "n_task_estimators": 30, "min_samples_leaf": 5}
_MTGB = {"n_estimators": 100, "n_task_estimators": 30, "min_samples_leaf": 5}
_HGB = {"max_iter": 100}
_LGBM = {"tree_backend": "lightgbm"}
ROWS: tuple[Row, ...] = (
    Row("rmtgb", "rmtgb", model_params=_RMTGB, label="R-MTGB"),
    Row("mtgb", "mtgb", model_params=_MTGB, label="MT-GB"),
    Row("gbdt-per-task", "gbdt-per-task", model_params=_HGB, label="GBDT per task"),
    Row("gbdt-pooled", "gbdt-pooled", model_params=_HGB, label="GBDT pooled + task id"),
    Row("rmtgb-lgbm", "rmtgb", model_params={**_RMTGB, **_LGBM}, label="R-MTGB (LightGBM trees)"),
    Row("gbdt-per-task-lgbm", "gbdt-per-task", model_params={**_HGB, **_LGBM}, label="GBDT per task (LightGBM)"),
    Row(
        "multitab",
        "multitab",
        model_params={"dim": 16, "n_heads": 2, "ffn_dim": 32, "n_blocks": 2, "dropout": 0.1},
        label="MultiTab-Net",
    ),
    Row("mmoe", "mmoe", model_params={"n_experts": 4}, label="MMoE"),
)
BY_KEY = {r.key: r for r in ROWS}
NEURAL = ("multitab", "mmoe")
TRAIN = {"epochs": 8, "batch_size": 512, "lr": 3e-3, "patience": 3}
#: School's networks get at most 4 epochs: with 139 tasks predicted for every row one epoch of
#: MultiTab-Net costs ~25 s on one core, and 5 seeds x 8 epochs of both networks would take ~30 min.
NEURAL_EPOCHS = {"school": 4}
SYNTHETIC = {"n_tasks": 16, "n_samples": 150, "n_features": 2, "noise": 0.1, "data_seed": 0}


def load(name: str, seed: int) -> DataBundle:
    if name.startswith("synthetic-"):
        return load_dataset("synthetic-outliers", seed=seed, n_outliers=int(name.split("-")[1]), **SYNTHETIC)
    return load_dataset(name, seed=seed)


def _concat(a: TaskTensors, b: TaskTensors) -> TaskTensors:
    return TaskTensors(
        {k: torch.cat([a.x[k], b.x[k]]) for k in a.x},
        {k: torch.cat([a.y[k], b.y[k]]) for k in a.y},
        {k: torch.cat([a.mask[k], b.mask[k]]) for k in a.mask},
    )


def _score_from_task_metrics(bundle: DataBundle, test: dict[str, dict[str, float]]) -> float:
    """Pooled RMSE from per-task RMSEs (n_k rmse_k^2 is task k's squared error), or the mean task AUC."""
    if bundle.tasks[0].kind is TaskKind.BINARY:
        return float(np.nanmean([test[t.name]["auc"] for t in bundle.tasks]))
    n = {t.name: int(bundle.test.mask[t.name].sum()) for t in bundle.tasks}
    return math.sqrt(sum(n[t] * test[t]["rmse"] ** 2 for t in n) / sum(n.values()))


def outlier_summary(bundle: DataBundle, est: Any) -> dict[str, Any]:
    truth = np.array([bundle.meta["is_outlier"][t.name] for t in bundle.tasks])
    scores = np.asarray(est.outlier_scores_)
    out: dict[str, Any] = {"scores": scores.round(4).tolist(), "truth": truth.tolist()}
    if truth.any():
        out["auc"] = float(roc_auc_score(truth, scores))
        out["separated"] = bool(scores[truth].min() > scores[~truth].max())
        out["mean_outlier"] = float(scores[truth].mean())
    out["mean_inlier"] = float(scores[~truth].mean())
    out["flagged"] = int((scores > 0.5).sum())
    return out


def run_booster(bundle: DataBundle, row: Row, seed: int) -> dict[str, Any]:
    data = _concat(bundle.train, bundle.val)
    t0 = time.perf_counter()
    model = fit_boosted(row.model, bundle.tasks, bundle.input_spec, data, seed, **row.model_params)
    seconds = time.perf_counter() - t0
    X, y, t = stack_tasks(bundle.test, bundle.tasks)  # each test row once, with its own task
    est = model.estimator
    run: dict[str, Any] = {"seconds": seconds}
    if bundle.tasks[0].kind is TaskKind.BINARY:
        p = est.decision_function(X, task=t)
        aucs = [roc_auc_score(y[t == k], p[t == k]) for k in range(len(bundle.tasks)) if len(set(y[t == k])) == 2]
        run["score"] = float(np.mean(aucs))
    else:
        std = np.array([task.y_std for task in bundle.tasks])[t]
        err = (est.predict(X, task=t) - y) * std  # standardised per task -> original units
        run["score"] = float(np.sqrt(np.mean(err**2)))
    if row.model == "rmtgb" and "is_outlier" in bundle.meta:
        run["outliers"] = outlier_summary(bundle, est)
    return run


def run_network(bundle: DataBundle, row: Row, seed: int) -> dict[str, Any]:
    epochs = NEURAL_EPOCHS.get(bundle.name, TRAIN["epochs"])
    cfg = TrainConfig(seed=seed, **{**TRAIN, "epochs": epochs})
    t0 = time.perf_counter()
    res = fit(bundle, model=row.model, model_params=row.model_params, config=cfg, progress=False)
    seconds = time.perf_counter() - t0
    assert res.test is not None
    return {"score": _score_from_task_metrics(bundle, res.test), "seconds": seconds, "epochs": epochs,
            "best_epoch": res.best_epoch}  # fmt: skip


def legacy_runs(doc: dict[str, Any]) -> dict[str, Any]:
    """Runs of the earlier one-shot results file (per-seed lists, seeds 0..n-1) in the Store's layout."""
    runs: dict[str, Any] = {}
    for d, by_model in doc["scores"].items():
        for m, vals in by_model.items():
            for seed, score in enumerate(vals):
                run = {"score": score, "seconds": doc["seconds"][d][m][seed], "date": doc["date"]}
                if m in NEURAL:
                    run["epochs"] = NEURAL_EPOCHS.get(d, doc["train"]["epochs"])
                if m == "rmtgb" and d in doc.get("outliers", {}):
                    run["outliers"] = doc["outliers"][d][seed]
                runs.setdefault(d, {}).setdefault(m, {})[str(seed)] = run
    return runs


def lightgbm_installed() -> bool:
    return importlib.util.find_spec("lightgbm") is not None


# ----------------------------------------------------------------------------- the doc
def _cell(runs: dict[str, Any], seeds: int, digits: int = 3) -> str:
    vals = [r["score"] for r in runs.values()]
    if not vals:
        return "—"
    return fmt_cell(vals, digits) + (f" ({len(vals)})" if len(vals) < seeds else "")


def _span(runs: dict[str, Any], datasets: list[str], key: str) -> str:
    dates = sorted(x["date"] for d in datasets for x in runs[d].get(key, {}).values() if "date" in x)
    if not dates:
        return "—"
    return dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1][-9:]}"


def _coinciding(runs: dict[str, Any], datasets: list[str]) -> list[str]:
    """A note where a LightGBM row scores exactly like its scikit-learn twin on every seed (same splits)."""
    out = []
    for ours, base in (("rmtgb-lgbm", "rmtgb"), ("gbdt-per-task-lgbm", "gbdt-per-task")):
        same = [
            d
            for d in datasets
            if runs[d].get(ours)
            and runs[d].get(base)
            and all(
                s in runs[d][base] and abs(runs[d][base][s]["score"] - x["score"]) < 5e-4
                for s, x in runs[d][ours].items()
            )
        ]
        if same:
            out.append(
                f"{BY_KEY[ours].label} scores within 5e-4 of {BY_KEY[base].label} on every seed of computer: "
                "Computer's 13 features are binary and each rater has ~17 training rows, so both libraries find "
                "(nearly) the same splits."
                if same == ["computer"]
                else f"{BY_KEY[ours].label} scores like {BY_KEY[base].label} (within 5e-4) on every seed of "
                f"{', '.join(same)}."
            )
    return out


def markdown(doc: dict[str, Any]) -> str:
    meta, runs = doc["meta"], doc["runs"]
    seeds = meta["seeds"]
    datasets = [d for d in DATASETS if d in runs]
    rows = [r for r in ROWS if any(r.key in runs[d] for d in datasets)]
    dates = sorted(r["date"] for d in datasets for by in runs[d].values() for r in by.values() if "date" in r)
    head = "| data set | " + " | ".join(r.label for r in rows) + " |"
    rule = "|---|" + "---:|" * len(rows)
    lines = [
        "# Multi-task boosting and MultiTab-Net on the classic multi-task tables",
        "",
        f"- measured: {dates[0]} to {dates[-1]}" if dates else "- measured: —",
        f"- machine: {machine_line(meta['machine'])}; LightGBM {meta.get('lightgbm') or 'not installed'}",
        "- commands (runs are stored as they finish; a rerun measures only what is missing): "
        + "; ".join(f"`{c}`" for c in meta["commands"]),
        "- other engineers' jobs (one long benchmark on one core, tests) shared the machine's two cores during "
        "every run, so the fit times are indicative; ratios within one data set are the reliable part.",
        *(f"- note: {n}" for n in meta.get("notes", [])),
        "",
        "Protocol: seed `s` splits every task 80/20 (stratified per task, the R-MTGB paper's protocol) and seeds "
        "the model. Tree models fit on the whole 80% with fixed sizes (below); the networks hold out 10% of each "
        f"task's training rows for best-epoch selection ({TRAIN}; School: at most "
        f"{NEURAL_EPOCHS['school']} epochs, see below). Scores: **test RMSE over all test rows in the target's "
        "units (lower is better); Landmine: test AUC averaged over its tasks (higher is better)**. mean ± std "
        f"over seeds; `(n)` = number of seeds when fewer than {seeds}.",
        "",
        head,
        rule,
    ]
    for d in datasets:
        lines.append(f"| {d} | " + " | ".join(_cell(runs[d].get(r.key, {}), seeds) for r in rows) + " |")
    lines += ["", "Median fit time in seconds (one process, one thread; the networks' time includes every epoch "
              "and the validation passes):", "", head, rule]  # fmt: skip
    for d in datasets:
        cells = []
        for r in rows:
            secs = [x["seconds"] for x in runs[d].get(r.key, {}).values()]
            cells.append(f"{np.median(secs):.1f}" if secs else "—")
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if "gbdt-per-task-lgbm" in [r.key for r in rows] or "rmtgb-lgbm" in [r.key for r in rows]:
        lines += ["", "LightGBM trees / scikit-learn trees, ratio of median fit times on each data set:", "",
                  "| data set | R-MTGB | GBDT per task |", "|---|---:|---:|"]  # fmt: skip
        for d in datasets:
            cells = []
            for ours, base in (("rmtgb-lgbm", "rmtgb"), ("gbdt-per-task-lgbm", "gbdt-per-task")):
                a = [x["seconds"] for x in runs[d].get(ours, {}).values()]
                b = [x["seconds"] for x in runs[d].get(base, {}).values()]
                cells.append(f"{np.median(a) / np.median(b):.2f}" if a and b else "—")
            lines.append(f"| {d} | " + " | ".join(cells) + " |")
    outlier_rows = [r for r in rows if r.model == "rmtgb"]
    synthetic = [d for d in datasets if d.startswith("synthetic")]
    if synthetic and outlier_rows:
        lines += [
            "",
            "R-MTGB's outlier scores `sigmoid(theta_r)` on the synthetic sets (16 tasks; the first k are the planted "
            "outliers): AUC of the scores against the truth, seeds where every outlier scores above every inlier, "
            "mean score of outliers / inliers, and tasks scoring above 0.5 (mean over seeds).",
            "",
            "| data set | trees | AUC | separated | mean score outliers | mean score inliers | tasks > 0.5 |",
            "|---|---|---|---|---|---|---|",
        ]
        for d in synthetic:
            for r in outlier_rows:
                per_seed = [x["outliers"] for x in runs[d].get(r.key, {}).values() if "outliers" in x]
                if not per_seed:
                    continue
                auc = [s["auc"] for s in per_seed if "auc" in s]
                sep = sum(s.get("separated", False) for s in per_seed)
                mo = [s["mean_outlier"] for s in per_seed if "mean_outlier" in s]
                mi = [s["mean_inlier"] for s in per_seed]
                fl = np.mean([s["flagged"] for s in per_seed])
                backend = r.model_params.get("tree_backend", "sklearn")
                lines.append(
                    f"| {d} | {backend} | {fmt_cell(auc, 3) if auc else '— (no outliers)'} | "
                    f"{f'{sep}/{len(per_seed)}' if auc else '—'} | {fmt_cell(mo, 3) if mo else '—'} | "
                    f"{fmt_cell(mi, 3)} | {fl:.1f} |"
                )
    lines += [
        "",
        "Models: R-MTGB = shared trees, outlier / non-outlier trees mixed per task by sigmoid(theta_r), then per-task "
        "trees (`polytask.boost`); MT-GB = the same without the outlier block; GBDT per task = one gradient-boosted "
        "model per task (no sharing); GBDT pooled + task id = one HistGradientBoosting model on all rows with the "
        "task id as a categorical feature (it can split on the task, so it is itself a multi-task tree model); "
        "MultiTab-Net and MMoE = `polytask fit --model multitab | mmoe`, predicting every task for every row, with "
        "each row's loss on its own task only. Trees: scikit-learn's (DecisionTreeRegressor for R-MTGB / MT-GB, "
        "HistGradientBoosting for the baselines) unless the row says LightGBM (`tree_backend='lightgbm'`: "
        "LightGBM's histogram trees as R-MTGB's weak learners, with the same Newton leaf values; one LightGBM "
        "booster per task for the baseline).",
        "",
        "Sizes: " + "; ".join(f"{r.label} {r.model_params}" for r in rows) + ".",
        "",
        "When each row was measured (first to last stored run; the earliest runs come from the first, one-shot "
        "version of this script, whose results file was converted): "
        + "; ".join(f"{r.label} {_span(runs, datasets, r.key)}" for r in rows)
        + ".",
        *_coinciding(runs, datasets),
        "",
        f"Networks: 8 epochs at most with patience 3, School {NEURAL_EPOCHS['school']} (every one of its 139 tasks "
        "is predicted for every row, ~25 s per MultiTab-Net epoch on one core; 5 seeds x 8 epochs of both networks "
        "would have taken ~30 min); untuned sizes, so they are less tuned than in their papers.",
        f"Stored training time of all runs in this table: {doc['total_seconds'] / 60:.1f} min.",
    ]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    ap.add_argument(
        "--remeasure",
        action="store_true",
        help="drop the stored runs of the chosen rows and data sets, then rerun",
    )
    add_grid_arguments(ap, "mtl_tabular")
    ap.set_defaults(seeds=5)
    args = ap.parse_args(argv)
    unknown = sorted(set(args.rows or []) - set(BY_KEY))
    if unknown:
        ap.error(f"unknown row(s) {unknown}; rows are {list(BY_KEY)}")
    set_threads(args.threads)
    prior: dict[str, Any] = {}
    if args.results.exists() and not args.fresh:
        prior = json.loads(args.results.read_text())
    store = Store(args.results, fresh=args.fresh)
    if "scores" in prior:  # the earlier one-shot format: keep its runs
        store.doc = legacy_runs(prior)
        prior = {"meta": {"commands": [prior["command"]], "notes": []}}
    meta: dict[str, Any] = {
        "machine": machine(args.threads),
        "lightgbm": importlib.metadata.version("lightgbm") if lightgbm_installed() else None,
        "seeds": args.seeds,
        "train": TRAIN,
        "neural_epochs": NEURAL_EPOCHS,
        "synthetic": SYNTHETIC,
        "commands": list(prior.get("meta", {}).get("commands", [])),
        "notes": list(prior.get("meta", {}).get("notes", [])),
        "metric": {"regression": "RMSE over all test rows, original units", "landmine": "mean per-task test AUC"},
    }
    if not args.report_only:
        meta["commands"].append(command_line())
        if args.note:
            meta["notes"].append(args.note)
    rows = [r for r in ROWS if args.rows is None or r.key in args.rows]
    if args.remeasure and not args.report_only:
        for d in args.datasets:
            for r in rows:
                store.doc.get(d, {}).pop(r.key, None)
    if not lightgbm_installed():
        skipped = [r.key for r in rows if r.model_params.get("tree_backend") == "lightgbm"]
        if skipped:
            print(f"lightgbm is not installed: skipping rows {skipped} (pip install polytask[boost])", flush=True)
        rows = [r for r in rows if r.key not in skipped]
    for d in args.datasets:
        for seed in range(args.seeds):
            todo = [r for r in rows if store.get(d, r.key, seed) is None]
            if args.report_only or not todo:
                continue
            bundle = load(d, seed)
            for r in todo:
                run = run_network(bundle, r, seed) if r.model in NEURAL else run_booster(bundle, r, seed)
                run["date"] = now_utc()
                store.put(d, r.key, seed, run, meta)
                print(f"{d} | {r.key} | seed {seed}: {run['score']:.4f} ({run['seconds']:.1f} s)", flush=True)
    total = sum(r["seconds"] for by_row in store.doc.values() for by in by_row.values() for r in by.values())
    doc = {"meta": meta, "runs": store.doc, "total_seconds": round(total, 1)}
    write_json(args.results, doc)
    write_text(args.out, markdown(doc) + "\n")
    print(f"wrote {args.results} and {args.out}")


if __name__ == "__main__":
    main()
