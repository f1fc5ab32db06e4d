"""Multi-task boosting and MultiTab-Net on the classic multi-task tables, against per-task and pooled GBDT.

Per data set (School, Computer, Landmine, Abalone, and the synthetic generator with 0 / 2 / 5 planted
outlier tasks out of 16): test RMSE over all test rows in the target's units (Landmine: AUC averaged
over its 29 tasks) as mean ± std over seeds, for R-MTGB, MT-GB, one GBDT per task, one pooled GBDT
with the task id as a categorical feature, MultiTab-Net and MMoE; median fit time; and R-MTGB's
outlier scores against the planted truth on the synthetic sets.

Protocol: seed ``s`` splits every task 80/20 (the R-MTGB paper's protocol, stratified per task) and
seeds the model. The networks hold out 10% of each task's training rows for best-epoch selection;
the tree models, which have fixed hyper-parameters and no selection, fit on the whole 80%. Every
model predicts targets standardised per task with the training statistics (``polytask fit``'s
protocol), reported back in original units.

    python benchmarks/mtl_tabular.py                       # the default protocol (see --help)
    python benchmarks/mtl_tabular.py --datasets abalone synthetic-2 --seeds 2   # a quick look

Writes ``benchmarks/results/mtl_tabular.json`` and ``docs/benchmarks/mtl_tabular.md``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from _common import ROOT, command_line, fmt_cell, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.boost import fit_boosted, stack_tasks
from polytask.data import DataBundle, TaskTensors, load_dataset
from polytask.tasks import TaskKind
from polytask.train import TrainConfig, fit

# Cheapest first: results are written after every data set, so a run cut short keeps what it finished.
DATASETS = ("synthetic-0", "synthetic-2", "synthetic-5", "abalone", "landmine", "computer", "school")
MODELS = ("rmtgb", "mtgb", "gbdt-per-task", "gbdt-pooled", "multitab", "mmoe")
NEURAL = ("multitab", "mmoe")
LABELS = {
    "rmtgb": "R-MTGB",
    "mtgb": "MT-GB",
    "gbdt-per-task": "GBDT per task",
    "gbdt-pooled": "GBDT pooled + task id",
    "multitab": "MultiTab-Net",
    "mmoe": "MMoE",
}
#: Estimator sizes, fixed for every data set (no tuning), chosen to keep the whole run near 20 CPU minutes.
PARAMS: dict[str, dict[str, Any]] = {
    "rmtgb": {"n_estimators": 100, "n_outlier_estimators": 50, "n_task_estimators": 30, "min_samples_leaf": 5},
    "mtgb": {"n_estimators": 100, "n_task_estimators": 30, "min_samples_leaf": 5},
    "gbdt-per-task": {"max_iter": 100},
    "gbdt-pooled": {"max_iter": 100},
    "multitab": {"dim": 16, "n_heads": 2, "ffn_dim": 32, "n_blocks": 2, "dropout": 0.1},
    "mmoe": {"n_experts": 4},
}
TRAIN = {"epochs": 8, "batch_size": 512, "lr": 3e-3, "patience": 3}
#: Seeds of the networks per data set: with 139 / 190 tasks one epoch of MultiTab-Net costs ~30 s / ~12 s
#: on one core (every task is predicted for every row), so School and Computer get one seed.
NEURAL_SEEDS = {"school": 1, "computer": 1, "landmine": 2}
#: ... and School's networks at most 4 epochs (~30 s / ~15 s per epoch for MultiTab-Net / MMoE).
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


def run_booster(bundle: DataBundle, name: str, seed: int) -> tuple[float, float, Any]:
    t0 = time.perf_counter()
    model = fit_boosted(name, bundle.tasks, bundle.input_spec, _concat(bundle.train, bundle.val), seed, **PARAMS[name])
    seconds = time.perf_counter() - t0
    X, y, t = stack_tasks(bundle.test, bundle.tasks)  # each test row once, with its own task
    est = model.estimator
    if bundle.tasks[0].kind is TaskKind.BINARY:
        p = est.decision_function(X, task=t)
        aucs = [roc_auc_score(y[t == k], p[t == k]) for k in range(len(bundle.tasks)) if len(set(y[t == k])) == 2]
        return float(np.mean(aucs)), seconds, est
    std = np.array([task.y_std for task in bundle.tasks])[t]
    err = (est.predict(X, task=t) - y) * std  # standardised per task -> original units
    return float(np.sqrt(np.mean(err**2))), seconds, est


def run_network(bundle: DataBundle, name: str, seed: int) -> tuple[float, float]:
    cfg = TrainConfig(seed=seed, **{**TRAIN, "epochs": NEURAL_EPOCHS.get(bundle.name, TRAIN["epochs"])})
    t0 = time.perf_counter()
    res = fit(bundle, model=name, model_params=PARAMS[name], config=cfg, progress=False)
    seconds = time.perf_counter() - t0
    assert res.test is not None
    return _score_from_task_metrics(bundle, res.test), seconds


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


def markdown(result: dict[str, Any]) -> str:
    datasets, models = result["datasets"], result["models"]
    lines = [
        "# Multi-task boosting and MultiTab-Net on the classic multi-task tables",
        "",
        f"Measured {result['date']} on {machine_line(result['machine'])}.",
        "",
        f"Command: `{result['command']}` (other engineers' jobs shared the machine's two cores during the run, so "
        "timings are indicative).",
        "",
        "Protocol: seed `s` splits every task 80/20 (stratified per task, the R-MTGB paper's protocol) and seeds "
        "the model. Tree models fit on the whole 80% with fixed sizes (below); the networks hold out 10% of each "
        f"task's training rows for best-epoch selection ({result['train']}). Scores: **test RMSE over all test rows "
        "in the target's units (lower is better); Landmine: test AUC averaged over its tasks (higher is better)**. "
        "mean ± std over seeds; `(n)` = number of seeds when fewer than the trees'.",
        "",
        "| data set | " + " | ".join(LABELS[m] for m in models) + " |",
        "|---|" + "---|" * len(models),
    ]
    for d in datasets:
        cells = []
        for m in models:
            vals = result["scores"][d].get(m, [])
            cell = fmt_cell(vals, 3) if vals else "—"
            if vals and len(vals) < result["seeds"]:
                cell += f" ({len(vals)})"
            cells.append(cell)
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    lines += ["", "Median fit time in seconds (one process, one thread):", ""]
    lines += ["| data set | " + " | ".join(LABELS[m] for m in models) + " |", "|---|" + "---|" * len(models)]
    for d in datasets:
        cells = [f"{np.median(result['seconds'][d][m]):.1f}" if result["seconds"][d].get(m) else "—" for m in models]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    if result["outliers"]:
        lines += [
            "",
            "R-MTGB's outlier scores `sigmoid(theta_r)` on the synthetic sets (16 tasks; the first k are the planted "
            "outliers): AUC of the scores against the truth, seeds where every outlier scores above every inlier, "
            "mean score of outliers / inliers, and tasks scoring above 0.5 (mean over seeds).",
            "",
            "| data set | AUC | separated | mean score outliers | mean score inliers | tasks > 0.5 |",
            "|---|---|---|---|---|---|",
        ]
        for d, per_seed in result["outliers"].items():
            auc = [s["auc"] for s in per_seed if "auc" in s]
            sep = sum(s.get("separated", False) for s in per_seed)
            mo = [s["mean_outlier"] for s in per_seed if "mean_outlier" in s]
            mi = [s["mean_inlier"] for s in per_seed]
            fl = np.mean([s["flagged"] for s in per_seed])
            lines.append(
                f"| {d} | {fmt_cell(auc, 3) if auc else '— (no outliers)'} | "
                f"{f'{sep}/{len(per_seed)}' if auc else '—'} | {fmt_cell(mo, 3) if mo else '—'} | "
                f"{fmt_cell(mi, 3)} | {fl:.1f} |"
            )
    lines += [
        "",
        "Models: R-MTGB = shared trees, outlier / non-outlier trees mixed per task by sigmoid(theta_r), then per-task "
        "trees (`polytask.boost`); MT-GB = the same without the outlier block; GBDT per task = one "
        "HistGradientBoosting model per task (no sharing); GBDT pooled + task id = one HistGradientBoosting model on "
        "all rows with the task id as a categorical feature (it can split on the task, so it is itself a multi-task "
        "tree model); MultiTab-Net and MMoE = `polytask fit --model multitab | mmoe`, predicting every task for "
        "every row, with each row's loss on its own task only.",
    ]
    lines += ["", "Sizes: " + "; ".join(f"{LABELS[m]} {PARAMS[m]}" for m in models) + "."]
    lines += ["", *result["notes"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "docs"))
    args = parser.parse_args(argv)
    set_threads(args.threads)
    json_path = ROOT / "benchmarks" / "results" / "mtl_tabular.json"
    scores: dict[str, dict[str, list[float]]] = {}
    seconds: dict[str, dict[str, list[float]]] = {}
    outliers: dict[str, list[dict[str, Any]]] = {}
    done: list[str] = []
    t_start = time.perf_counter()
    for d in args.datasets:
        scores[d], seconds[d] = {}, {}
        for seed in range(args.seeds):
            bundle = load(d, seed)
            for m in args.models:
                if m in NEURAL and seed >= NEURAL_SEEDS.get(d, args.seeds):
                    continue
                if m in NEURAL:
                    score, secs = run_network(bundle, m, seed)
                else:
                    score, secs, est = run_booster(bundle, m, seed)
                    if m == "rmtgb" and d.startswith("synthetic"):
                        outliers.setdefault(d, []).append(outlier_summary(bundle, est))
                scores[d].setdefault(m, []).append(score)
                seconds[d].setdefault(m, []).append(secs)
                print(f"{d} seed {seed} {m}: {score:.4f} ({secs:.1f} s)", flush=True)
        done.append(d)
        elapsed = time.perf_counter() - t_start
        result = {
            "date": now_utc(),
            "command": command_line(),
            "machine": machine(args.threads),
            "datasets": done,
            "not_run": [x for x in args.datasets if x not in done],
            "models": args.models,
            "seeds": args.seeds,
            "neural_seeds": {x: min(NEURAL_SEEDS.get(x, args.seeds), args.seeds) for x in done},
            "params": PARAMS,
            "train": TRAIN,
            "synthetic": SYNTHETIC,
            "metric": {"regression": "RMSE over all test rows, original units", "landmine": "mean per-task test AUC"},
            "scores": scores,
            "seconds": seconds,
            "outliers": outliers,
            "total_seconds": round(elapsed, 1),
            "notes": [
                f"Whole run: {elapsed:.0f} s for the data sets above"
                + (
                    f"; not run yet: {', '.join(x for x in args.datasets if x not in done)}."
                    if len(done) < len(args.datasets)
                    else "."
                ),
                "Networks: School and Computer with 1 seed and Landmine with 2, School with at most 4 epochs (cost: "
                "every task is predicted for every row, 139 / 190 tasks); otherwise 8 epochs at most with patience 3 "
                "and untuned sizes, so they are less tuned than in their papers.",
                "LightGBM is not installed here, so all trees are scikit-learn's (DecisionTreeRegressor for R-MTGB / "
                "MT-GB, HistGradientBoosting for the baselines).",
            ],
        }
        write_json(json_path, result)
        write_text(Path(args.out) / "benchmarks" / "mtl_tabular.md", markdown(result) + "\n")


if __name__ == "__main__":
    main()
