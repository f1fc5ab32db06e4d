"""Benchmark suites: a YAML grid of data sets x architectures x balancers x seeds, expanded reproducibly.

A suite file::

    name: multimnist                 # default: the file's stem
    kind: train                      # default; ``kind: merge`` is a merge suite (polytask.bench._merge_suite)
    datasets:                        # built-in names or table files (relative to the suite file)
      - name: multi-mnist
        params: {n_train: 5000}      # the loader's options (``load_table`` options for files)
        tasks: [left, right]         # optional; NAME:KIND specs for files
        split_seed: 0                # optional
    models: [shared-bottom, {name: mmoe, params: {n_experts: 3}}]
    model_params: {}                 # optional, given to every model that accepts the key
    balancers: [equal, upgrad]       # default [equal]
    seeds: [0, 1]                    # default [0]
    train: {epochs: 3, lr: 0.01}     # TrainConfig fields (not ``seed``)
    metrics: [accuracy]              # optional: metrics of Δm / Δp / rank (default: each task's primary)
    extra:                           # optional explicit rows beyond the grid
      - {dataset: multi-mnist, model: cgc, balancer: famo, seeds: [0]}

Boosting models (``polytask.boost``) run once per seed with ``equal`` (they have no task losses).
Every data set gets a single-task baseline row (``single`` with ``equal``, the common ``model_params``)
per seed unless the suite lists ``single`` itself; ``single`` is never crossed with other balancers.
A run's config hash is the sha256 of the canonical JSON (sorted keys, no spaces) of what the suite
states for it (data set, model, balancer, training settings; not the seed and not code defaults,
so that a new default in the trainer does not orphan stored runs).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "BASELINE_MODEL",
    "RunSpec",
    "Suite",
    "SuiteError",
    "canonical_json",
    "config_hash",
    "load_suite",
    "model_registry",
    "parse_suite",
    "shipped_suites",
]

BASELINE_MODEL = "single"
BASELINE_BALANCER = "equal"
_TOP_KEYS = ("name", "datasets", "models", "model_params", "balancers", "seeds", "train", "metrics", "extra")
_DATA_KEYS = ("name", "label", "params", "tasks", "split_seed")
_METHOD_KEYS = ("name", "label", "params")
_EXTRA_KEYS = ("dataset", "model", "balancer", "seeds")


class SuiteError(ValueError):
    """A suite file is malformed; the message names the file, the line and the key."""


def canonical_json(obj: Any) -> str:
    """The one JSON text of ``obj`` that hashes the same in every process (sorted keys, no spaces)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def config_hash(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class RunSpec:
    """One training run of the grid."""

    dataset: str  # labels, as shown in the leaderboard
    model: str
    balancer: str
    seed: int
    config: dict[str, Any]  # {"data", "model", "balancer", "train"}: what the hash covers
    baseline: bool = False
    data_path: str | None = None  # a table file resolved against the suite's folder (not hashed)

    @property
    def config_hash(self) -> str:
        return config_hash(self.config)

    @property
    def run_id(self) -> str:
        return f"{self.config_hash[:16]}-s{self.seed}"


@dataclass
class Suite:
    name: str
    datasets: dict[str, dict[str, Any]]  # label -> {"name", "params", "tasks", "split_seed"}
    runs: list[RunSpec]
    train: dict[str, Any]
    metrics: Any = None
    source: str = "<suite>"
    data_paths: dict[str, str] = field(default_factory=dict)

    def protocol(self) -> dict[str, Any]:
        """What must not change between two benches in one folder (new rows may be added)."""
        return {"train": self.train, "datasets": self.datasets, "metrics": self.metrics}


# ----------------------------------------------------------------------------- YAML with line numbers
class _Map(dict):  # type: ignore[type-arg]
    line: int = 0
    lines: dict[Any, int]


class _Seq(list):  # type: ignore[type-arg]
    line: int = 0
    lines: list[int]


class _Loader(yaml.SafeLoader):
    pass


def _construct_map(loader: _Loader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    out.line, out.lines = node.start_mark.line + 1, {}
    for k_node, v_node in node.value:
        key = loader.construct_object(k_node, deep=True)
        if key in out:
            raise yaml.constructor.ConstructorError(None, None, f"key '{key}' appears twice", k_node.start_mark)
        out[key] = loader.construct_object(v_node, deep=True)
        out.lines[key] = k_node.start_mark.line + 1
    return out


def _construct_seq(loader: _Loader, node: yaml.SequenceNode) -> _Seq:
    out = _Seq(loader.construct_object(v, deep=True) for v in node.value)
    out.line, out.lines = node.start_mark.line + 1, [v.start_mark.line + 1 for v in node.value]
    return out


_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_map)
_Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_seq)


