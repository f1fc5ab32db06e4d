"""Census-Income groups 1 and 2: HoME, DSelect-k, cross-stitch, APEM and DTRN beside MMoE and single-task.

Test AUC mean ± std over seeds, one protocol for every row (the Census benchmark's, chosen there on
validation for MMoE, with 6 instead of 12 epochs for the CPU budget), best epoch on validation; Δm% / Δp
against the single-task row of the same group. The 12-epoch MMoE / PLE / CGC rows of the foundation
are in ``census_mmoe.md``.

    python benchmarks/census_architectures.py                 # 3 seeds, groups 1 and 2; resumes
    python benchmarks/census_architectures.py --groups 1 --seeds 1 --rows home

Writes ``benchmarks/results/census_architectures.json`` and ``docs/benchmarks/census_architectures.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

from _common import command_line, machine, machine_line, now_utc, set_threads, write_text
from _grid import Row, Store, add_grid_arguments, count_parameters, run_grid, summarise, table
from polytask.data import load_dataset

GROUPS = {1: "census-group1", 2: "census-group2"}
TRAIN: dict[str, Any] = {"epochs": 6, "batch_size": 512, "lr": 4e-3, "schedule": "cosine", "weight_decay": 0.5,
                         "patience": 5}  # fmt: skip
DATA_OPTIONS: dict[str, Any] = {"numeric_levels": 5}
#: The Census benchmark's settings for the MLP-based rows; the token models (APEM, DTRN) keep their
#: registered token width (emb_dim is their attention width) and get the same dropout.
MLP = {"emb_dim": 4, "dropout": 0.3}
TOKENS = {"dropout": 0.3}
ROWS: tuple[Row, ...] = (
    Row("single", "single", model_params=MLP),
    Row("mmoe", "mmoe", model_params=MLP),
    Row("home", "home", model_params=MLP),
    Row("dselect-k", "dselect-k", model_params=MLP),
    Row("cross-stitch", "cross-stitch", model_params=MLP),
    Row("apem", "apem", model_params=TOKENS),
    Row("dtrn", "dtrn", model_params=TOKENS),
)


def markdown(doc: dict[str, Any], summaries: dict[str, Any]) -> str:
    meta = doc["meta"]
    parts = [
        "# Census-Income: HoME, DSelect-k, cross-stitch, APEM, DTRN",
        "",
        f"- date: {meta['date']}",
        f"- machine: {machine_line(meta['machine'])}",
        f"- command: `{meta['command']}`",
        f"- training time of the runs in this file: {meta['runtime_s'] / 60:.1f} min",
        "",
        "Data: the public Census-Income (KDD) test file split 60/20/20 (seed 0), `numeric_levels=5` encoding "
        "(see census_mmoe.md). Protocol: " + ", ".join(f"{k} {v}" for k, v in TRAIN.items()) + f"; seeds "
        f"{meta['seeds']}; best epoch on validation (mean AUC of the tasks; per task for single-task); test "
        f"AUC mean ± std. MLP-based rows: {MLP} with registered defaults otherwise; APEM and DTRN: {TOKENS}. "
        "Δm% (lower is better) / Δp (higher is better) against `single`; mean rank over the multi-task rows. "
        "No architecture was tuned for this table; s/epoch was measured while other jobs shared the machine.",
        "",
    ]
    if meta.get("note"):
        parts += [f"Note: {meta['note']}", ""]
    for ds, rows in summaries.items():
        params = doc["parameters"][ds]
        parts += [f"## {ds} ({', '.join(doc['tasks'][ds])})", ""]
        parts.append(table(rows, [r.key for r in ROWS], doc["tasks"][ds], "auc",
                           lambda k, p=params: [f"{p[k] / 1e3:.0f}k"], ("params",)))  # fmt: skip
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", nargs="+", type=int, default=[1, 2], choices=[1, 2])
    add_grid_arguments(ap, "census_architectures")
    args = ap.parse_args()
    set_threads(args.threads)
    store = Store(args.results, fresh=args.fresh)
    seeds = list(range(args.seeds))
    meta = {"date": now_utc(), "command": command_line(), "machine": machine(args.threads), "seeds": seeds,
            "train": TRAIN, "note": args.note}  # fmt: skip
    names = [GROUPS[g] for g in args.groups]
    bundles = {ds: load_dataset(ds, seed=0, **DATA_OPTIONS) for ds in names}
    rows = [r for r in ROWS if args.rows is None or r.key in args.rows]
    todo = [(seed, ds, row) for seed in seeds for ds in names for row in rows]
    runtime = run_grid(store, todo, bundles, TRAIN, "auc", meta, args.report_only, args.workers, args.threads)
    doc: dict[str, Any] = {"meta": {**meta, "runtime_s": runtime}, "tasks": {}, "parameters": {}}
    summaries = {}
    for ds in GROUPS.values():
        if ds not in store.doc:
            continue
        bundle = bundles.get(ds) or load_dataset(ds, seed=0, **DATA_OPTIONS)
        doc["tasks"][ds] = [t.name for t in bundle.tasks]
        doc["parameters"][ds] = {r.key: count_parameters(bundle, r) for r in ROWS}
        summaries[ds] = summarise(store.doc[ds], doc["tasks"][ds], "auc", {r.key: "single" for r in ROWS})
    write_text(args.out, markdown(doc, summaries) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
