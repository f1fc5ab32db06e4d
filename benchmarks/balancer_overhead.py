"""Step-time overhead of every balancer, against the plain summed-loss step and against torchjd.

For each setting and number of tasks K, every registered balancer runs ``Trainer.step`` (forward,
balancer, AdamW step: exactly what training does) on the same batch; the figure is the median step
time divided by the median step time of ``equal`` (the plain summed-loss step), all measured
interleaved in one run. torchjd's implementation of the same method is timed on the same model and
batch in the same run, through both of its paths: ``autojac`` (``mtl_backward`` + ``jac_to_grad``
with the aggregator) and, where torchjd has a Gramian weighting, ``autogram`` (``Engine`` over the
shared layers, weights from the Gramian, one weighted backward).

Settings: an MLP with about 2.1M shared parameters (512 -> 1024 -> 1024 -> 512, batch 256, K
regression heads) for K = 2, 4, 8; LeNet on Multi-MNIST-shaped input (batch 256, K = 2).

    python benchmarks/balancer_overhead.py                 # full run
    python benchmarks/balancer_overhead.py --quick         # K = 4 only, fewer repeats
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from _common import ROOT, command_line, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.balance import BALANCERS
from polytask.data import DataBundle, InputSpec, TaskTensors
from polytask.nn import build_model
from polytask.tasks import Task
from polytask.train import TrainConfig, Trainer

# polytask name -> (torchjd aggregator factory, torchjd weighting factory or None)
TORCHJD: dict[str, tuple[str, str | None]] = {
    "upgrad": ("UPGrad()", "UPGradWeighting()"),
    "dualproj": ("DualProj()", "DualProjWeighting()"),
    "mgda": ("MGDA()", "MGDAWeighting()"),
    "pcgrad": ("PCGrad()", "PCGradWeighting()"),
    "graddrop": ("GradDrop()", None),
    "gradvac": ("GradVac()", "GradVacWeighting()"),
    "imtl-g": ("IMTLG()", "IMTLGWeighting()"),
    "cagrad": ("CAGrad(c=0.4)", "CAGradWeighting(c=0.4)"),
    "nash-mtl": ("NashMTL(n_tasks=K)", None),
    "aligned-mtl": ("AlignedMTL()", "AlignedMTLWeighting()"),
    "config": ("ConFIG()", None),
    "fairgrad": ("FairGrad(alpha=1.0)", "FairGradWeighting(alpha=1.0)"),
}

# Peer figures measured before this project (same kind of machine, K = 4, 2.2M shared parameters).
PUBLISHED = {"upgrad": "torchjd 3.6x", "pcgrad": "LibMTL 5.0x", "cagrad": "LibMTL 4.1x", "nash-mtl": "LibMTL 4.7x",
             "mgda": "LibMTL 4.6x", "famo": "LibMTL 1.34x"}  # fmt: skip


def _setting(name: str, k: int, batch: int) -> tuple[DataBundle, dict[str, Any]]:
    g = torch.Generator().manual_seed(0)
    if name == "mlp":
        tasks = [Task(f"t{i}", "regression") for i in range(k)]
        spec = InputSpec("tabular", n_numeric=512, cardinalities=())
        x = {"num": torch.randn(batch, 512, generator=g), "cat": torch.zeros(batch, 0, dtype=torch.long)}
        y = {t.name: torch.randn(batch, generator=g) for t in tasks}
        params = {"hidden": (1024, 1024, 512), "tower_hidden": ()}
    else:
        tasks = [Task(f"t{i}", "multiclass", n_classes=10) for i in range(k)]
        spec = InputSpec("image", channels=1, height=28, width=28)
        x = {"image": torch.rand(batch, 1, 28, 28, generator=g)}
        y = {t.name: torch.randint(0, 10, (batch,), generator=g) for t in tasks}
        params = {}
    mask = {t: torch.ones(batch, dtype=torch.bool) for t in y}
    split = TaskTensors(x, y, mask)
    return DataBundle(f"{name}-k{k}", tasks, spec, split, split), params


def _polytask_step(bundle: DataBundle, params: dict[str, Any], method: str) -> tuple[Callable[[], None], int]:
    torch.manual_seed(0)
    model = build_model("shared-bottom", bundle.tasks, bundle.input_spec, **params)
    trainer = Trainer(model, bundle, method, TrainConfig(epochs=1, batch_size=len(bundle.train)), progress=False)
    batch = bundle.train.take(torch.arange(len(bundle.train)))
    n_shared = sum(p.numel() for p in model.shared_parameters())
    return (lambda: trainer.step(batch)), n_shared


def _torchjd_step(bundle: DataBundle, params: dict[str, Any], method: str, path: str) -> Callable[[], None] | None:
    import torchjd.aggregation as agg
    from torchjd.autogram import Engine
    from torchjd.autojac import jac_to_grad, mtl_backward

    aggregator_src, weighting_src = TORCHJD[method]
    k = len(bundle.tasks)
    if path == "autogram" and weighting_src is None:
        return None
    torch.manual_seed(0)
    model = build_model("shared-bottom", bundle.tasks, bundle.input_spec, **params)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    batch = bundle.train.take(torch.arange(len(bundle.train)))
    shared = list(model.shared_parameters())
    tasks = bundle.tasks
    namespace = {**vars(agg), "K": k}
    if path == "autojac":
        aggregator = eval(aggregator_src, namespace)

        def step() -> None:
            preds, reps = model.forward_with_representation(batch.x)
            losses = [t.loss(preds[t.name], batch.y[t.name], batch.mask[t.name]) for t in tasks]
            opt.zero_grad(set_to_none=True)
            mtl_backward(losses, features=reps[0])
            jac_to_grad(shared, aggregator)
            opt.step()

        return step
    weighting = eval(weighting_src, namespace)
    shared_ids = {id(p) for p in shared}
    leaves = [m for m in model.modules() if any(id(p) in shared_ids for p in m.parameters(recurse=False))]
    engine = Engine(*leaves, batch_dim=None)

    def step() -> None:
        preds = model(batch.x)
        losses = torch.stack([t.loss(preds[t.name], batch.y[t.name], batch.mask[t.name]) for t in tasks])
        opt.zero_grad(set_to_none=True)
        gramian = engine.compute_gramian(losses)
        losses.backward(weighting(gramian))
        opt.step()

    return step


def _measure(steps: dict[str, Callable[[], None]], repeats: int, warmup: int) -> dict[str, float]:
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so that drift of a shared machine hits every method alike
        for name, fn in steps.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--settings", nargs="+", default=["mlp", "lenet"], choices=["mlp", "lenet"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None, help="balancers to time (default: all)")
    ap.add_argument("--no-torchjd", action="store_true")
    ap.add_argument("--quick", action="store_true", help="K = 4 on the MLP only, 5 repeats")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "balancer_overhead.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "balancer_overhead.md")
    args = ap.parse_args()
    if args.quick:
        args.ks, args.settings, args.repeats, args.warmup = [4], ["mlp"], 5, 2
    set_threads(args.threads)
    methods = args.methods or sorted(BALANCERS)
    if "equal" not in methods:
        methods = ["equal", *methods]
    results: list[dict[str, Any]] = []
    for setting in args.settings:
        for k in args.ks if setting == "mlp" else [2]:
            bundle, params = _setting(setting, k, args.batch)
            steps: dict[str, Callable[[], None]] = {}
            n_shared = 0
            for m in methods:
                steps[m], n_shared = _polytask_step(bundle, params, m)
            if not args.no_torchjd:
                for m in methods:
                    if m in TORCHJD:
                        for path in ("autojac", "autogram"):
                            fn = _torchjd_step(bundle, params, m, path)
                            if fn is not None:
                                steps[f"torchjd:{path}:{m}"] = fn
            med = _measure(steps, args.repeats, args.warmup)
            base = med["equal"]
            for m in methods:
                row = {"setting": setting, "k": k, "method": m, "level": BALANCERS[m].cls.level,
                       "ms": med[m] * 1e3, "ratio": med[m] / base, "shared_params": n_shared}  # fmt: skip
                for path in ("autojac", "autogram"):
                    key = f"torchjd:{path}:{m}"
                    if key in med:
                        row[f"torchjd_{path}_ratio"] = med[key] / base
                results.append(row)
                jd = [row.get(f"torchjd_{p}_ratio") for p in ("autojac", "autogram")]
                jd_s = " ".join(f"{v:.2f}x" if v else "-" for v in jd)
                print(f"{setting} K={k} {m:<12} {row['ratio']:.2f}x  torchjd(autojac, autogram) {jd_s}", flush=True)
    mach = machine(args.threads)
    write_json(args.json, {"date": now_utc(), "machine": mach, "command": command_line(), "results": results})
    lines = [
        "# Balancer overhead: step time / plain summed-loss step time",
        "",
        f"Measured {now_utc()} on {machine_line(mach)}.",
        f"Command: `{command_line()}`",
        "",
        "Median of interleaved repeated `Trainer.step` calls (forward, balancer, AdamW); the ratio is against",
        "`equal` (one backward of the summed loss) in the same run. torchjd columns: the same method in torchjd",
        "0.18 on the same model and batch, `autojac` (mtl_backward + jac_to_grad) and `autogram` (Gramian",
        "engine + weighting + one weighted backward). Published column: peer figures from the issue.",
        "",
    ]
    for setting in args.settings:
        for k in sorted({r["k"] for r in results if r["setting"] == setting}):
            rows = [r for r in results if r["setting"] == setting and r["k"] == k]
            lines += [f"## {setting}, K = {k} ({rows[0]['shared_params']:,} shared parameters, batch {args.batch})", ""]
            lines += ["| method | level | ms/step | polytask | torchjd autojac | torchjd autogram | published (K=4) |"]
            lines += ["| --- | --- | ---: | ---: | ---: | ---: | --- |"]
            for r in rows:
                jd = [f"{r[c]:.2f}x" if c in r else "—" for c in ("torchjd_autojac_ratio", "torchjd_autogram_ratio")]
                published = PUBLISHED.get(r["method"], "")
                cells = [r["method"], r["level"], f"{r['ms']:.1f}", f"{r['ratio']:.2f}x", *jd, published]
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    write_text(args.md, "\n".join(lines))
    print(f"wrote {args.json} and {args.md}")


if __name__ == "__main__":
    main()