def _plain(obj: Any) -> Any:
    """Plain dicts and lists (for hashing and JSON)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


# ----------------------------------------------------------------------------- parsing
class _Ctx:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, line: int, key: str, problem: str) -> SuiteError:
        return SuiteError(f"{self.source} line {line}: key '{key}': {problem}")


def _line(container: Any, key: Any, default: int = 1) -> int:
    lines = getattr(container, "lines", None)
    if isinstance(lines, dict):
        return lines.get(key, getattr(container, "line", default))
    if isinstance(lines, list) and isinstance(key, int) and key < len(lines):
        return lines[key]
    return getattr(container, "line", default)


def _as_list(ctx: _Ctx, doc: _Map, key: str, default: list[Any] | None = None) -> _Seq:
    if key not in doc:
        if default is None:
            raise ctx.fail(doc.line or 1, key, "missing (required)")
        seq = _Seq(default)
        seq.line, seq.lines = doc.line, [doc.line] * len(default)
        return seq
    value = doc[key]
    if isinstance(value, str | int | dict):
        value = _Seq([value])
        value.line, value.lines = _line(doc, key), [_line(doc, key)]
    if not isinstance(value, list) or not value:
        raise ctx.fail(_line(doc, key), key, "needs a non-empty list")
    return value


def _named_entry(ctx: _Ctx, item: Any, key: str, line: int, fields: Sequence[str], what: str = "a name") -> _Map:
    """A list entry given as ``name`` or as a mapping with ``name`` and some of ``fields``, as a mapping."""
    if isinstance(item, str):
        item = _Map(name=item)
        item.line, item.lines = line, {"name": line}
    if not isinstance(item, dict) or "name" not in item:
        raise ctx.fail(line, key, f"each entry is {what} or a mapping with 'name', got {_plain(item)!r}")
    unknown = sorted(set(item) - set(fields))
    if unknown:
        raise ctx.fail(_line(item, unknown[0], line), key, f"unknown field {unknown}; valid: {', '.join(fields)}")
    return item


def _method(ctx: _Ctx, item: Any, key: str, line: int) -> tuple[str, str | None, dict[str, Any]]:
    """``name`` or ``{name, label?, params?}`` -> (name, label, params)."""
    item = _named_entry(ctx, item, key, line, _METHOD_KEYS)
    params = item.get("params") or {}
    if not isinstance(params, dict):
        raise ctx.fail(_line(item, "params", line), key, "'params' must be a mapping")
    return str(item["name"]), item.get("label"), _plain(params)


def _label(name: str, params: Mapping[str, Any]) -> str:
    if not params:
        return name
    return name + "(" + ",".join(f"{k}={_plain(v)}" for k, v in sorted(params.items())) + ")"


def _check_registry(ctx: _Ctx, registry: Any, name: str, params: dict[str, Any], key: str, line: int) -> None:
    try:
        registry.resolve(name, params)
    except KeyError as e:
        raise ctx.fail(line, key, e.args[0]) from None
    except ValueError as e:
        raise ctx.fail(line, key, str(e)) from None


def _parse_datasets(ctx: _Ctx, doc: _Map, base_dir: Path) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    from polytask.data import DATASETS

    out: dict[str, dict[str, Any]] = {}
    paths: dict[str, str] = {}
    seq = _as_list(ctx, doc, "datasets")
    for i, item in enumerate(seq):
        line = _line(seq, i)
        item = _named_entry(ctx, item, "datasets", line, _DATA_KEYS)
        name = str(item["name"])
        if name not in DATASETS:
            path = (base_dir / name).resolve()
            if not path.is_file():
                valid = ", ".join(sorted(DATASETS))
                raise ctx.fail(
                    line,
                    "datasets",
                    f"unknown data set '{name}' (no built-in set and no file {path}); built-in: {valid}",
                )
            if not item.get("tasks"):
                raise ctx.fail(line, "datasets", f"table file '{name}' needs 'tasks' (NAME:KIND specs)")
            paths[str(item.get("label") or name)] = str(path)
        params = item.get("params") or {}
        tasks = item.get("tasks") or []
        if not isinstance(params, dict):
            raise ctx.fail(_line(item, "params", line), "datasets", "'params' must be a mapping")
        if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
            raise ctx.fail(_line(item, "tasks", line), "datasets", "'tasks' must be a list of names or NAME:KIND specs")
        split_seed = item.get("split_seed", 0)
        if not isinstance(split_seed, int) or isinstance(split_seed, bool):
            raise ctx.fail(
                _line(item, "split_seed", line), "datasets", f"'split_seed' must be an integer: {split_seed}"
            )
        label = str(item.get("label") or name)
        if label in out:
            raise ctx.fail(line, "datasets", f"data set label '{label}' appears twice; give one entry a 'label'")
        out[label] = {"name": name, "params": _plain(params), "tasks": list(tasks), "split_seed": split_seed}
    return out, paths


def _parse_train(ctx: _Ctx, doc: _Map) -> dict[str, Any]:
    from polytask.train import TrainConfig

    train = doc.get("train") or {}
    if not isinstance(train, dict):
        raise ctx.fail(_line(doc, "train"), "train", "must be a mapping of training settings")
    fields = [f.name for f in dataclasses.fields(TrainConfig) if f.name != "seed"]
    for key in train:
        if key not in fields:
            raise ctx.fail(_line(train, key), f"train.{key}", f"unknown training setting; valid: {', '.join(fields)}")
    try:
        TrainConfig(**_plain(train))
    except (TypeError, ValueError) as e:
        raise ctx.fail(_line(doc, "train"), "train", str(e)) from None
    return _plain(train)


def _parse_seeds(ctx: _Ctx, container: Any, key: str, where: str, default: list[int]) -> list[int]:
    seeds = _as_list(ctx, container, key, default)
    for i, s in enumerate(seeds):
        if not isinstance(s, int) or isinstance(s, bool):
            raise ctx.fail(_line(seeds, i), where, f"seeds are integers, got {s!r}")
    if len(set(seeds)) != len(seeds):
        raise ctx.fail(seeds.line, where, f"seed listed twice in {list(seeds)}")
    return list(seeds)


def _parse_metrics(ctx: _Ctx, doc: _Map) -> Any:
    from polytask.tasks import METRIC_HIGHER_IS_BETTER

    metrics = doc.get("metrics")
    if metrics is None:
        return None
    names = metrics if isinstance(metrics, list) else [m for ms in dict(metrics).values() for m in ms]
    for m in names:
        if m not in METRIC_HIGHER_IS_BETTER:
            raise ctx.fail(
                _line(doc, "metrics"), "metrics", f"unknown metric '{m}'; valid: {', '.join(METRIC_HIGHER_IS_BETTER)}"
            )
    return _plain(metrics)


def model_registry(name: str) -> Any:
    """Networks (trained by the trainer) or boosting models (fitted in one go, never with a balancer)."""
    from polytask.boost import BOOSTERS
    from polytask.nn import MODELS

    return BOOSTERS if name in BOOSTERS else MODELS


def parse_suite(text: str, source: str = "<suite>", base_dir: Path | None = None) -> Suite:
    """Parse and validate a suite; any problem raises :class:`SuiteError` naming the line and key."""
    from polytask.balance import BALANCERS
    from polytask.boost import BOOSTERS
    from polytask.nn import MODELS

    ctx = _Ctx(source)
    base_dir = base_dir or Path.cwd()
    try:
        doc = yaml.load(text, Loader=_Loader)  # _Loader is a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise SuiteError(f"{source}{where}: not valid YAML: {problem}") from None
    if not isinstance(doc, dict):
        raise SuiteError(f"{source} line 1: a suite is a mapping with 'datasets' and 'models'")
    kind = doc.get("kind", "train")
    if kind == "merge":
        from polytask.bench._merge_suite import parse_merge_suite

        return parse_merge_suite(doc, ctx, base_dir, source)
    if kind != "train":
        raise ctx.fail(_line(doc, "kind"), "kind", f"unknown suite kind {kind!r}; valid: train, merge")
    for key in doc:
        if key == "kind":
            continue
        if key not in _TOP_KEYS:
            raise ctx.fail(_line(doc, key), str(key), f"unknown key; valid: {', '.join(_TOP_KEYS)}")
    datasets, paths = _parse_datasets(ctx, doc, base_dir)
    train = _parse_train(ctx, doc)
    seeds = _parse_seeds(ctx, doc, "seeds", "seeds", [0])
    metrics = _parse_metrics(ctx, doc)

    raw_common = doc.get("model_params") or {}
    if not isinstance(raw_common, dict):
        raise ctx.fail(_line(doc, "model_params"), "model_params", "must be a mapping")
    common = _plain(raw_common)

    def model_entry(item: Any, key: str, line: int) -> tuple[str, dict[str, Any]]:
        name, label, params = _method(ctx, item, key, line)
        registry = model_registry(name)
        if name not in registry:
            names = ", ".join(sorted([*MODELS, *BOOSTERS]))
            raise ctx.fail(line, key, f"unknown model '{name}'; available: {names}")
        accepted = registry[name].defaults
        full = {**{k: v for k, v in common.items() if k in accepted}, **params}
        _check_registry(ctx, registry, name, full, key, line)
        return str(label or _label(name, params)), {"name": name, "params": full}

    def balancer_entry(item: Any, key: str, line: int) -> tuple[str, dict[str, Any]]:
        name, label, params = _method(ctx, item, key, line)
        _check_registry(ctx, BALANCERS, name, params, key, line)
        return str(label or _label(name, params)), {"name": name, "params": params}

    models_seq = _as_list(ctx, doc, "models")
    models = [model_entry(m, "models", _line(models_seq, i)) for i, m in enumerate(models_seq)]
    for k in common:
        if not any(k in model_registry(m["name"])[m["name"]].defaults for _, m in models):
            raise ctx.fail(_line(raw_common, k), f"model_params.{k}", "no listed model accepts this parameter")
    bal_seq = _as_list(ctx, doc, "balancers", ["equal"])
    balancers = [balancer_entry(b, "balancers", _line(bal_seq, i)) for i, b in enumerate(bal_seq)]
    for what, entries, seq in (("models", models, models_seq), ("balancers", balancers, bal_seq)):
        labels = [lab for lab, _ in entries]
        for i, lab in enumerate(labels):
            if lab in labels[:i]:
                raise ctx.fail(_line(seq, i), what, f"'{lab}' is listed twice")

    runs: list[RunSpec] = []
    seen: set[str] = set()

    def add(
        ds: str, m_label: str, model: dict[str, Any], b_label: str, bal: dict[str, Any], run_seeds: list[int]
    ) -> None:
        base = model["name"] == BASELINE_MODEL
        cfg = {"data": datasets[ds], "model": model, "balancer": bal, "train": train}
        for seed in run_seeds:
            spec = RunSpec(ds, m_label, b_label, seed, cfg, base, paths.get(ds))
            if spec.run_id not in seen:
                seen.add(spec.run_id)
                runs.append(spec)

    listed_single = [(lab, m) for lab, m in models if m["name"] == BASELINE_MODEL]
    eq_label, eq_bal = BASELINE_BALANCER, {"name": BASELINE_BALANCER, "params": {}}
    for ds in datasets:
        if listed_single:
            for lab, m in listed_single:
                add(ds, lab, m, eq_label, eq_bal, seeds)
        else:
            auto = {k: v for k, v in common.items() if k in MODELS[BASELINE_MODEL].defaults}
            add(ds, BASELINE_MODEL, {"name": BASELINE_MODEL, "params": auto}, eq_label, eq_bal, seeds)
        for m_label, model in models:
            if model["name"] == BASELINE_MODEL:
                continue
            if model["name"] in BOOSTERS:  # trees have no task losses to balance
                add(ds, m_label, model, eq_label, eq_bal, seeds)
                continue
            for b_label, bal in balancers:
                add(ds, m_label, model, b_label, bal, seeds)

    extra = doc.get("extra") or []
    if not isinstance(extra, list):
        raise ctx.fail(_line(doc, "extra"), "extra", "must be a list of rows {dataset, model, balancer, seeds}")
    for i, row in enumerate(extra):
        line = _line(extra, i)
        if not isinstance(row, dict) or "model" not in row:
            raise ctx.fail(line, "extra", "each row is a mapping with 'model' (and dataset, balancer, seeds)")
        unknown = sorted(set(row) - set(_EXTRA_KEYS))
        if unknown:
            raise ctx.fail(_line(row, unknown[0], line), "extra", f"unknown field {unknown}; valid: {_EXTRA_KEYS}")
        ds_names = [row["dataset"]] if "dataset" in row else list(datasets)
        for ds in ds_names:
            if ds not in datasets:
                raise ctx.fail(
                    _line(row, "dataset", line), "extra", f"data set '{ds}' is not in 'datasets': {list(datasets)}"
                )
        m_label, model = model_entry(row["model"], "extra", _line(row, "model", line))
        b_label, bal = balancer_entry(row.get("balancer", "equal"), "extra", _line(row, "balancer", line))
        row_seeds = _parse_seeds(ctx, row, "seeds", "extra", seeds)
        for ds in ds_names:
            add(ds, m_label, model, b_label, bal, row_seeds)
    name = str(doc.get("name") or Path(source).stem)
    return Suite(name, datasets, runs, train, metrics, source, paths)


def shipped_suites() -> dict[str, Path]:
    """The suites installed with the package: ``{name: path}``."""
    folder = resources.files("polytask.bench") / "suites"
    return {Path(str(p)).stem: Path(str(p)) for p in folder.iterdir() if str(p).endswith(".yaml")}


def load_suite(path: str | Path) -> Suite:
    """A suite file, or the name of a shipped suite (``multimnist``, ``census-group1``, ...)."""
    p = Path(path)
    if not p.is_file():
        shipped = shipped_suites()
        if str(path) in shipped:
            p = shipped[str(path)]
        else:
            names = ", ".join(sorted(shipped))
            raise FileNotFoundError(f"suite file {path} does not exist; shipped suites: {names}")
    return parse_suite(p.read_text(encoding="utf-8"), source=p.name, base_dir=p.resolve().parent)
