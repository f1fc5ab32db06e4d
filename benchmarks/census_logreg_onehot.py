"""Census-Income: logistic regression with *every* input column one-hot (numeric ones too).

The reference row the foundation issue quotes ("a one-hot logistic regression on this split reaches
about .941 income / .994 marital test AUC") one-hots all columns, so that each distinct age, weeks
worked, etc. gets its own coefficient. ``census_mmoe.py`` keeps numeric columns standardised in its
LR row (the neural models' inputs); this script measures the all-one-hot variant on the same split.
C is chosen per task on validation AUC.

    python benchmarks/census_logreg_onehot.py
"""

from __future__ import annotations

import argparse
import time

from scipy import sparse
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from _common import ROOT, command_line, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.data._table import split_indices
from polytask.data.census import NUMERIC_COLUMNS, TARGETS, census_frame

GROUPS = {"group 1": ("income", "marital"), "group 2": ("education", "marital")}
C_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    df = census_frame()
    tr, va, te = split_indices(len(df), 0.2, 0.2, 0)  # the census loaders' split (seed 0)
    features = df.drop(columns=list(TARGETS))
    cols = list(features.columns)
    onehot = OneHotEncoder(handle_unknown="ignore").fit(features.iloc[tr][cols].astype(str))
    scaler = StandardScaler().fit(features.iloc[tr][list(NUMERIC_COLUMNS)].astype(float))
    design = sparse.hstack(
        [
            onehot.transform(features[cols].astype(str)),
            sparse.csr_matrix(scaler.transform(features[list(NUMERIC_COLUMNS)])),
        ]
    ).tocsr()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for task in ("income", "marital", "education"):
        y = df[task].to_numpy().astype(int)
        best = None
        for c in C_GRID:
            t0 = time.perf_counter()
            model = LogisticRegression(C=c, max_iter=5000).fit(design[tr], y[tr])
            secs = time.perf_counter() - t0
            val = roc_auc_score(y[va], model.decision_function(design[va]))
            if best is None or val > best[0]:
                best = (val, c, model, secs)
        assert best is not None
        val, c, model, secs = best
        test = roc_auc_score(y[te], model.decision_function(design[te]))
        results[task] = {"C": c, "val_auc": val, "test_auc": test, "fit_seconds": secs}
        print(f"{task}: C={c} val {val:.4f} test {test:.4f} ({secs:.1f} s)", flush=True)
    mach = machine(args.threads)
    write_json(
        ROOT / "benchmarks" / "results" / "census_logreg_onehot.json",
        {"date": now_utc(), "machine": mach, "command": command_line(), "results": results},
    )
    lines = [
        "# Census-Income: logistic regression, every column one-hot",
        "",
        f"Measured {now_utc()} on {machine_line(mach)}. Command: `{command_line()}`",
        "",
        "Same 60/20/20 split (seed 0) as `census_mmoe.md`; every input column one-hot (numeric columns also",
        "kept standardised), C per task chosen on validation AUC from " + ", ".join(map(str, C_GRID)) + ".",
        "",
        "| group | task | C | val AUC | test AUC | fit s |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for group, tasks in GROUPS.items():
        for t in tasks:
            r = results[t]
            lines.append(
                f"| {group} | {t} | {r['C']} | {r['val_auc']:.4f} | {r['test_auc']:.4f} | {r['fit_seconds']:.1f} |"
            )
    write_text(ROOT / "docs" / "benchmarks" / "census_logreg_onehot.md", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
