"""Merge suites: a pool x merge methods (with parameter grids) x seeds, in the bench's SQLite store.

A merge suite file::

    kind: merge
    name: merge-multimnist             # default: the file's stem
    pool:                              # one pool or a list of them
      name: multimnist-lenet           # a pool builder (polytask.bench.POOLS) ...
      params: {seed: 0}
      # path: my-pool/                 # ... or a pool folder with pool.json (relative to the suite file)
      label: mnist                     # optional, as shown in the leaderboard
    methods:
      - task-arithmetic                # the registry's defaults
      - {name: ties, params: {density: 0.2}, grid: {lam: [0.5, 1.0]}}   # one run per grid point
      - {name: dare, grid: {density: [0.3, 0.7]}}
      - regmean                        # data-driven: receives `data`
    seeds: [0, 1, 2]                   # for methods with randomness (a `seed` parameter) or data
    data: {examples: 64, batch_size: 16}   # data-driven methods: validation rows per task (never test)
    pretrained: true                   # also score the pretrained model with the fine-tuned heads
    metrics: [accuracy]                # optional: metrics of Δm / Δp / rank / normalised score

Every pool gets a reference row ``individual`` (each task scored by its own fine-tuned model; the
baseline of Δm, Δp and the normalised score) and, unless ``pretrained: false``, a row ``pretrained``.
Methods without randomness (no ``seed`` parameter, no data) run once, with the first seed; the
others once per seed, the seed going to the method's ``seed`` parameter (unless the suite fixes it)
and to the draw of its data rows. A run's config hash covers the pool, the method and its full
parameters, and the data settings of data-driven methods.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

from polytask.bench._suite import (
    RunSpec,
    Suite,
    _as_list,
    _Ctx,
    _label,
    _line,
    _Map,
    _named_entry,
    _parse_metrics,
    _parse_seeds,
    _plain,
)

__all__ = ["MERGE_KIND", "UNSUPPORTED_METHODS", "parse_merge_suite"]

MERGE_KIND = "merge"
_TOP_KEYS = ("kind", "name", "pool", "methods", "seeds", "data", "pretrained", "metrics")
_POOL_KEYS = ("name", "label", "params", "path")
_METHOD_KEYS = ("name", "label", "params", "grid")
_DATA_KEYS = ("examples", "batch_size")
_DATA_DEFAULTS = {"examples": 64, "batch_size": 16}
# These return several models (MAP's Pareto set) or a router with its experts (Twin-Merging), not one
# set of weights that the pool's evaluation can score.
UNSUPPORTED_METHODS = {"map": "returns a Pareto set of models", "twin-merging": "returns a routed model"}


def _parse_pools(ctx: _Ctx, doc: _Map, base_dir: Path) -> dict[str, dict[str, Any]]:
    from polytask.bench._pool import POOLS

    out: dict[str, dict[str, Any]] = {}
    seq = _as_list(ctx, doc, "pool")
    for i, item in enumerate(seq):
        line = _line(seq, i)
        if isinstance(item, str):
            item = _Map(name=item)
            item.line, item.lines = line, {"name": line}
        if not isinstance(item, dict) or not ("name" in item or "path" in item):
            raise ctx.fail(
                line, "pool", f"each pool is a builder name or a mapping with 'name' or 'path', got {item!r}"
            )
        unknown = sorted(set(item) - set(_POOL_KEYS))
        if unknown:
            raise ctx.fail(
                _line(item, unknown[0], line), "pool", f"unknown field {unknown}; valid: {', '.join(_POOL_KEYS)}"
            )
        params = item.get("params") or {}
        if not isinstance(params, dict):
            raise ctx.fail(_line(item, "params", line), "pool", "'params' must be a mapping")
        if "path" in item:
            if "name" in item or params:
                raise ctx.fail(line, "pool", "give either 'path' (a pool folder) or 'name' with 'params', not both")
            path = (base_dir / str(item["path"])).expanduser().resolve()
            if not (path / "pool.json").is_file():
                raise ctx.fail(_line(item, "path", line), "pool", f"{path} is not a pool folder (no pool.json)")
            cfg: dict[str, Any] = {"path": str(path)}
            label = str(item.get("label") or path.name)
        else:
            name = str(item["name"])
            try:
                POOLS.resolve(name, params)
            except KeyError as e:
                raise ctx.fail(_line(item, "name", line), "pool", e.args[0]) from None
            except ValueError as e:
                raise ctx.fail(_line(item, "params", line), "pool", str(e)) from None
            params = _plain(params)
            if name == "finetune" and isinstance(params.get("dataset"), str):
                ds = base_dir / params["dataset"]
                if ds.is_file():  # a table file next to the suite
                    params["dataset"] = str(ds.resolve())
            cfg = {"name": name, "params": params}
            default = (
                f"finetune({Path(str(params.get('dataset'))).stem})" if name == "finetune" else _label(name, params)
            )
            label = str(item.get("label") or default)
        if label in out:
            raise ctx.fail(line, "pool", f"pool label '{label}' appears twice; give one entry a 'label'")
        out[label] = cfg
    return out


def _parse_data(ctx: _Ctx, doc: _Map) -> dict[str, int]:
    data = doc.get("data") or {}
    if not isinstance(data, dict):
        raise ctx.fail(_line(doc, "data"), "data", "must be a mapping {examples, batch_size}")
    for key, value in data.items():
        if key not in _DATA_KEYS:
            raise ctx.fail(_line(data, key), f"data.{key}", f"unknown setting; valid: {', '.join(_DATA_KEYS)}")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ctx.fail(_line(data, key), f"data.{key}", f"must be a positive integer, got {value!r}")
    return {**_DATA_DEFAULTS, **_plain(data)}


def _method_runs(ctx: _Ctx, item: Any, line: int) -> list[tuple[str, str, dict[str, Any]]]:
    """One ``(label, name, params)`` per grid point of a ``methods:`` entry."""
    from polytask.merge import MERGE_METHODS

    item = _named_entry(ctx, item, "methods", line, _METHOD_KEYS, "a merge method name")
    name = str(item["name"])
    if name not in MERGE_METHODS:
        raise ctx.fail(line, "methods", f"unknown merge method '{name}'; available: {', '.join(sorted(MERGE_METHODS))}")
    if name in UNSUPPORTED_METHODS:
        raise ctx.fail(line, "methods", f"merge method '{name}' {UNSUPPORTED_METHODS[name]}; suites score one model")
    params, grid = item.get("params") or {}, item.get("grid") or {}
    for key in ("params", "grid"):
        if not isinstance(item.get(key) or {}, dict):
            raise ctx.fail(_line(item, key, line), "methods", f"'{key}' must be a mapping")
    valid = MERGE_METHODS[name].defaults
    for container, where in ((params, "params"), (grid, "grid")):
        for k in container:
            if k not in valid:
                raise ctx.fail(
                    _line(container, k, line),
                    f"methods.{where}.{k}",
                    f"'{name}' has no parameter '{k}'; valid: {', '.join(sorted(valid)) or '(none)'}",
                )
    for k, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ctx.fail(_line(grid, k, line), f"methods.grid.{k}", "needs a non-empty list of values")
        if k in params:
            raise ctx.fail(_line(grid, k, line), f"methods.grid.{k}", "is also in 'params'; keep one")
    keys = sorted(grid)
    out = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        point = {**_plain(params), **dict(zip(keys, _plain(list(combo)), strict=True))}
        if item.get("label"):
            label = str(item["label"]) + ("" if not keys else _label("", dict(zip(keys, combo, strict=True))))
        else:
            label = _label(name, point)
        out.append((label, name, point))
    return out


def parse_merge_suite(doc: _Map, ctx: _Ctx, base_dir: Path, source: str) -> Suite:
    """A merge suite (``kind: merge``) from its parsed YAML; errors name the line and key."""
    from polytask.merge import DATA_DRIVEN, MERGE_METHODS

    for key in doc:
        if key not in _TOP_KEYS:
            raise ctx.fail(_line(doc, key), str(key), f"unknown key of a merge suite; valid: {', '.join(_TOP_KEYS)}")
    pools = _parse_pools(ctx, doc, base_dir)
    seeds = _parse_seeds(ctx, doc, "seeds", "seeds", [0])
    data = _parse_data(ctx, doc)
    metrics = _parse_metrics(ctx, doc)
    pretrained = doc.get("pretrained", True)
    if not isinstance(pretrained, bool):
        raise ctx.fail(_line(doc, "pretrained"), "pretrained", f"must be true or false, got {pretrained!r}")
    seq = _as_list(ctx, doc, "methods")
    entries: list[tuple[str, str, dict[str, Any]]] = []
    for i, item in enumerate(seq):
        for label, name, params in _method_runs(ctx, item, _line(seq, i)):
            if label in {lab for lab, _, _ in entries} or label in ("individual", "pretrained"):
                raise ctx.fail(_line(seq, i), "methods", f"'{label}' is listed twice (or is a reserved row name)")
            entries.append((label, name, params))

    runs: list[RunSpec] = []
    for pool_label, pool in pools.items():
        common = {"kind": MERGE_KIND, "pool": pool}
        runs.append(RunSpec(pool_label, "individual", "individual", seeds[0], {**common, "role": "individual"}, True))
        if pretrained:
            runs.append(RunSpec(pool_label, "pretrained", "pretrained", seeds[0], {**common, "role": "pretrained"}))
        for label, name, params in entries:
            driven = name in DATA_DRIVEN
            seeded = "seed" in MERGE_METHODS[name].defaults and "seed" not in params
            cfg: dict[str, Any] = {**common, "role": "merge", "method": {"name": name, "params": params}}
            if driven:
                cfg["data"] = data
            for seed in seeds if (driven or seeded) else seeds[:1]:
                runs.append(RunSpec(pool_label, label, "merge", seed, cfg))
    name = str(doc.get("name") or Path(source).stem)
    return Suite(name, pools, runs, {"kind": MERGE_KIND}, metrics, source)
