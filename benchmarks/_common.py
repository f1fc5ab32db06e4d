"""Helpers shared by the benchmark scripts: machine description, threads, formatting, output files."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import platform
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sklearn
import torch

from polytask.evaluate import delta_m, delta_p, format_mean_std, mean_std

__all__ = [
    "ROOT",
    "command_line",
    "fmt_cell",
    "gains_vs",
    "machine",
    "machine_line",
    "now_utc",
    "set_threads",
    "write_json",
    "write_text",
]

ROOT = Path(__file__).resolve().parents[1]


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and in the OpenMP/BLAS pools (scikit-learn).

    On a small shared machine more threads than free cores makes torch spin-wait: a 2-thread run
    on 2 busy cores measured ~50x slower per epoch than a 1-thread run.
    """
    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)
    except ImportError:  # pragma: no cover - threadpoolctl ships with scikit-learn
        os.environ["OMP_NUM_THREADS"] = str(n)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine(threads: int) -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "threads": threads,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scikit_learn": sklearn.__version__,
        "platform": platform.platform(),
    }


def machine_line(m: dict[str, Any]) -> str:
    device = m["gpu"] or f"{m['cores']}-core CPU ({m['cpu']}), no GPU"
    return (
        f"{device}; torch {m['torch']} with {m['threads']} thread(s); scikit-learn {m['scikit_learn']}; "
        f"Python {m['python']}"
    )


def command_line() -> str:
    """The exact command that ran this script."""
    return shlex.join(["python", *sys.argv])


def now_utc() -> str:
    return _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def fmt_cell(values: Sequence[float], digits: int = 4) -> str:
    """``mean ± std`` (sample std) of per-seed values; a single value is shown alone."""
    vals = [float(v) for v in values]
    if not vals or any(math.isnan(v) for v in vals):
        return "—"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return format_mean_std(*mean_std(vals), digits)


def gains_vs(row: dict[str, dict[str, float]], base: dict[str, dict[str, float]], metric: str) -> tuple[float, float]:
    """(Δm%, Δp) of mean results ``row`` against ``base`` on one metric per task."""
    return delta_m(row, base, metrics=[metric]), delta_p(row, base, metrics=[metric])


def write_json(path: Path, doc: Any) -> None:
    write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write ``text`` atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
