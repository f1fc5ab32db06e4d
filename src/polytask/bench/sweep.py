"""Hyper-parameter sweeps: an Optuna study over a balancer's, an architecture's and the trainer's settings.

Optuna: Akiba, Sano, Yanase, Ohta & Koyama, "Optuna: A Next-generation Hyperparameter Optimization
Framework", KDD 2019; the sampler is TPE (Bergstra, Bardenet, Bengio & Kégl, "Algorithms for
Hyper-Parameter Optimization", NeurIPS 2011), seeded.

The objective is the validation selection score of the trainer (mean over tasks of each task's
primary metric at the best epoch), never a test metric. Trials live in an Optuna RDB storage:
``sqlite:///DIR/study.db`` by default, or any SQLAlchemy URL (``postgresql://user@host/db``, with
its driver, e.g. ``pip install "psycopg[binary]"``) so that many ``polytask sweep`` processes on
many machines share one study.
The budget ``trials`` counts every trial of the study, so a rerun with the same ``--study`` only
runs the missing ones. A space file::

    model:    {n_experts: {type: int, low: 2, high: 8}}
    balancer: {alpha: {type: float, low: 0.5, high: 3.0}}
    train:
      lr: {type: float, low: 1.0e-4, high: 1.0e-1, log: true}
      weight_decay: {type: categorical, choices: [0.0, 1.0e-4, 1.0e-2]}
      batch_size: 128                 # a plain value is fixed, not searched
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from polytask.bench._suite import SuiteError, _line, _Loader, _plain, canonical_json, model_registry

__all__ = ["SearchSpace", "SweepResult", "load_space", "open_storage", "sweep"]

_GROUPS = ("model", "balancer", "train")
_TYPES = ("float", "int", "categorical")


@dataclass
class SearchSpace:
    """``{group: {name: distribution spec or fixed value}}`` for the groups model, balancer, train."""

    params: dict[str, dict[str, Any]]

    def suggest(self, trial: Any) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {g: {} for g in _GROUPS}
        for group, entries in self.params.items():
            for name, spec in entries.items():
                key = f"{group}.{name}"
                if not isinstance(spec, dict):
                    out[group][name] = spec
                elif spec["type"] == "float":
                    out[group][name] = trial.suggest_float(key, spec["low"], spec["high"], log=spec.get("log", False))
                elif spec["type"] == "int":
                    out[group][name] = trial.suggest_int(key, spec["low"], spec["high"], log=spec.get("log", False))
                else:
                    out[group][name] = trial.suggest_categorical(key, spec["choices"])
        return out

    def fixed(self, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The settings of a finished trial (its ``params``) with the fixed values of the space."""
        out: dict[str, dict[str, Any]] = {g: {} for g in _GROUPS}
        for group, entries in self.params.items():
            for name, spec in entries.items():
                out[group][name] = params[f"{group}.{name}"] if isinstance(spec, dict) else spec
        return out


