"""Merge speed and peak memory: polytask against FusionBench and mergekit, and the memory-bandwidth limit.

Input: a model of 33.6M fp32 parameters (8 x Linear(2048, 2048) with biases) and N = 4 and 8
fine-tuned copies (base + 1e-3 Gaussian perturbations), as safetensors files in a temp folder
(warm in the page cache for every tool). Methods: task arithmetic (lam = 0.3) and TIES (density
0.2, disjoint mean, lam = 1), TIES both with whole-model top-k (the paper; FusionBench's) and with
per-tensor top-k (mergekit's). Every run is a fresh subprocess writing a fresh output path (the previous
run's output is deleted before it starts, for every tool); the time is measured inside it from
the first read of the inputs to the written output (imports excluded), and the peak resident memory
is the child's ``VmHWM`` (``ru_maxrss`` would include the parent's pages from before ``exec``), also
shown minus the child's resident memory after its imports ("beyond the interpreter"). Medians of ``--repeats`` runs.

The bandwidth limit is the bytes read ((N + 1) models) divided by this machine's copy bandwidth
(``numpy.copyto`` of a 256 MiB array: bytes copied per second), i.e. the time any tool needs just to
stream its inputs once. Beside it, the write floor: writing one model's bytes to a new file and
fsync-ing it (polytask fsyncs its output before renaming it into place; the peers do not fsync).

Peers run in their own virtual environment (``--peers-python``, default /tmp/peers-venv/bin/python,
with ``fusion-bench`` and ``mergekit`` installed); a peer that cannot be imported is recorded with
the reason. Each peer's merged output is compared with polytask's (max absolute difference).

    python benchmarks/merge_speed.py                    # N = 4, 8; 3 repeats
    python benchmarks/merge_speed.py --quick            # N = 4, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors.torch import load_file, save_file

from _common import ROOT, command_line, machine, machine_line, now_utc, write_json, write_text

LAYERS, WIDTH = 8, 2048
TA_LAM, TIES_DENSITY = 0.3, 0.2

# Child programs: each prints one JSON line {"seconds", "rss_after_imports_kb"} as its last line.
_PRELUDE = """
import json, sys, time, torch
torch.set_num_threads({threads})
def vm(key):  # kB; VmHWM is this process image's peak RSS (ru_maxrss would include the parent's, from fork)
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
"""
_POLYTASK = (
    _PRELUDE
    + """
from polytask.merge import merge_checkpoints
rss0 = vm("VmRSS")
t0 = time.perf_counter()
merge_checkpoints({method!r}, {base!r}, {models!r}, {out!r}, overwrite=True, progress=False, **{params!r})
print(json.dumps({{"seconds": time.perf_counter() - t0, "rss_after_imports_kb": rss0, "hwm_kb": vm("VmHWM")}}))
"""
)
_FUSIONBENCH = (
    _PRELUDE
    + """
from safetensors.torch import load_file, save_file
from torch import nn
from fusion_bench.method import TaskArithmeticAlgorithm, TiesMergingAlgorithm
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear({width}, {width}) for _ in range({layers})])
def load(path):
    with torch.device("meta"):
        net = Net()
    net.load_state_dict(load_file(path), assign=True)
    return net
rss0 = vm("VmRSS")
t0 = time.perf_counter()
pool = {{"_pretrained_": load({base!r}), **{{f"m{{i}}": load(p) for i, p in enumerate({models!r})}}}}
if {method!r} == "task-arithmetic":
    algo = TaskArithmeticAlgorithm(scaling_factor={lam})
else:
    algo = TiesMergingAlgorithm(scaling_factor=1.0, threshold={density_pct}, remove_keys=[], merge_func="mean")
merged = algo.run(pool)
save_file({{k: v.contiguous() for k, v in merged.state_dict().items()}}, {out!r})
print(json.dumps({{"seconds": time.perf_counter() - t0, "rss_after_imports_kb": rss0, "hwm_kb": vm("VmHWM")}}))
"""
)
_MERGEKIT = (
    _PRELUDE
    + """
