"""DDP throughput on Multi-MNIST: 2 CPU processes (1 thread each) vs 1 process with 1 and 2 threads.

Every configuration trains the same LeNet shared-bottom model with the same *global* batch (256) and
the same number of steps per epoch through ``Trainer`` (the code ``polytask fit`` runs, validation
left out so that only training is timed), for a loss-level balancer (``equal``: DDP's own gradient
all-reduce) and a gradient-level one (``upgrad``: the engine all-reduces the per-task gradients
before the Gramian). Each configuration runs in fresh processes (torch.multiprocessing spawn, gloo
on a free local port); the configurations are interleaved over ``--rounds`` rounds so that a change
in the machine's load hits them alike. The figure is the median over all timed epochs (after one
warm-up epoch per launch) of training samples per second; ratios are against 1 process with 1
thread measured in the same run. The 1-minute load average is recorded around every launch.

    python benchmarks/ddp_throughput.py                    # 10k images, 40 steps, 3 rounds x 4 timed epochs
    python benchmarks/ddp_throughput.py --rounds 1 --epochs 2 --steps 10     # a quick look

Writes ``benchmarks/results/ddp_throughput.json`` and ``docs/benchmarks/ddp_throughput.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _common import ROOT, command_line, machine, machine_line, now_utc, set_threads, write_json, write_text

#: (label, processes, threads per process)
CONFIGS = (
    ("1 process x 1 thread", 1, 1),
    ("1 process x 2 threads", 1, 2),
    ("2 processes x 1 thread (DDP, gloo)", 2, 1),
)
BALANCERS = ("equal", "upgrad")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, threads: int, port: int, job: dict[str, Any], out: str) -> None:
    set_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    from polytask.data import load_dataset
    from polytask.nn import build_model
    from polytask.train import TrainConfig, Trainer
    from polytask.train._trainer import _Progress

    bundle = load_dataset("multi-mnist", n_train=job["n_train"], n_val=500, n_test=500)
    torch.manual_seed(0)
    model = build_model("shared-bottom", bundle.tasks, bundle.input_spec)
    cfg = TrainConfig(batch_size=job["batch"], lr=1e-2, max_steps_per_epoch=job["steps"], epochs=job["epochs"] + 1)
    trainer = Trainer(model, bundle, job["balancer"], cfg, progress=False)
    seconds = []
    with _Progress(False) as bar:
        for _ in range(job["epochs"] + 1):
            if world > 1:
                dist.barrier()
            t0 = time.perf_counter()
            trainer._train_epoch(bar)
            if world > 1:
                dist.barrier()
            seconds.append(time.perf_counter() - t0)
    if rank == 0:
        samples = trainer.steps_per_epoch * job["batch"]
        Path(out).write_text(json.dumps({"seconds": seconds[1:], "samples_per_epoch": samples}))
    if world > 1:
        dist.destroy_process_group()


def _loadavg() -> float:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return float("nan")


def _launch(world: int, threads: int, job: dict[str, Any]) -> dict[str, Any]:
    """One launch: timed epoch seconds, samples per epoch and the load average around it."""
    before = _loadavg()
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        mp.spawn(_worker, args=(world, threads, _free_port(), job, out), nprocs=world, join=True)
        res = json.loads(Path(out).read_text())
    return {**res, "load": [before, _loadavg()]}


def _summary(launches: list[dict[str, Any]]) -> dict[str, Any]:
    seconds = [s for r in launches for s in r["seconds"]]
    med = statistics.median(seconds)
    samples = launches[0]["samples_per_epoch"]
    return {
        "seconds_per_epoch": seconds,
        "median_seconds": med,
        "samples_per_epoch": samples,
        "samples_per_s": samples / med,
        "load_average": [x for r in launches for x in r["load"]],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=256, help="global batch (split across processes)")
    ap.add_argument("--steps", type=int, default=40, help="steps per timed epoch")
    ap.add_argument("--epochs", type=int, default=4, help="timed epochs per launch (after one warm-up epoch)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved launches of every configuration")
    ap.add_argument("--note", default="", help="what else ran on the machine, for the markdown")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "ddp_throughput.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "ddp_throughput.md")
    args = ap.parse_args(argv)
    launches: dict[str, dict[str, list[dict[str, Any]]]] = {b: {c[0]: [] for c in CONFIGS} for b in BALANCERS}
    for rnd in range(args.rounds):
        for balancer in BALANCERS:
            job = {"n_train": args.n_train, "batch": args.batch, "steps": args.steps, "epochs": args.epochs,
                   "balancer": balancer}  # fmt: skip
            for label, world, threads in CONFIGS:
                r = _launch(world, threads, job)
                launches[balancer][label].append(r)
                med = statistics.median(r["seconds"])
                print(f"round {rnd + 1} {balancer:<8} {label:<36} {r['samples_per_epoch'] / med:8.0f} samples/s "
                      f"(load {r['load'][0]:.1f} -> {r['load'][1]:.1f})", flush=True)  # fmt: skip
    results = {
        b: {label: {"processes": w, "threads": t, **_summary(launches[b][label])} for label, w, t in CONFIGS}
        for b in BALANCERS
    }
    loads = [x for rows in results.values() for r in rows.values() for x in r["load_average"]]
    mach = machine(1)
    write_json(args.json, {"date": now_utc(), "machine": mach, "command": command_line(), "args": vars(args) | {
        "json": str(args.json), "md": str(args.md)}, "note": args.note, "results": results})  # fmt: skip
    base_label = CONFIGS[0][0]
    lines = [
        "# DDP throughput on Multi-MNIST: 2 CPU processes vs 1",
        "",
        f"Measured {now_utc()} on {machine_line(mach).replace(' with 1 thread(s)', '')}.",
        f"Command: `{command_line()}` (under the shared benchmark lock).",
        f"1-minute load average around the launches: {min(loads):.1f} to {max(loads):.1f} (on 2 cores).",
        *([f"Note: {args.note}"] if args.note else []),
        "",
        f"LeNet shared-bottom, 2 tasks, global batch {args.batch}, {args.steps} steps per epoch "
        f"({args.steps * args.batch} samples), median of {args.rounds} interleaved launches x {args.epochs} timed "
        "epochs, each launch after one warm-up epoch; "
        "training only (no validation). DDP: `Trainer` under a 2-process gloo group, each process a disjoint "
        f"half of every global batch. Ratio: samples/s against {base_label}, same run.",
        "",
        "| balancer | configuration | samples/s | s/epoch (median) | ratio |",
        "| --- | --- | ---: | ---: | ---: |",
    ]
    for balancer, rows in results.items():
        base = rows[base_label]["samples_per_s"]
        for label, r in rows.items():
            lines.append(
                f"| {balancer} | {label} | {r['samples_per_s']:.0f} | {r['median_seconds']:.2f} | "
                f"{r['samples_per_s'] / base:.2f}x |"
            )
    lines += [
        "",
        "`equal` is loss-level (DDP's bucketed gradient all-reduce overlaps the backward pass); `upgrad` is "
        "gradient-level (the engine all-reduces the K per-task gradient blocks, K x the shared parameters, "
        "before the Gramian, then the task-specific gradients).",
    ]
    write_text(args.md, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
