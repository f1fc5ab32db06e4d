"""Compare architectures on one data set against the single-task baseline trained the same way.

Every model is trained by the same trainer, on the same splits and seeds, selected on validation;
the test metrics are reported with the multi-task gains Δm% and Δp against the ``single`` rows.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polytask.data import DataBundle
from polytask.evaluate.gain import delta_m, delta_p
from polytask.evaluate.tables import mean_std, metrics_table
from polytask.train import TrainConfig, fit, load_data, resolve_device
from polytask.train._checkpoint import atomic_write_text

__all__ = ["CompareResult", "compare"]

BASELINE = "single"


@dataclass
class CompareResult:
    tasks: list[str]
    # model -> seed -> task -> metric -> value (test split)
    test: dict[str, dict[int, dict[str, dict[str, float]]]] = field(default_factory=dict)
    seconds_per_epoch: dict[str, float] = field(default_factory=dict)

    def mean(self, model: str) -> dict[str, dict[str, float]]:
        runs = list(self.test[model].values())
        return {t: {m: sum(r[t][m] for r in runs) / len(runs) for m in runs[0][t]} for t in runs[0]}

    def std(self, model: str) -> dict[str, dict[str, float]]:
        runs = list(self.test[model].values())
        return {t: {m: mean_std([r[t][m] for r in runs])[1] for m in runs[0][t]} for t in runs[0]}

    def gains(self, metrics: dict[str, list[str]] | None = None) -> dict[str, dict[str, float]]:
        if BASELINE not in self.test:
            return {}
        base = self.mean(BASELINE)
        out = {}
        for model in self.test:
            mt = self.mean(model)
            try:
                out[model] = {"Δm%": delta_m(mt, base, metrics=metrics), "Δp": delta_p(mt, base, metrics=metrics)}
            except ValueError:
                out[model] = {"Δm%": math.nan, "Δp": math.nan}
        return out

    def table(self, metrics: dict[str, list[str]] | None = None) -> str:
        rows = {m: self.mean(m) for m in self.test}
        if metrics:
            rows = {m: {t: {k: v for k, v in r[t].items() if k in metrics[t]} for t in r} for m, r in rows.items()}
        return metrics_table(rows, self.tasks, self.gains(metrics))

    def to_dict(self) -> dict[str, Any]:
        return {
            "tasks": self.tasks,
            "test": {m: {str(s): r for s, r in v.items()} for m, v in self.test.items()},
            "mean": {m: self.mean(m) for m in self.test},
            "std": {m: self.std(m) for m in self.test},
            "gains": self.gains(),
            "seconds_per_epoch": self.seconds_per_epoch,
        }


def compare(
    data: str | Path | DataBundle,
    tasks: list[str] | None = None,
    *,
    models: list[str] = ("single", "shared-bottom", "mmoe"),  # type: ignore[assignment]
    model_params: dict[str, dict[str, Any]] | None = None,
    balancer: str = "equal",
    config: TrainConfig | None = None,
    seeds: list[int] = (0,),  # type: ignore[assignment]
    output: str | Path | None = None,
    progress: bool = True,
    data_options: dict[str, Any] | None = None,
    echo: Any = None,
    data_seed: int = 0,
    device: str = "auto",
) -> CompareResult:
    """Train each model for each seed on ``device``; return test metrics and gains against ``single``."""
    config = config or TrainConfig()
    resolve_device(device)  # fail before the first model trains
    bundle = data if isinstance(data, DataBundle) else load_data(data, tasks, seed=data_seed, **(data_options or {}))
    if isinstance(data, DataBundle) and tasks:
        bundle = bundle.select_tasks(tasks)
    result = CompareResult([t.name for t in bundle.tasks])
    for model in models:
        result.test[model] = {}
        secs = []
        for seed in seeds:
            cfg = TrainConfig(**{**config.to_dict(), "seed": seed})
            out = Path(output) / f"{model}-seed{seed}" if output is not None else None
            res = fit(
                bundle,
                model=model,
                model_params=(model_params or {}).get(model),
                balancer=balancer,
                config=cfg,
                output=out,
                progress=progress,
                device=device,
            )
            assert res.test is not None, "compare needs a test split"
            result.test[model][seed] = res.test
            secs.append(res.seconds_per_epoch)
            if echo is not None:
                echo(f"{model} seed {seed}: best epoch {res.best_epoch}, {res.seconds_per_epoch:.2f} s/epoch")
        result.seconds_per_epoch[model] = sorted(secs)[len(secs) // 2]
    if output is not None:
        atomic_write_text(Path(output) / "summary.json", json.dumps(result.to_dict(), indent=1))
        atomic_write_text(Path(output) / "summary.md", result.table() + "\n")
    return result
