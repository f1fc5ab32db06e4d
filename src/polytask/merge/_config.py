"""``polytask merge CONFIG.yaml``: the config file and the Python function that mirrors it.

```yaml
method: ties                    # see `polytask merge --list`
base: models/pretrained         # safetensors file or Hugging Face folder
models:
  - models/ft-sst2              # a path ...
  - path: models/ft-qnli        # ... or a mapping with per-model parameters
    weight: 0.5
params: {lam: 1.0, density: 0.2}
output: merged/                 # a folder (Hugging Face layout) or a .safetensors file
dtype: bfloat16                 # optional: float32 | bfloat16 | float16 | float64 | auto (default)
data: {...}                     # data-driven methods only (see polytask.merge._data)
```
Relative paths are relative to the config file's folder. Every error names the key at fault.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from polytask.merge._engine import merge_checkpoints
from polytask.merge._io import parse_dtype
from polytask.merge._registry import DATA_DRIVEN, MERGE_METHODS

__all__ = ["load_merge_config", "merge"]

_KEYS = ("method", "base", "models", "params", "output", "dtype", "data")
_PER_MODEL = ("path", "weight")


def _err(where: str, key: str, msg: str) -> ValueError:
    return ValueError(f"merge config {where}: '{key}' {msg}")


def _path(value: Any, where: str, key: str, root: Path) -> Path:
    if not isinstance(value, str | os.PathLike) or not str(value):
        raise _err(where, key, f"must be a path, got {value!r}")
    p = Path(value).expanduser()
    return p if p.is_absolute() else root / p


def _existing(value: Any, where: str, key: str, root: Path) -> Path:
    p = _path(value, where, key, root)
    if not p.exists():
        raise FileNotFoundError(f"merge config {where}: '{key}': {p} does not exist")
    return p


def load_merge_config(config: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Read and check a merge config; returns the keyword arguments of :func:`merge_checkpoints`."""
    if isinstance(config, Mapping):
        doc, where, root = dict(config), "(mapping)", Path.cwd()
    else:
        path = Path(config)
        where, root = str(path), path.resolve().parent
        try:
            doc = yaml.safe_load(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"merge config {path} does not exist") from None
        except IsADirectoryError:
            raise ValueError(f"merge config {path} is a folder; give the YAML file") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}" if mark is not None else ""
            raise ValueError(f"merge config {path} is not valid YAML{at}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"merge config {where} must be a mapping with method, base, models and output")
    unknown = sorted(set(doc) - set(_KEYS))
    if unknown:
        raise _err(where, unknown[0], f"is not a merge config key; valid: {', '.join(_KEYS)}")
    for key in ("method", "base", "models", "output"):
        if key not in doc:
            raise _err(where, key, "is missing")
    method = doc["method"]
    if not isinstance(method, str) or method not in MERGE_METHODS:
        raise _err(where, "method", f"'{method}' is not a merge method; available: {', '.join(sorted(MERGE_METHODS))}")
    params = doc.get("params") or {}
    if not isinstance(params, dict):
        raise _err(where, "params", "must be a mapping of method parameters")
    defaults = MERGE_METHODS[method].defaults
    for k in params:
        if k not in defaults:
            valid = ", ".join(sorted(defaults)) or "(none)"
            raise _err(where, f"params.{k}", f"is not a parameter of '{method}'; valid: {valid}")
    if not isinstance(doc["models"], list) or not doc["models"]:
        raise _err(where, "models", "must be a non-empty list of model paths")
    models: list[Path] = []
    weights: list[float] = []
    for i, m in enumerate(doc["models"]):
        key = f"models[{i}]"
        if isinstance(m, dict):
            bad = sorted(set(m) - set(_PER_MODEL))
            if bad:
                raise _err(where, f"{key}.{bad[0]}", f"is not a per-model key; valid: {', '.join(_PER_MODEL)}")
            if "path" not in m:
                raise _err(where, f"{key}.path", "is missing")
            models.append(_existing(m["path"], where, f"{key}.path", root))
            if "weight" in m:
                w = m["weight"]
                if isinstance(w, bool) or not isinstance(w, int | float):
                    raise _err(where, f"{key}.weight", f"must be a number, got {w!r}")
                weights.append(float(w))
        else:
            models.append(_existing(m, where, key, root))
    if weights:
        if len(weights) != len(models):
            raise _err(where, "models", "give a weight for every model or for none")
        if "weights" not in defaults:
            raise _err(where, "models[0].weight", f"is not accepted by '{method}' (it takes no per-model weights)")
        if params.get("weights") is not None:
            raise _err(where, "params.weights", "and per-model weights are both given; keep one")
        params = {**params, "weights": weights}
    out: dict[str, Any] = {
        "method": method,
        "base": _existing(doc["base"], where, "base", root),
        "models": models,
        "output": _path(doc["output"], where, "output", root),
        "params": params,
    }
    try:
        out["dtype"] = parse_dtype(doc.get("dtype"))
    except ValueError as e:
        raise _err(where, "dtype", str(e)) from None
    data_spec = doc.get("data")
    if data_spec is not None and method not in DATA_DRIVEN:
        raise _err(where, "data", f"is only for data-driven methods; '{method}' is data-free")
    if method in DATA_DRIVEN:
        if not isinstance(data_spec, dict):
            raise _err(where, "data", f"must be a mapping: '{method}' is data-driven and needs task data")
        out["data"] = _load_data(data_spec, root, where)
    return out


def _load_data(spec: dict[str, Any], root: Path, where: str) -> Any:
    try:
        from polytask.merge._data import merge_data_from_config
    except ImportError:
        raise _err(where, "data", "cannot be read: this installation has no data-driven merging") from None
    return merge_data_from_config(spec, root)


def merge(
    config: str | os.PathLike[str] | Mapping[str, Any], *, overwrite: bool = False, progress: bool | None = None
) -> Path:
    """Run a merge config (a YAML path or the same mapping); returns the output path."""
    kw = load_merge_config(config)
    return merge_checkpoints(
        kw["method"],
        kw["base"],
        kw["models"],
        kw["output"],
        dtype=kw["dtype"],
        overwrite=overwrite,
        data=kw.get("data"),
        progress=progress,
        **kw["params"],
    )