from mergekit.scripts.merge_raw_pytorch import main
rss0 = vm("VmRSS")
t0 = time.perf_counter()
main.main([{config!r}, {out!r}, "--quiet", "--num-threads", "{threads}"], standalone_mode=False)
print(json.dumps({{"seconds": time.perf_counter() - t0, "rss_after_imports_kb": rss0, "hwm_kb": vm("VmHWM")}}))
"""
)


def make_models(folder: Path, n: int) -> tuple[str, list[str]]:
    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(LAYERS):
        base[f"layers.{i}.weight"] = torch.randn(WIDTH, WIDTH, generator=g) * 0.02
        base[f"layers.{i}.bias"] = torch.randn(WIDTH, generator=g) * 0.02
    save_file(base, folder / "base.safetensors")
    paths = []
    for j in range(n):
        ft = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        save_file(ft, folder / f"ft{j}.safetensors")
        paths.append(str(folder / f"ft{j}.safetensors"))
    return str(folder / "base.safetensors"), paths


def copy_bandwidth(repeats: int = 7) -> float:
    """Bytes per second of a large in-memory copy (numpy.copyto, 256 MiB)."""
    src = np.ones(64 * 2**20, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in first
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return src.nbytes / statistics.median(times)


def write_floor(folder: Path, nbytes: int, repeats: int = 3) -> float:
    """Seconds to write ``nbytes`` to a new file and fsync it (median): the floor of writing an output durably."""
    buf = np.ones(nbytes // 4, dtype=np.float32)
    times = []
    for i in range(repeats):
        path = folder / f"write-floor-{i}.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as f:
            f.write(memoryview(buf))
            f.flush()
            os.fsync(f.fileno())
        times.append(time.perf_counter() - t0)
        path.unlink()
    return statistics.median(times)


def run_child_waited(python: str, code: str, env: dict[str, str]) -> dict[str, Any]:
    """Run ``code`` in a fresh interpreter; its time and peak RSS (``VmHWM``) as it reports them."""
    proc = subprocess.run([python, "-c", code], capture_output=True, env=env, cwd=ROOT, text=True, timeout=1800)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(" | ".join(tail) or f"exit status {proc.returncode}")
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    doc["peak_rss_mb"] = doc["hwm_kb"] / 1024
    doc["beyond_interpreter_mb"] = (doc["hwm_kb"] - doc["rss_after_imports_kb"]) / 1024
    return doc


def _load_any(path: Path) -> dict[str, torch.Tensor]:
    if path.is_dir():
        out: dict[str, torch.Tensor] = {}
        for f in sorted(path.glob("*.safetensors")):
            out.update(load_file(f))
        return out
    return load_file(path)


def compare(a: Path, b: Path) -> tuple[float, int]:
    """Max absolute difference and number of entries differing by more than 1e-6."""
    x, y = _load_any(a), _load_any(b)
    diffs = [(x[k].float() - y[k].float()).abs() for k in x]
    return max(float(d.max()) for d in diffs), sum(int((d > 1e-6).sum()) for d in diffs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4,8", help="Comma-separated numbers of fine-tuned models.")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in every child (all tools alike).")
    ap.add_argument(
        "--polytask-threads", type=int, default=None, help="Also time polytask with this many threads (extra rows)."
    )
    ap.add_argument("--peers-python", default="/tmp/peers-venv/bin/python")
    ap.add_argument("--quick", action="store_true", help="N = 4, one repeat.")
    ap.add_argument("--width", type=int, default=2048, help="Layer width (smaller only to try the script out).")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "merge_speed.json")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "benchmarks" / "merge_speed.md")
    args = ap.parse_args()
    globals()["WIDTH"] = args.width
    sizes = [4] if args.quick else [int(s) for s in args.sizes.split(",")]
    repeats = 1 if args.quick else args.repeats
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    env.pop("PYTHONPATH", None)

    peers: dict[str, str | None] = {}
    for name, dist in (("fusionbench", "fusion-bench"), ("mergekit", "mergekit")):
        module = dist.replace("-", "_")
        if not Path(args.peers_python).exists():
            peers[name] = f"no peer interpreter at {args.peers_python}"
            continue
        probe = subprocess.run(
            [args.peers_python, "-c", f"import {module}, importlib.metadata as m; print(m.version('{dist}'))"],
            capture_output=True,
            text=True,
            env=env,
        )
        if probe.returncode != 0:
            peers[name] = f"import {module} failed: {' '.join(probe.stderr.strip().splitlines()[-1:])}"
        else:
            peers[name] = None
            peers[f"{name}_version"] = probe.stdout.strip().splitlines()[-1]

    load_before = os.getloadavg()
    bandwidth = copy_bandwidth()
    rows: list[dict[str, Any]] = []
    floors: dict[str, float] = {}
    tmp = Path(tempfile.mkdtemp(prefix="polytask-merge-speed-"))
    # the children import a snapshot of the source taken now, not whatever the tree holds later
    shutil.copytree(ROOT / "src", tmp / "src")
    py_env = {**env, "PYTHONPATH": str(tmp / "src")}
    try:
        for n in sizes:
            base, models = make_models(tmp, n)
            model_bytes = Path(base).stat().st_size
            limit = (n + 1) * model_bytes / bandwidth
            floors.setdefault("write_fsync_s", write_floor(tmp, model_bytes))
            mk_cfgs = {}
            for method, mk_method, params in (
                ("task-arithmetic", "task_arithmetic", {"weight": TA_LAM}),
                ("ties", "ties", {"weight": 1.0, "density": TIES_DENSITY}),
            ):
                cfg = {
                    "merge_method": mk_method,
                    "base_model": base,
                    "models": [{"model": m, "parameters": params} for m in models],
                    "parameters": {"normalize": method == "ties"},
                    "dtype": "float32",
                }
                path = tmp / f"mergekit-{method}.yaml"
                path.write_text(yaml.safe_dump(cfg))
                mk_cfgs[method] = str(path)
            t1, t2 = args.threads, args.polytask_threads
            ta = {"lam": TA_LAM}
            ties_model = {"density": TIES_DENSITY, "topk": "model", "lam": 1.0}
            ties_tensor = {"density": TIES_DENSITY, "topk": "tensor", "lam": 1.0}
            cases = [
                ("polytask", "task-arithmetic", "-", ta, t1),
                ("polytask", "task-arithmetic", "-", ta, t2),
                ("fusionbench", "task-arithmetic", "-", None, t1),
                ("mergekit", "task-arithmetic", "-", None, t1),
                ("polytask", "ties", "model", ties_model, t1),
                ("polytask", "ties", "model", ties_model, t2),
                ("fusionbench", "ties", "model", None, t1),
                ("polytask", "ties", "tensor", ties_tensor, t1),
                ("polytask", "ties", "tensor", ties_tensor, t2),
                ("mergekit", "ties", "tensor", None, t1),
            ]
            # no extra rows without --polytask-threads, nor twice the same thread count
            cases = [c for i, c in enumerate(cases) if c[4] is not None and c not in cases[:i]]
            outputs: dict[tuple[str, str, str], Path] = {}
            for tool, method, topk, params, threads in cases:
                row: dict[str, Any] = {"n_models": n, "tool": tool, "method": method, "topk": topk, "threads": threads}
                if tool != "polytask" and peers.get(tool):
                    row["error"] = peers[tool]
                    rows.append(row)
                    continue
                # mergekit writes a folder; the others one safetensors file
                out = (
                    tmp / f"out-{tool}-{method}-{topk}"
                    if tool == "mergekit"
                    else tmp / f"out-{tool}-{method}-{topk}.safetensors"
                )
                if threads != t1:
                    out = out.with_name(f"{out.stem}-t{threads}{out.suffix}")
                fmt = {"threads": threads, "base": base, "models": models, "out": str(out)}
                if tool == "polytask":
                    code, python = _POLYTASK.format(method=method, params=params, **fmt), sys.executable
                    e = {**py_env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
                elif tool == "fusionbench":
                    code = _FUSIONBENCH.format(
                        method=method, width=WIDTH, layers=LAYERS, lam=TA_LAM, density_pct=TIES_DENSITY * 100, **fmt
                    )
                    python, e = args.peers_python, env
                else:
                    code, python, e = _MERGEKIT.format(config=mk_cfgs[method], **fmt), args.peers_python, env
                runs = []
                try:
                    for _ in range(repeats):
                        # every run writes a fresh output: deleting the previous one (freeing its blocks) is
                        # not part of a merge, and tools that overwrite in place would pay for it
                        if out.is_dir():
                            shutil.rmtree(out)
                        elif out.exists():
                            out.unlink()
                        runs.append(run_child_waited(python, code, e))
                        print(f"N={n} {tool:<12} t={threads} {method:<16} topk={topk:<6} {runs[-1]['seconds']:.3f} s "
                              f"peak {runs[-1]['peak_rss_mb']:.0f} MB", flush=True)  # fmt: skip
                except (RuntimeError, subprocess.SubprocessError, json.JSONDecodeError) as err:
                    row["error"] = str(err)[:300]
                    print(f"N={n} {tool} {method}: failed: {row['error']}", flush=True)
                    rows.append(row)
                    continue
                row.update(
                    seconds=[r["seconds"] for r in runs],
                    median_s=statistics.median(r["seconds"] for r in runs),
                    peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in runs),
                    beyond_interpreter_mb=statistics.median(r["beyond_interpreter_mb"] for r in runs),
                    bandwidth_limit_s=limit,
                )
                if threads == t1:
                    outputs[(tool, method, topk)] = out
                ref = outputs.get(("polytask", method, topk))
                if out != ref and ref is not None:
                    row["max_abs_diff_vs_polytask"], row["entries_differing_vs_polytask"] = compare(out, ref)
                rows.append(row)
            for p in list(tmp.iterdir()):
                if p.name.startswith("out-"):
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    m = machine(args.threads)
    doc = {
        "date": now_utc(),
        "machine": m,
        "command": command_line(),
        "threads": args.threads,
        "repeats": repeats,
        "copy_bandwidth_gb_s": bandwidth / 1e9,
        "model_parameters": LAYERS * (WIDTH * WIDTH + WIDTH),
        "peers": peers,
        "load_average_1min": {"start": load_before[0], "end": os.getloadavg()[0]},
        "output_write_fsync_s": floors.get("write_fsync_s"),
        "rows": rows,
    }
    write_json(args.json, doc)
    write_text(args.md, _markdown(doc))
    print(_markdown(doc))


def _why_ties(rows: list[dict[str, Any]]) -> list[str]:
    """Where TIES misses 10x at some N: how polytask's and the faster peer's times scale with N."""

    def best(n: int, polytask: bool) -> dict[str, Any] | None:
        c = [r for r in rows if r["n_models"] == n and r["method"] == "ties" and (r["tool"] == "polytask") == polytask]
        return min(c, key=lambda r: r["median_s"]) if c else None

    sizes = sorted({r["n_models"] for r in rows})
    missed = [
        n
        for n in sizes
        if best(n, True) and best(n, False) and best(n, False)["median_s"] < 10 * best(n, True)["median_s"]
    ]
    if not missed or len(sizes) < 2:
        return []
    lo, hi = sizes[0], sizes[-1]
    o_lo, o_hi, p_lo, p_hi = best(lo, True), best(hi, True), best(lo, False), best(hi, False)
    assert o_lo and o_hi and p_lo and p_hi
    return [
        "",
        f"Why TIES misses 10x at N = {', '.join(map(str, missed))}: the faster peer's time grows with N far more "
        f"than ours ({p_lo['tool']} {p_lo['median_s']:.1f} s at N = {lo}, {p_hi['tool']} {p_hi['median_s']:.1f} s "
        f"at N = {hi}; polytask {o_lo['median_s']:.2f} s and {o_hi['median_s']:.2f} s), so the ratio is smallest at "
        "small N. Whole-model TIES must read every model twice (a pass for the exact top-k thresholds, then the "
        "merge pass), and polytask spends the rest on about fifteen element-wise passes per entry and model, in "
        "cache-sized blocks, plus writing and fsync-ing the output; the remaining factor would need fused kernels "
        "(one pass per block instead of fifteen) or more than the one thread every tool gets here. The ratio also "
        "moves by +-20% between runs with the other jobs on these two cores.",
    ]


def _verdict(ok: bool, need_s: float) -> str:
    return "met" if ok else f"missed, it needs <= {need_s:.2f} s"


def _fmt_s(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f} s"


def _markdown(doc: dict[str, Any]) -> str:
    rows = doc["rows"]
    lines = [
        "# Merge speed: polytask vs FusionBench vs mergekit",
        "",
        f"- Date: {doc['date']}",
        f"- Machine: {machine_line(doc['machine'])}",
        f"- Command: `{doc['command']}`",
        f"- Model: {doc['model_parameters'] / 1e6:.1f}M fp32 parameters (8 x Linear(2048, 2048) + biases), "
        "N fine-tuned copies as safetensors files, warm in the page cache.",
        f"- Every run is a fresh subprocess with {doc['threads']} torch thread(s) (extra polytask rows: the "
        f"`threads` shown); median of {doc['repeats']} runs; "
        "time from the first read to the written output (imports excluded), each run writing a fresh output path "
        "(the previous output deleted before the run, for every tool); peak RSS is the child's `VmHWM`, and the "
        "same minus the child's RSS after its imports.",
        f"- Bandwidth limit: (N + 1) x model bytes / copy bandwidth ({doc['copy_bandwidth_gb_s']:.1f} GB/s, "
        "numpy copy of 256 MiB).",
        f"- Write floor: writing one model's bytes ({doc['model_parameters'] * 4 / 1e6:.0f} MB) to a new file and "
        f"fsync-ing it takes {_fmt_s(doc.get('output_write_fsync_s'))} here (polytask fsyncs its output before the "
        "rename; the peers do not fsync); not part of the bandwidth limit.",
        "- TIES: density 0.2, disjoint mean, lam 1; `model` = whole-model top-k (paper, FusionBench), "
        "`tensor` = per-tensor top-k (mergekit). Task arithmetic: lam 0.3.",
        "",
        "| N | method | top-k | tool | threads | median s | vs polytask | x bandwidth limit | peak RSS MB "
        "| beyond interp. MB | max abs diff vs polytask (entries > 1e-6) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['n_models']} | {r['method']} | {r['topk']} | {r['tool']} | {r.get('threads', '')} "
                         f"| failed: {r['error']} | | | | | |")  # fmt: skip
            continue
        ours = next(
            (
                x
                for x in rows
                if x["tool"] == "polytask"
                and x["n_models"] == r["n_models"]
                and x["method"] == r["method"]
                and x["topk"] == r["topk"]
                and x.get("threads", doc["threads"]) == doc["threads"]
                and "median_s" in x
            ),
            None,
        )
        ratio = f"{r['median_s'] / ours['median_s']:.1f}x" if ours else "—"
        diff = r.get("max_abs_diff_vs_polytask")
        differing = r.get("entries_differing_vs_polytask")
        lines.append(
            f"| {r['n_models']} | {r['method']} | {r['topk']} | {r['tool']} | {r.get('threads', doc['threads'])} "
            f"| {r['median_s']:.2f} | {ratio} | "
            f"{r['median_s'] / r['bandwidth_limit_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['beyond_interpreter_mb']:.0f} | {'—' if diff is None else f'{diff:.1e} ({differing} entries)'} |"
        )
    lines += ["", "Against the targets (TIES >= 10x faster than the faster peer, task arithmetic within 5x of the "
              "bandwidth limit, peak memory under 1 GB beyond the interpreter):", ""]  # fmt: skip
    ok = [r for r in rows if "median_s" in r and r.get("threads", doc["threads"]) == doc["threads"]]
    for n in sorted({r["n_models"] for r in ok}):
        at = [r for r in ok if r["n_models"] == n]
        ours = {(r["method"], r["topk"]): r for r in at if r["tool"] == "polytask"}
        peer_ties = [r for r in at if r["tool"] != "polytask" and r["method"] == "ties"]
        if peer_ties and ("ties", "model") in ours and ("ties", "tensor") in ours:
            fastest = min(peer_ties, key=lambda r: r["median_s"])
            best = min(ours[("ties", "model")]["median_s"], ours[("ties", "tensor")]["median_s"])
            lines.append(
                f"- N = {n}: TIES {best:.2f} s (polytask, faster scope) vs {fastest['median_s']:.2f} s "
                f"({fastest['tool']}, the faster peer): {fastest['median_s'] / best:.1f}x; like for like "
                + ", ".join(
                    f"{r['tool']} {r['median_s'] / ours[('ties', r['topk'])]['median_s']:.1f}x" for r in peer_ties
                )
                + f" (target >= 10x: {_verdict(fastest['median_s'] / best >= 10, fastest['median_s'] / 10)})."
            )
        if ("task-arithmetic", "-") in ours:
            ta = ours[("task-arithmetic", "-")]
            x = ta["median_s"] / ta["bandwidth_limit_s"]
            floor = doc.get("output_write_fsync_s")
            extra = (
                f"; writing and fsync-ing the output alone takes {floor:.3f} s "
                f"({floor / ta['bandwidth_limit_s']:.1f}x the limit)"
                if floor
                else ""
            )
            lines.append(f"- N = {n}: task arithmetic {ta['median_s']:.2f} s = {x:.1f}x the bandwidth limit "
                         f"({ta['bandwidth_limit_s']:.3f} s; target <= 5x: "
                         f"{_verdict(x <= 5, 5 * ta['bandwidth_limit_s'])}){extra}.")  # fmt: skip
        mem = max(r["beyond_interpreter_mb"] for r in ours.values())
        lines.append(f"- N = {n}: polytask's largest peak beyond the interpreter: {mem:.0f} MB.")
    lines += _why_ties(ok)
    peers = doc["peers"]
    load = doc["load_average_1min"]
    busy = max(load["start"], load["end"]) > 1.5  # one benchmark child keeps one of the 2 cores busy
    load_line = (
        f"Load: the 2 cores were shared with other jobs (1-minute load average {load['start']:.1f} at the start, "
        f"{load['end']:.1f} at the end), so absolute times are inflated; the ratios compare tools measured "
        "interleaved in the same run."
        if busy
        else f"Load: no other job ran (1-minute load average {load['start']:.1f} at the start, {load['end']:.1f} "
        "at the end: the benchmark's own child process)."
    )
    lines += [
        "",
        load_line,
        "",
        "Differences between outputs come from how many entries TIES keeps when `density * n` is not an integer: "
        "FusionBench keeps `int(density * n) + 1` per task vector (its threshold is the `(n - int(density * n))`-th "
        "smallest magnitude), mergekit `int(density * n)` per tensor, polytask `round(density * n)`. The outputs "
        "differ at those boundary entries (one per model and ranking scope) and at the odd entry whose elected "
        "sign comes from a sum within float rounding of zero (the tools add in different orders); everywhere else "
        "they agree to float rounding, as task arithmetic does.",
        "",
        f"Peers: fusion-bench {peers.get('fusionbench_version', '—')}, mergekit {peers.get('mergekit_version', '—')} "
        "(own virtual environment, torch 2.13.0 CPU).",
    ]
    for name in ("fusionbench", "mergekit"):
        if peers.get(name):
            lines.append(f"- {name} could not run here: {peers[name]}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