def load_space(path: str | Path, model: str, balancer: str) -> SearchSpace:
    """Read and validate a space file; problems raise a one-line error naming the line and key."""
    from polytask.balance import BALANCERS
    from polytask.train import TrainConfig

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"space file {path} does not exist")
    try:
        doc = yaml.load(p.read_text(encoding="utf-8"), Loader=_Loader)  # _Loader is a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise SuiteError(f"{p.name}{f' line {mark.line + 1}' if mark else ''}: not valid YAML") from None
    if not isinstance(doc, dict) or not doc:
        raise SuiteError(f"{p.name} line 1: a space file maps {', '.join(_GROUPS)} to their parameters")

    def fail(line: int, key: str, problem: str) -> SuiteError:
        return SuiteError(f"{p.name} line {line}: key '{key}': {problem}")

    registry = model_registry(model)
    valid = {
        "model": set(registry[model].defaults),
        "balancer": set(BALANCERS[balancer].defaults),
        "train": {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"},
    }
    params: dict[str, dict[str, Any]] = {}
    n_searched = 0
    for group, entries in doc.items():
        if group not in _GROUPS:
            raise fail(_line(doc, group), str(group), f"unknown group; valid: {', '.join(_GROUPS)}")
        if not isinstance(entries, dict):
            raise fail(_line(doc, group), group, "must map parameter names to distributions")
        params[group] = {}
        for name, spec in entries.items():
            key, line = f"{group}.{name}", _line(entries, name)
            if name not in valid[group]:
                who = {"model": f"model '{model}'", "balancer": f"balancer '{balancer}'", "train": "the trainer"}[group]
                raise fail(line, key, f"{who} has no parameter '{name}'; valid: {', '.join(sorted(valid[group]))}")
            if isinstance(spec, dict):
                kind = spec.get("type")
                if kind not in _TYPES:
                    raise fail(line, key, f"type must be one of {', '.join(_TYPES)}, got {kind!r}")
                if kind == "categorical":
                    if not isinstance(spec.get("choices"), list) or not spec["choices"]:
                        raise fail(line, key, "categorical needs a non-empty 'choices' list")
                else:
                    lo, hi = spec.get("low"), spec.get("high")
                    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
                        raise fail(line, key, f"{kind} needs numeric 'low' and 'high', got {lo!r}, {hi!r}")
                    if kind == "int" and not (isinstance(lo, int) and isinstance(hi, int)):
                        raise fail(line, key, f"int needs integer bounds, got {lo!r}, {hi!r}")
                    if not lo <= hi:
                        raise fail(line, key, f"low {lo} > high {hi}")
                    if spec.get("log") and lo <= 0:
                        raise fail(line, key, f"a log scale needs low > 0, got {lo}")
                extra = sorted(set(spec) - {"type", "low", "high", "log", "choices"})
                if extra:
                    raise fail(line, key, f"unknown field {extra}; valid: type, low, high, log, choices")
                n_searched += 1
            params[group][name] = _plain(spec)
    if not n_searched:
        raise SuiteError(f"{p.name}: nothing to search (give at least one parameter a 'type')")
    return SearchSpace(params)


def _safe_url(url: str) -> str:
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not even parseable: show it as given
        return url


def open_storage(url: str) -> Any:
    """An Optuna RDB storage with worker heartbeats (trials of a killed worker are marked failed)."""
    import optuna

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot open Optuna storage {_safe_url(url)}: {reason} (check the URL, that the database is reachable "
            "and that its driver is installed, e.g. psycopg[binary] for postgresql://)"
        ) from None


@dataclass
class SweepResult:
    study: str
    storage: str
    n_trials: int
    ran: int
    best_trial: int
    best_value: float
    best_params: dict[str, dict[str, Any]]
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]] | None
    run_dir: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sweep(
    data: str | Path,
    tasks: list[str] | None = None,
    *,
    model: str = "shared-bottom",
    balancer: str = "equal",
    space: SearchSpace | str | Path,
    trials: int,
    output: str | Path,
    storage: str | None = None,
    study: str | None = None,
    config: Any = None,
    model_params: dict[str, Any] | None = None,
    balancer_params: dict[str, Any] | None = None,
    data_options: dict[str, Any] | None = None,
    data_seed: int = 0,
    seed: int = 0,
    echo: Callable[[str], Any] | None = None,
    device: str = "auto",
) -> SweepResult:
    """Run the missing trials of a study (up to ``trials`` in all), then re-train the best trial.

    Trials train on ``device``, which is not part of the study's identity (workers on CPU and GPU
    machines may share one study)."""
    import optuna

    from polytask.evaluate import primary_score
    from polytask.train import NonFiniteLossError, TrainConfig, fit, load_data, resolve_device

    resolve_device(device)

    if trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    space = space if isinstance(space, SearchSpace) else load_space(space, model, balancer)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    name = study or f"{Path(str(data)).stem}-{model}-{balancer}"
    config = config or TrainConfig()
    base_train = {k: v for k, v in config.to_dict().items() if k != "seed"}
    identity = {
        "data": str(data),
        "tasks": list(tasks or []),
        "model": model,
        "balancer": balancer,
        "space": space.params,
        "model_params": dict(model_params or {}),
        "balancer_params": dict(balancer_params or {}),
    }
    # Load the data first: a bad data set or task fails before anything is created in the storage.
    bundle = load_data(data, tasks, seed=data_seed, **(data_options or {}))

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = open_storage(url)
    sampler = optuna.samplers.TPESampler(seed=seed)
    st = optuna.create_study(storage=rdb, study_name=name, direction="maximize", sampler=sampler, load_if_exists=True)
    saved = st.user_attrs.get("polytask")
    if saved is None:
        st.set_user_attr("polytask", json.loads(canonical_json(identity)))
    elif saved != json.loads(canonical_json(identity)):
        diff = sorted(k for k in identity if saved.get(k) != json.loads(canonical_json(identity))[k])
        raise ValueError(
            f"study '{name}' in {_safe_url(url)} was made for other settings (differs in {', '.join(diff)}); "
            "pass another --study NAME or the same settings"
        )

    def run(settings: dict[str, dict[str, Any]], run_dir: Path | None) -> Any:
        cfg = TrainConfig(**{**base_train, **settings["train"], "seed": config.seed})
        return fit(
            bundle,
            model=model,
            model_params={**(model_params or {}), **settings["model"]},
            balancer=balancer,
            balancer_params={**(balancer_params or {}), **settings["balancer"]},
            config=cfg,
            output=run_dir,
            progress=False,
            device=device,
        )

    def objective(trial: Any) -> float:
        res = run(space.suggest(trial), None)
        trial.set_user_attr("val", res.val)  # validation only: the test split is not looked at here
        trial.set_user_attr("seconds_per_epoch", res.seconds_per_epoch)
        score = primary_score(bundle.tasks, res.val)
        return score if math.isfinite(score) else float("nan")

    def report(s: Any, trial: Any) -> None:
        if echo is not None:
            value = "failed" if trial.value is None else f"val score {trial.value:.4f}"
            shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.params.items())
            echo(f"trial {trial.number}: {value} ({shown})")

    counted = [t for t in st.get_trials(deepcopy=False) if t.state != optuna.trial.TrialState.WAITING]
    remaining = max(0, trials - len(counted))
    if echo is not None:
        echo(f"study '{name}' in {_safe_url(url)}: {len(counted)} trial(s) stored, {remaining} to run")
    if remaining:
        st.optimize(
            objective,
            n_trials=remaining,
            catch=(NonFiniteLossError,),
            callbacks=[report, optuna.study.MaxTrialsCallback(trials, states=None)],
        )
    ran = len(st.get_trials(deepcopy=False)) - len(counted)
    complete = st.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not complete:
        raise ValueError(f"study '{name}' has no completed trial (all {len(st.trials)} failed); see the trial errors")
    best = st.best_trial
    settings = space.fixed(best.params)
    run_dir = out / f"best-trial-{best.number}"
    if run_dir.exists():
        shutil.rmtree(run_dir)  # always a fresh re-training of the best settings
    t0 = time.perf_counter()
    res = run(settings, run_dir)
    if echo is not None:
        echo(f"best trial {best.number} (val score {best.value:.4f}) re-trained in {time.perf_counter() - t0:.1f} s")
    result = SweepResult(
        name,
        _safe_url(url),
        len(st.get_trials(deepcopy=False)),
        ran,
        best.number,
        float(best.value),
        settings,
        res.val,
        res.test,
        str(run_dir),
    )
    from polytask.train._checkpoint import atomic_write_text

    atomic_write_text(out / "sweep.json", json.dumps(result.to_dict(), indent=1))
    return result
