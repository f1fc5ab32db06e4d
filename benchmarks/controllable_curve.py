"""Controllable multi-task architecture: the accuracy / compute curve of one trained model.

One slimmable model (``controllable``, Aich et al., ICCV 2023) is trained once on Multi-MNIST; after
training its batch-norm statistics are recomputed per width, every configuration is profiled on the
validation split, and for each FLOPs budget ``search`` picks a configuration (equal task preferences,
and a left-only preference), which is then evaluated on the test split. Beside it, fixed-width models
(the same architecture with every layer as wide as the slimmable one at that ratio, so the same
FLOPs as the controllable model's uniform configuration there) are trained separately, one per
width, under the same protocol.

    python benchmarks/controllable_curve.py                  # 3 seeds
    python benchmarks/controllable_curve.py --seeds 1 --n-train 2000 --epochs 2     # a quick look

Writes ``benchmarks/results/controllable_curve.json``, ``docs/benchmarks/controllable_curve.md`` and
``docs/benchmarks/controllable_curve.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from _common import ROOT, command_line, fmt_cell, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.data import load_dataset
from polytask.nn import build_model
from polytask.nn.architectures.controllable import calibrate_batch_norm, profile_configurations
from polytask.nn.slimmable import active_width
from polytask.train import TrainConfig, Trainer, evaluate_model

WIDTHS = (0.25, 0.5, 0.75, 1.0)
TRAIN: dict[str, Any] = {"epochs": 5, "batch_size": 64, "lr": 1e-2, "schedule": "cosine", "patience": None}


def fixed_width_params(r: float) -> dict[str, Any]:
    """The architecture at one width: every layer as wide as the slimmable one runs at ratio ``r``."""
    return {"widths": (1.0,), "conv_channels": (active_width(16, r), active_width(32, r)),
            "hidden": (active_width(64, r),), "decoder_hidden": (active_width(32, r),), "n_sampled": 0}  # fmt: skip


def train(bundle: Any, params: dict[str, Any], seed: int, cfg: TrainConfig) -> tuple[Any, float]:
    torch.manual_seed(seed)
    model = build_model("controllable", bundle.tasks, bundle.input_spec, **params)
    t0 = time.perf_counter()
    Trainer(model, bundle, "equal", TrainConfig(**{**cfg.to_dict(), "seed": seed}), None, progress=False).fit()
    calibrate_batch_norm(model, bundle.train)
    return model, time.perf_counter() - t0


def test_scores(model: Any, bundle: Any, config: dict[str, float]) -> dict[str, float]:
    model.set_config(config)
    metrics = evaluate_model(model, bundle.test, bundle.tasks)
    return {t.name: metrics[t.name]["accuracy"] for t in bundle.tasks}


def run_seed(bundle: Any, seed: int, cfg: TrainConfig, slim: dict[str, Any]) -> dict[str, Any]:
    model, secs = train(bundle, {"widths": WIDTHS, **slim}, seed, cfg)
    table = profile_configurations(model, bundle.val)
    uniform = {r: {k: r for k in model.config_keys} for r in WIDTHS}
    budgets = [model.count(uniform[r])["flops"] for r in WIDTHS]
    prefs = {"equal": None, "left only": {"left": 1.0, "right": 0.0}}
    curve: dict[str, list[dict[str, Any]]] = {}
    for pname, p in prefs.items():
        curve[pname] = []
        for budget in budgets:
            chosen = model.search(budget, p, table)
            curve[pname].append({"budget": budget, "config": chosen, "flops": model.count(chosen)["flops"],
                                 "test": test_scores(model, bundle, chosen)})  # fmt: skip
    fixed = []
    for r in WIDTHS:
        m, s = train(bundle, fixed_width_params(r), seed, cfg)
        full = {k: 1.0 for k in m.config_keys}
        fixed.append({"width": r, "flops": m.count(full)["flops"], "parameters": m.count(full)["parameters"],
                      "test": test_scores(m, bundle, full), "seconds": s})  # fmt: skip
    uniform_test = [{"width": r, "test": test_scores(model, bundle, uniform[r])} for r in WIDTHS]
    return {"controllable_seconds": secs, "curve": curve, "fixed": fixed, "uniform": uniform_test,
            "n_configurations": len(table)}  # fmt: skip


SANDWICH = " (sandwich rule: one of them always the narrowest)"


def markdown(doc: dict[str, Any], name: str = "controllable_curve") -> str:
    meta = doc["meta"]
    runs = doc["runs"]
    tr, sl = meta["train"], meta.get("slimmable", {"n_sampled": 1, "sandwich": False})
    lines = [
        "# Controllable multi-task architecture: accuracy / compute from one trained model",
        "",
        f"- date: {meta['date']}",
        f"- machine: {machine_line(meta['machine'])}",
        f"- command: `{meta['command']}`",
        "",
        f"Multi-MNIST {meta['split']}, {tr['epochs']} epochs, batch {tr['batch_size']}, AdamW lr "
        f"{tr['lr']:g} cosine, equal weighting, seeds {meta['seeds']}, no early stopping. One `controllable` "
        f"model with width ratios {list(WIDTHS)} for the encoder and each task decoder "
        f"({runs[0]['n_configurations']} configurations) is trained once per seed with {sl['n_sampled']} "
        f"sampled sub-configuration(s) distilled per step{SANDWICH if sl['sandwich'] else ''}; "
        "after batch-norm "
        "recalibration each configuration is profiled on **validation**, and `search(budget, preferences, "
        "table)` picks the configuration per FLOPs budget; the table shows its **test** accuracy (mean ± std "
        "over seeds). Budgets are the FLOPs of the uniform configurations (all widths equal to r). "
        "Fixed-width rows: the same architecture with every layer as wide as the slimmable one runs at ratio r "
        "(no slimming, no distillation), trained separately (one model per budget). `uniform r (controllable)`: "
        "the trained controllable model run at all widths r.",
        "",
        "| budget (MFLOPs / image) | fixed-width model, left / right | controllable uniform r, left / right | "
        "controllable search (equal prefs), left / right | its config | search (left only): left |",
        "| ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for i, r in enumerate(WIDTHS):
        fx = [run["fixed"][i] for run in runs]
        un = [run["uniform"][i] for run in runs]
        eq = [run["curve"]["equal"][i] for run in runs]
        lo = [run["curve"]["left only"][i] for run in runs]

        def pair(rows: list[dict[str, Any]]) -> str:
            return " / ".join(fmt_cell([x["test"][t] for x in rows]) for t in ("left", "right"))

        cfg = ", ".join(f"{k} {v:g}" for k, v in eq[0]["config"].items())
        lines.append(
            f"| {fx[0]['flops'] / 1e6:.2f} (r = {r:g}) | {pair(fx)} | {pair(un)} | {pair(eq)} | {cfg} (seed 0) | "
            f"{fmt_cell([x['test']['left'] for x in lo])} |"
        )
    t_ctrl = statistics.median(run["controllable_seconds"] for run in runs)
    t_fixed = statistics.median(sum(f["seconds"] for f in run["fixed"]) for run in runs)
    lines += [
        "",
        f"Training cost: one controllable model {t_ctrl:.0f} s vs {t_fixed:.0f} s for the {len(WIDTHS)} fixed-width "
        "models together (median over seeds; measured while other jobs shared the machine).",
        "",
        f"![accuracy against FLOPs]({name}.png)",
    ]
    if meta.get("note"):
        lines += ["", f"Note: {meta['note']}"]
    return "\n".join(lines) + "\n"


def plot(doc: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    runs = doc["runs"]

    def mean_acc(rows_of: Any) -> list[float]:
        return [statistics.fmean(statistics.fmean(x["test"].values()) for x in rows_of(i)) for i in range(len(WIDTHS))]

    flops = [runs[0]["fixed"][i]["flops"] / 1e6 for i in range(len(WIDTHS))]
    ax.plot(flops, mean_acc(lambda i: [r["fixed"][i] for r in runs]), "o-", label="fixed-width models (one each)")
    ax.plot(flops, mean_acc(lambda i: [r["curve"]["equal"][i] for r in runs]), "s-", label="controllable: search")
    ax.plot(flops, mean_acc(lambda i: [r["uniform"][i] for r in runs]), "^--", label="controllable: uniform r")
    ax.set_xlabel("MFLOPs per image")
    ax.set_ylabel("test accuracy (mean of tasks)")
    ax.set_title("Multi-MNIST: one controllable model vs fixed widths")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--epochs", type=int, default=TRAIN["epochs"])
    ap.add_argument("--batch-size", type=int, default=TRAIN["batch_size"])
    ap.add_argument("--n-sampled", type=int, default=1, help="sub-configurations distilled per step")
    ap.add_argument("--sandwich", action="store_true", help="always distil the narrowest configuration too")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--note", default="")
    ap.add_argument("--name", default="controllable_curve", help="stem of the results JSON, doc and plot")
    args = ap.parse_args()
    set_threads(args.threads)
    split = {"n_train": args.n_train, "n_val": 2000, "n_test": 5000}
    bundle = load_dataset("multi-mnist", seed=0, **split)
    cfg = TrainConfig(**{**TRAIN, "epochs": args.epochs, "batch_size": args.batch_size})
    slim = {"n_sampled": args.n_sampled, "sandwich": args.sandwich}
    runs = []
    for seed in range(args.seeds):
        runs.append(run_seed(bundle, seed, cfg, slim))
        print(f"seed {seed}: {runs[-1]['curve']['equal']}", flush=True)
    meta = {"date": now_utc(), "command": command_line(), "machine": machine(args.threads),
            "seeds": list(range(args.seeds)), "split": split, "train": cfg.to_dict(), "slimmable": slim,
            "note": args.note}  # fmt: skip
    doc = {"meta": meta, "runs": runs}
    write_json(ROOT / "benchmarks" / "results" / f"{args.name}.json", doc)
    plot(doc, ROOT / "docs" / "benchmarks" / f"{args.name}.png")
    write_text(ROOT / "docs" / "benchmarks" / f"{args.name}.md", markdown(doc, args.name))
    print(f"wrote docs/benchmarks/{args.name}.md")


if __name__ == "__main__":
    main()
