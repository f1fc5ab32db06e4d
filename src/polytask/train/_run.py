"""The run-level API that the CLI mirrors: fit, load, evaluate and predict a run directory.

A run directory holds ``config.json`` (how it was made), ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (``best`` and ``last``, safetensors + JSON) and ``results.json``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from polytask.balance import build_balancer
from polytask.boost import BOOSTERS, fit_boosted, load_boosted, save_boosted
from polytask.data import DATASETS, DataBundle, InputSpec, TableEncoder, load_dataset, load_table, read_table
from polytask.nn import MultiTaskModel, build_model
from polytask.tasks import Task, TaskKind
from polytask.train._checkpoint import CheckpointError, atomic_write_text, load_checkpoint
from polytask.train._device import resolve_device
from polytask.train._distributed import init_from_env
from polytask.train._trainer import FitResult, TrainConfig, Trainer, evaluate_model, predict_model

__all__ = ["LoadedRun", "evaluate", "fit", "load_data", "load_run", "predict"]


def load_data(
    source: str | Path | DataBundle,
    tasks: list[str] | None = None,
    *,
    seed: int = 0,
    **options: Any,
) -> DataBundle:
    """A built-in data set by name (``multi-mnist``, ``census-group1``, ...) or a CSV/Parquet file.

    For files, ``tasks`` are ``NAME:KIND`` specs and ``options`` go to :func:`polytask.data.load_table`
    (``val``, ``test``, ``numeric``, ``categorical``, ``drop``, ``task_column``, fractions); for
    built-in sets, ``tasks`` selects task names and ``options`` go to the set's loader.
    """
    if isinstance(source, DataBundle):
        return source.select_tasks([t.split(":")[0] for t in tasks]) if tasks else source
    name = str(source)
    if name in DATASETS:
        bundle = load_dataset(name, seed=seed, **options)
        if tasks:
            # rows labelled for none of the chosen tasks (other tasks' rows of task-column data) are dropped
            bundle = bundle.select_tasks([t.split(":")[0] for t in tasks]).labelled_rows_only()
    elif not tasks:
        raise ValueError(f"{name}: name the targets with --task NAME:KIND (e.g. --task income:binary)")
    else:
        bundle = load_table(name, tasks=tasks, seed=seed, **options)
    # How to load these exact splits again (for evaluate/predict on the run directory).
    bundle.meta["source"] = {
        "source": name,
        "builtin": name in DATASETS,
        "tasks": list(tasks or []),
        "options": dict(options),
        "seed": seed,
    }
    return bundle


def fit(
    data: str | Path | DataBundle,
    tasks: list[str] | None = None,
    *,
    model: str = "shared-bottom",
    model_params: dict[str, Any] | None = None,
    balancer: str = "equal",
    balancer_params: dict[str, Any] | None = None,
    config: TrainConfig | None = None,
    output: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    data_options: dict[str, Any] | None = None,
    data_seed: int = 0,
    device: str | torch.device | None = "auto",
) -> FitResult:
    """Train ``model`` on ``data`` with ``balancer``; the Python twin of ``polytask fit``.

    ``data_seed`` fixes the train/val/test split (kept the same across training seeds so that runs
    with different ``config.seed`` are comparable). ``device``: ``auto`` (the GPU when torch sees
    one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``. Under torchrun it trains data-parallel
    (``docs/distributed.md``); rank 0 writes the run directory.
    """
    dev = resolve_device(device)  # before the process group: the device picks gloo or nccl
    ctx = init_from_env(dev)
    config = config or TrainConfig()
    data_options = dict(data_options or {})
    bundle = load_data(data, tasks, seed=data_seed, **data_options)
    if model in BOOSTERS:  # tree ensembles are fitted by their estimator in one go, not by the trainer
        return _fit_boosted_run(bundle, model, model_params or {}, balancer, config, output, resume)
    torch.manual_seed(config.seed)
    net = build_model(model, bundle.tasks, bundle.input_spec, **(model_params or {}))
    bal = build_balancer(balancer, bundle.tasks, **(balancer_params or {}))
    source = bundle.meta.get("source", {"source": bundle.name, "builtin": False, "in_memory": True})
    meta = {
        "data_source": source,
        "model": {"name": model, "params": dict(model_params or {})},
        "balancer": {"name": balancer, "params": dict(balancer_params or {})},
    }
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        cfg_doc = {**meta, "train_config": config.to_dict(), "tasks": [t.to_dict() for t in bundle.tasks]}
        cfg_path = out / "config.json"
        if resume and cfg_path.exists():
            saved = json.loads(cfg_path.read_text())
            now = json.loads(json.dumps({"model": meta["model"], "balancer": meta["balancer"]}))  # tuples -> lists
            if saved.get("model") != now["model"] or saved.get("balancer") != now["balancer"]:
                raise ValueError(f"cannot resume {out}: model or balancer differ from the saved run")
        if ctx is None or ctx.is_main:
            atomic_write_text(cfg_path, json.dumps(cfg_doc, indent=1))
    trainer = Trainer(net, bundle, bal, config, output, progress=progress, run_meta=meta, device=dev)
    return trainer.fit(resume=resume)


@dataclass
class LoadedRun:
    model: MultiTaskModel
    tasks: list[Task]
    input_spec: InputSpec
    encoder: TableEncoder | None
    meta: dict[str, Any]


def load_run(run_dir: str | Path, which: str = "best", device: str | torch.device | None = "cpu") -> LoadedRun:
    """Rebuild the model of a run from its checkpoint (``best`` by default, else ``last``) on ``device``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run directory {run_dir} does not exist")
    if (run_dir / "checkpoints" / BOOSTED_FILE).exists():
        booster, doc = load_boosted(run_dir / "checkpoints" / BOOSTED_FILE)
        enc = TableEncoder.from_dict(doc["encoder"]) if doc.get("encoder") else None
        return LoadedRun(booster, booster.tasks, booster.input_spec, enc, doc)
    path = run_dir / "checkpoints" / f"{which}.json"
    if not path.exists() and which == "best":
        path = run_dir / "checkpoints" / "last.json"
    if not path.exists():
        raise CheckpointError(f"{run_dir} holds no checkpoint (looked for checkpoints/best.json and last.json)")
    tensors, meta = load_checkpoint(path)
    try:
        tasks = [Task.from_dict(t) for t in meta["tasks"]]
        spec = InputSpec.from_dict(meta["input_spec"])
        net = build_model(meta["model"]["name"], tasks, spec, **meta["model"]["params"])
        net.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    except (KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not match its model description: {e}") from e
    encoder = TableEncoder.from_dict(meta["encoder"]) if meta.get("encoder") else None
    net.to(resolve_device(device)).eval()
    return LoadedRun(net, tasks, spec, encoder, meta)


def _labelled_data(run: LoadedRun, data: str | Path | None) -> dict[str, DataBundle | Any]:
    src = run.meta["data_source"]
    if data is None:
        if src.get("in_memory"):
            raise ValueError(f"this run was trained on in-memory data '{src['source']}'; pass the DATA to evaluate on")
        bundle = _own_data(run)
        splits = {"val": bundle.val}
        if bundle.test is not None:
            splits["test"] = bundle.test
        return splits
    name = str(data)
    if name in DATASETS:
        bundle = _builtin(run, name)
        return {"test": bundle.test if bundle.test is not None else bundle.val}
    if run.encoder is None:
        raise ValueError(f"{name}: this run was trained on the built-in data set '{src['source']}', not on a table")
    return {name: run.encoder.transform(read_table(name))}


def _own_data(run: LoadedRun) -> DataBundle:
    """The same call that produced the run's splits (source, task choice, options, split seed), so the
    same splits come back."""
    src = run.meta["data_source"]
    return load_data(src["source"], src.get("tasks") or None, seed=src["seed"], **src.get("options", {}))


def _builtin(run: LoadedRun, name: str) -> DataBundle:
    """Built-in set ``name`` as the run saw it: the run's own set as it was loaded (task choice, data
    folder, tokenizer, sizes), another set with its defaults; the run's split seed either way."""
    src = run.meta["data_source"]
    if src.get("builtin") and src.get("source") == name:
        return _own_data(run)
    return load_dataset(name, seed=src["seed"])


def evaluate(
    run_dir: str | Path | LoadedRun,
    data: str | Path | None = None,
    *,
    diagnostics: bool = False,
    device: str | torch.device | None = "auto",
) -> Any:
    """Per-task metrics of a run's best model by split: its own val/test splits, or ``data``.

    ``device`` is where the model runs (a :class:`LoadedRun` stays where it is).

    With ``diagnostics=True`` returns ``(metrics, diagnostics)`` where diagnostics holds the
    architecture's statistics (e.g. expert usage per task) gathered on each split.
    """
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir, device=device)
    metrics, diags = {}, {}
    for split, tensors in _labelled_data(run, data).items():
        run.model.reset_diagnostics()
        metrics[split] = evaluate_model(run.model, tensors.select_tasks([t.name for t in run.tasks]), run.tasks)
        diag = run.model.diagnostics()
        if diag:
            diags[split] = diag
    return (metrics, diags) if diagnostics else metrics


def predict(run_dir: str | Path, data: str | Path, *, device: str | torch.device | None = "auto") -> pd.DataFrame:
    """Per-task predictions for every row of ``data`` (a table file, or a built-in set's test split).

    Columns: binary ``T`` (positive-class probability) and ``T:label``; multiclass ``T:label`` and
    ``T:p[CLASS]``; multilabel ``T:p[LABEL]``; regression ``T`` in original units.
    """
    run = load_run(run_dir, device=device)
    name = str(data)
    if name in DATASETS:
        bundle = _builtin(run, name)
        split = bundle.test if bundle.test is not None else bundle.val
        x = split.x
    else:
        if run.encoder is None:
            raise ValueError(f"{name}: this run was trained on a built-in data set; pass its name instead of a file")
        x = run.encoder.transform_features(read_table(name))
    raw = predict_model(run.model, x)
    cols: dict[str, np.ndarray] = {}
    for t in run.tasks:
        p = t.decode(raw[t.name]).numpy()
        classes = list(t.classes) or [str(i) for i in range(max(t.out_dim, 2))]
        if t.kind is TaskKind.BINARY:
            cols[t.name] = p
            cols[f"{t.name}:label"] = np.where(p >= 0.5, classes[-1], classes[0])
        elif t.kind is TaskKind.MULTICLASS:
            cols[f"{t.name}:label"] = np.asarray(classes, dtype=object)[p.argmax(axis=1)]
            for j, c in enumerate(classes):
                cols[f"{t.name}:p[{c}]"] = p[:, j]
        elif t.kind is TaskKind.MULTILABEL:
            for j, c in enumerate(classes):
                cols[f"{t.name}:p[{c}]"] = p[:, j]
        else:
            cols[t.name] = p
    return pd.DataFrame(cols)


# ----------------------------------------------------------------------------- boosting runs
BOOSTED_FILE = "booster.json"


def _fit_boosted_run(
    bundle: DataBundle,
    model: str,
    params: dict[str, Any],
    balancer: str,
    config: TrainConfig,
    output: str | Path | None,
    resume: bool,
) -> FitResult:
    """Fit a boosting model on the training split; same run directory and results.json as a network."""
    if balancer != "equal":
        raise ValueError(f"--balancer {balancer} does not apply to boosting model '{model}' (it has no task losses)")
    if resume:
        raise ValueError(f"boosting model '{model}' is fitted in one go; there is nothing to resume")
    out = Path(output) if output is not None else None
    if out is not None and (out / "checkpoints" / BOOSTED_FILE).exists():
        raise FileExistsError(f"{out} already holds a run; choose another --output")
    t0 = time.perf_counter()
    booster = fit_boosted(model, bundle.tasks, bundle.input_spec, bundle.train, seed=config.seed, **params)
    seconds = time.perf_counter() - t0
    val = evaluate_model(booster, bundle.val, bundle.tasks)
    test = evaluate_model(booster, bundle.test, bundle.tasks) if bundle.test is not None else None
    source = bundle.meta.get("source", {"source": bundle.name, "builtin": False, "in_memory": True})
    meta = {
        "data_source": source,
        "model": {"name": model, "params": dict(params)},
        "balancer": {"name": "none", "params": {}},
        "encoder": bundle.encoder.to_dict() if bundle.encoder is not None else None,
        "seed": config.seed,
    }
    if out is not None:
        save_boosted(out / "checkpoints" / BOOSTED_FILE, booster, meta)
        doc = {"data": bundle.name, "tasks": [t.to_dict() for t in bundle.tasks], "fit_seconds": seconds}
        cfg = {**meta, "tasks": doc["tasks"]}
        cfg.pop("encoder")
        atomic_write_text(out / "config.json", json.dumps(cfg, indent=1))
        doc.update({"best_epoch": 0, "val": val, "test": test, **{k: v for k, v in meta.items() if k != "encoder"}})
        atomic_write_text(out / "results.json", json.dumps(doc, indent=1))
    return FitResult(0, val, test, [], seconds)
