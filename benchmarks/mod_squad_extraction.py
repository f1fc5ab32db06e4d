"""Mod-Squad task-sparse inference: parameters and inference time for one task, full vs extracted.

A Mod-Squad model (Chen et al., CVPR 2023) is trained on the heterogeneous vision set (each image
labelled for one task: MNIST digit, Fashion item, Multi-MNIST left digit); ``extract(task)`` keeps only
the experts that task's tokens were routed to on its training images (threshold 0, and a usage
threshold of 5% as Mod-Squad prunes). For each task: parameters, inference time for a batch of
that task's test images (median of repeats; the full model run for that task only via
``forward_task``, and for every task via ``forward``), the test accuracy of both, and the share of
test predictions that agree exactly.

    python benchmarks/mod_squad_extraction.py
    python benchmarks/mod_squad_extraction.py --n-train 500 --epochs 1 --repeats 5     # a quick look

Writes ``benchmarks/results/mod_squad_extraction.json`` and ``docs/benchmarks/mod_squad_extraction.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from _common import ROOT, command_line, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.data import load_dataset
from polytask.nn import build_model
from polytask.train import TrainConfig, Trainer

#: 7x7 patches (16 tokens) on the 28x28 images: with 4x4 patches the small ViTs learned slowly on this
#: budget (test accuracy 0.22-0.46 after 3 epochs at lr 1e-3, batch 128).
PARAMS: dict[str, Any] = {
    "dim": 64, "depth": 4, "heads": 4, "n_experts": 8, "attn_experts": 8, "top_k": 2, "patch_size": 7,
}  # fmt: skip


def median_time(fn: Any, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=3000, help="training images per task")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=64, help="training batch")
    ap.add_argument("--batch", type=int, default=256, help="images per timed inference call")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    args = ap.parse_args()
    set_threads(args.threads)
    bundle = load_dataset("hetero-vision", seed=0, n_per_task=args.n_train, n_val=500, n_test=2000)
    torch.manual_seed(0)
    model = build_model("mod-squad", bundle.tasks, bundle.input_spec, **PARAMS)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, schedule="cosine", patience=None)
    t0 = time.perf_counter()
    with torch.enable_grad():
        Trainer(model, bundle, "equal", cfg, None, progress=False).fit()
    train_s = time.perf_counter() - t0
    model.eval()
    full_params = sum(p.numel() for p in model.parameters())
    rows = []
    for task in bundle.tasks:
        name = task.name
        tr = bundle.train.mask[name].nonzero().squeeze(1)
        te = bundle.test.mask[name].nonzero().squeeze(1)
        x_train = {k: v[tr] for k, v in bundle.train.x.items()}
        x_test = {k: v[te] for k, v in bundle.test.x.items()}
        y = bundle.test.y[name][te]
        xb = {k: v[: args.batch] for k, v in x_test.items()}
        for threshold in (0.0, 0.05):
            small = model.extract(name, data=x_train, threshold=threshold).eval()
            full_pred = model.forward_task(x_test, name).argmax(-1)
            small_pred = small(x_test)[name].argmax(-1)
            rows.append({
                "task": name,
                "threshold": threshold,
                "parameters_full": full_params,
                "parameters_extracted": sum(p.numel() for p in small.parameters()),
                "kept_experts": small.config["kept_experts"],
                "ms_full_all_tasks": 1e3 * median_time(lambda xb=xb: model(xb), args.repeats),
                "ms_full_this_task": 1e3 * median_time(lambda xb=xb, n=name: model.forward_task(xb, n), args.repeats),
                "ms_extracted": 1e3 * median_time(lambda xb=xb, s=small: s(xb), args.repeats),
                "acc_full": float((full_pred == y).float().mean()),
                "acc_extracted": float((small_pred == y).float().mean()),
                "agreement": float((full_pred == small_pred).float().mean()),
                "n_test": len(te),
            })  # fmt: skip
            r = rows[-1]
            shown = f"ms {r['ms_extracted']:.1f} vs {r['ms_full_this_task']:.1f}, agree {r['agreement']:.4f}"
            print(f"{name} t={threshold}: params {r['parameters_extracted']}/{full_params}, {shown}", flush=True)
    meta = {"date": now_utc(), "command": command_line(), "machine": machine(args.threads), "params": PARAMS,
            "n_train": args.n_train, "epochs": args.epochs, "train_seconds": train_s, "batch": args.batch,
            "repeats": args.repeats, "tasks": [t.name for t in bundle.tasks], "note": args.note}  # fmt: skip
    doc = {"meta": meta, "rows": rows}
    write_json(ROOT / "benchmarks" / "results" / "mod_squad_extraction.json", doc)
    lines = [
        "# Mod-Squad: task-sparse inference (full model vs the extracted single-task model)",
        "",
        f"- date: {meta['date']}",
        f"- machine: {machine_line(meta['machine'])}",
        f"- command: `{meta['command']}`",
        "",
        f"`mod-squad` {PARAMS} trained {args.epochs} epochs on `hetero-vision` ({args.n_train} training images "
        f"per task, each labelled for one of {', '.join(meta['tasks'])}), AdamW lr {args.lr:g} cosine, "
        f"batch {args.batch_size}, seed 0 "
        f"({train_s:.0f} s). `extract(task, data=train images of the task, threshold)` keeps the experts the "
        "task's tokens used on its training images (threshold 0) or those above 5% of its token slots in a "
        "layer. Times: median of "
        f"{args.repeats} calls on a batch of {args.batch} test images of the task, {meta['machine']['threads']} "
        "thread(s); `full, this task`: the full model's `forward_task` (only that task's routing and head); "
        "`full, all tasks`: the full model's ordinary forward. Agreement: share of the task's test images "
        "whose predicted class is the same for both models.",
        "",
        "| task | threshold | params full → extracted | ms full, all tasks | ms full, this task | ms extracted | "
        "speed-up vs this task | test acc full / extracted | agreement |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['task']} | {r['threshold']:g} | {r['parameters_full'] / 1e3:.0f}k → "
            f"{r['parameters_extracted'] / 1e3:.0f}k ({r['parameters_extracted'] / r['parameters_full']:.0%}) | "
            f"{r['ms_full_all_tasks']:.1f} | {r['ms_full_this_task']:.1f} | {r['ms_extracted']:.1f} | "
            f"{r['ms_full_this_task'] / r['ms_extracted']:.2f}x | {r['acc_full']:.4f} / {r['acc_extracted']:.4f} | "
            f"{r['agreement']:.4f} |"
        )
    if args.note:
        lines += ["", f"Note: {args.note}"]
    write_text(ROOT / "docs" / "benchmarks" / "mod_squad_extraction.md", "\n".join(lines) + "\n")
    print("wrote docs/benchmarks/mod_squad_extraction.md")


if __name__ == "__main__":
    main()
