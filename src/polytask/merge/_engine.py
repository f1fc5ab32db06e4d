"""The streaming merge engine: align the models, check them, then merge one tensor at a time.

Every tensor name, shape and dtype is checked across the base and all fine-tuned models before any
work (one-line errors name the tensor and the file). Then, for each tensor in name order, the
engine reads it from every model (memory-mapped), upcasts to float32 (float64 stays float64),
calls the method's per-tensor function and hands the result, cast to the output dtype, to a sink:
the streaming safetensors writer for files, a dict for the in-memory API. Both paths run the same
code, so they give the same numbers bit for bit. Non-float tensors (integer buffers such as
``position_ids``) are copied from the base model.

Methods that need whole-model statistics (a global top-k threshold, per-task quantiles) declare a
``statistics`` hook that streams over the tensors first; the models are still never all in memory.
"""

from __future__ import annotations

import math
import os
import re
import sys
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polytask.merge._io import ModelSource, OutputWriter, open_model, parse_dtype
from polytask.merge._registry import DATA_DRIVEN, HOOKS, MERGE_METHODS

__all__ = [
    "ModelLike",
    "TensorContext",
    "layer_index",
    "merge_checkpoints",
    "merge_state_dicts",
]

ModelLike = str | os.PathLike[str] | Mapping[str, torch.Tensor]
StateDict = dict[str, torch.Tensor]

_LAYER = re.compile(r"(?:^|\.)(\d+)(?=\.|$)")


def layer_index(name: str) -> int | None:
    """Depth of a parameter from its name: the first dotted component that is an integer.

    ``encoder.layer.3.attention.self.query.weight`` -> 3, ``model.layers.10.mlp.up_proj.weight`` -> 10,
    ``transformer.h.2.attn.c_attn.weight`` -> 2; ``embeddings.word_embeddings.weight`` -> None.
    """
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass
class TensorContext:
    """What a per-tensor merge function may know besides the tensors themselves."""

    name: str
    index: int  # position in the (sorted) list of float tensors
    layer: int | None  # see layer_index
    n_layers: int  # 1 + the largest layer index over all tensor names (0 when none has one)
    stats: Any = None  # result of the method's statistics hook
    extra: dict[str, Any] = field(default_factory=dict)

    def generator(self, seed: int, model: int) -> torch.Generator:
        """A generator that depends only on (seed, tensor name, model index): the same draws in any order."""
        key = zlib.crc32(f"{self.name}\x00{model}".encode())
        return torch.Generator().manual_seed((int(seed) * 1_000_003 + key) % (2**63))


@dataclass(frozen=True)
class _Plan:
    names: list[str]  # every tensor, sorted
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]
    n_layers: int

    def contexts(self) -> Iterator[TensorContext]:
        i = 0
        for name in self.names:
            if self.dtypes[name].is_floating_point:
                yield TensorContext(name, i, layer_index(name), self.n_layers)
                i += 1


def _align(base: ModelSource, models: Sequence[ModelSource]) -> _Plan:
    names = sorted(base.names())
    if not names:
        raise ValueError(f"base model {base.label} has no tensors")
    want = set(names)
    meta = {n: base.meta(n) for n in names}
    for src in models:
        have = set(src.names())
        missing = sorted(want - have)
        if missing:
            raise ValueError(
                f"model {src.label} lacks tensor '{missing[0]}' of the base model {base.label}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ": the models do not share one architecture"
            )
        extra = sorted(have - want)
        if extra:
            raise ValueError(
                f"model {src.label} has tensor '{extra[0]}' that the base model {base.label} lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + ": the models do not share one architecture"
            )
        for n in names:
            shape, dtype = src.meta(n)
            if shape != meta[n][0]:
                raise ValueError(
                    f"tensor '{n}' has shape {tuple(shape)} in {src.label} but {tuple(meta[n][0])} in the base model "
                    f"{base.label}: the models do not share one architecture"
                )
            if dtype != meta[n][1]:
                raise ValueError(
                    f"tensor '{n}' is {str(dtype).removeprefix('torch.')} in {src.label} but "
                    f"{str(meta[n][1]).removeprefix('torch.')} in the base model {base.label}; "
                    "convert the models to one dtype first"
                )
    layers = [layer_index(n) for n in names]
    n_layers = 1 + max((i for i in layers if i is not None), default=-1)
    return _Plan(names, {n: m[0] for n, m in meta.items()}, {n: m[1] for n, m in meta.items()}, n_layers)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _load(src: ModelSource, name: str, dtype: torch.dtype) -> torch.Tensor:
    t = src.get(name).detach()
    if t.device.type != "cpu":
        t = t.cpu()
    return t.to(dtype)


def _stream(
    plan: _Plan, base: ModelSource, models: Sequence[ModelSource], stats: Any = None
) -> Iterator[tuple[TensorContext, torch.Tensor, list[torch.Tensor]]]:
    for ctx in plan.contexts():
        ctx.stats = stats
        cd = _compute_dtype(plan.dtypes[ctx.name])
        yield ctx, _load(base, ctx.name, cd), [_load(m, ctx.name, cd) for m in models]


def _progress(total: int, enabled: bool | None) -> Any:
    """A rich progress bar over tensors, shown only when stderr is a terminal (or when forced)."""
    if enabled is False or (enabled is None and not sys.stderr.isatty()):
        return None
    from rich.console import Console
    from rich.progress import Progress

    bar = Progress(transient=True, console=Console(stderr=True))
    bar.start()
    bar.add_task("merging", total=total)
    return bar


def _prepare(method: str, params: Mapping[str, Any], n_models: int) -> tuple[Callable[..., Any], dict[str, Any]]:
    fn, full = MERGE_METHODS.resolve(method, params)
    if n_models < 1:
        raise ValueError(f"merge method '{method}' needs at least one fine-tuned model")
    weights = full.get("weights")
    if weights is not None:
        weights = [float(w) for w in weights]
        if len(weights) != n_models:
            raise ValueError(f"merge method '{method}': weights has {len(weights)} values for {n_models} models")
        full["weights"] = weights
    hooks = HOOKS.get(method)
    if hooks is not None and hooks.check is not None:
        hooks.check(full, n_models)
    return fn, full


def _run_data_free(
    method: str,
    fn: Callable[..., Any],
    params: dict[str, Any],
    plan: _Plan,
    base: ModelSource,
    models: Sequence[ModelSource],
    out_dtype: torch.dtype | None,
    sink: Callable[[str, torch.Tensor], None],
    progress: bool | None,
) -> None:
    hooks = HOOKS.get(method)
    stats = None
    if hooks is not None and hooks.statistics is not None:
        numel = sum(math.prod(plan.shapes[c.name]) for c in plan.contexts())
        names = [c.name for c in plan.contexts()]
        stats = hooks.statistics(
            lambda: _stream(plan, base, models), n_models=len(models), numel=numel, names=names, **params
        )
    contexts = {c.name: c for c in plan.contexts()}
    bar = _progress(len(plan.names), progress)
    try:
        for name in plan.names:
            ctx = contexts.get(name)
            if ctx is None:  # integer / bool buffer: the base model's copy
                sink(name, base.get(name).detach().cpu().clone())
            else:
                ctx.stats = stats
                cd = _compute_dtype(plan.dtypes[name])
                merged = fn(_load(base, name, cd), [_load(m, name, cd) for m in models], ctx=ctx, **params)
                if not isinstance(merged, torch.Tensor) or tuple(merged.shape) != plan.shapes[name]:
                    raise RuntimeError(f"merge method '{method}' returned a wrong result for tensor '{name}'")
                sink(name, merged.to(out_dtype or plan.dtypes[name]).contiguous())
            if bar is not None:
                bar.advance(bar.task_ids[0])
    finally:
        if bar is not None:
            bar.stop()


def _entries(plan: _Plan, out_dtype: torch.dtype | None) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    return [
        (n, plan.shapes[n], (out_dtype or plan.dtypes[n]) if plan.dtypes[n].is_floating_point else plan.dtypes[n])
        for n in plan.names
    ]


def _open_all(base: ModelLike, models: Sequence[ModelLike]) -> tuple[ModelSource, list[ModelSource]]:
    if isinstance(models, Mapping | str | os.PathLike):
        raise ValueError("models must be a list of models (files, folders or state dicts)")
    srcs = [open_model(base, "base state dict")]
    for i, m in enumerate(models):
        srcs.append(open_model(m, f"state dict #{i + 1}"))
    return srcs[0], srcs[1:]


def _materialise(src: ModelSource, names: Sequence[str]) -> StateDict:
    return {n: src.get(n).detach().clone() for n in names}


def merge_state_dicts(
    method: str,
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    *,
    data: Any = None,
    dtype: str | torch.dtype | None = None,
    **params: Any,
) -> Any:
    """Merge in-memory state dicts with a registered method; returns the merged state dict.

    Data-free methods run through the same per-tensor path as files (identical numbers). A
    data-driven method (``method in DATA_DRIVEN``) is called as ``fn(base, models, data=data, **params)``
    after the same name/shape/dtype checks, and its result is returned as it is.
    """
    out_dtype = parse_dtype(dtype)
    fn, full = _prepare(method, params, len(models))
    base_src, model_srcs = _open_all(base, models)
    plan = _align(base_src, model_srcs)
    if method in DATA_DRIVEN:
        if data is None:
            raise ValueError(f"merge method '{method}' is data-driven: pass data= (a MergeData with the tasks' data)")
        return fn(dict(base), [dict(m) for m in models], data=data, **full)
    if data is not None:
        raise ValueError(f"merge method '{method}' is data-free and takes no data")
    out: StateDict = {}
    _run_data_free(method, fn, full, plan, base_src, model_srcs, out_dtype, out.__setitem__, False)
    return out


def merge_checkpoints(
    method: str,
    base: ModelLike,
    models: Sequence[ModelLike],
    output: str | os.PathLike[str],
    *,
    dtype: str | torch.dtype | None = None,
    overwrite: bool = False,
    data: Any = None,
    progress: bool | None = None,
    **params: Any,
) -> Path:
    """Merge models given as safetensors files, Hugging Face folders or state dicts into ``output``.

    ``output`` ending in ``.safetensors`` is one file; anything else is a folder with
    ``model.safetensors`` and the base (or first) model folder's config/tokenizer files. The output is
    written to a temp file and renamed into place; an existing output is refused unless ``overwrite``.
    """
    out_dtype = parse_dtype(dtype)
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"output {output} already exists; pass overwrite=True (--overwrite) to replace it")
    fn, full = _prepare(method, params, len(models))
    base_src, model_srcs = _open_all(base, models)
    try:
        plan = _align(base_src, model_srcs)
        folder = base_src.folder or next((m.folder for m in model_srcs if m.folder is not None), None)
        meta = {"polytask_merge_method": method}
        if method in DATA_DRIVEN:
            if data is None:
                raise ValueError(f"merge method '{method}' is data-driven: its config needs a 'data:' section")
            result = fn(
                _materialise(base_src, plan.names),
                [_materialise(m, plan.names) for m in model_srcs],
                data=data,
                **full,
            )
            return _write_result(result, output, plan, out_dtype, overwrite, folder, meta)
        if data is not None:
            raise ValueError(f"merge method '{method}' is data-free and takes no data")
        with OutputWriter(output, _entries(plan, out_dtype), overwrite=overwrite, copy_from=folder, metadata=meta) as w:
            _run_data_free(method, fn, full, plan, base_src, model_srcs, out_dtype, w.write, progress)
            return w.commit()
    finally:
        base_src.close()
        for m in model_srcs:
            m.close()


def _write_result(
    result: Any,
    output: Path,
    plan: _Plan,
    out_dtype: torch.dtype | None,
    overwrite: bool,
    folder: Path | None,
    meta: dict[str, str],
) -> Path:
    """Write a data-driven method's state dict; a list of (preference, state dict) becomes several files."""
    if isinstance(result, Mapping):
        return _write_state_dict(result, output, plan, out_dtype, overwrite, folder, meta)
    import json
    import shutil
    import tempfile

    if output.suffix == ".safetensors":
        raise ValueError(f"this method returns several models; output {output} must be a folder, not a file")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent))
    try:
        prefs = []
        for i, (pref, sd) in enumerate(result):
            _write_state_dict(sd, tmp / f"model-{i}", plan, out_dtype, False, folder, meta)
            # MAP's preferences are {task: weight}; other methods may give a plain vector.
            shown = (
                {str(k): float(v) for k, v in pref.items()} if isinstance(pref, Mapping) else [float(p) for p in pref]
            )
            prefs.append({"model": f"model-{i}", "preference": shown})
        (tmp / "preferences.json").write_text(json.dumps(prefs, indent=1) + "\n")
        if output.exists():
            shutil.rmtree(output) if output.is_dir() else output.unlink()
        os.replace(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _write_state_dict(
    sd: Mapping[str, torch.Tensor],
    output: Path,
    plan: _Plan,
    out_dtype: torch.dtype | None,
    overwrite: bool,
    folder: Path | None,
    meta: dict[str, str],
) -> Path:
    """Write a data-driven result under its own names (it may add tensors, e.g. Twin-Merging's modules)."""
    missing = [n for n in plan.names if n not in sd]
    if missing:
        raise RuntimeError(f"merged state dict lacks tensor '{missing[0]}'")
    tensors = {}
    for n in sorted(sd):
        t = sd[n].detach().cpu()
        tensors[n] = (t.to(out_dtype) if out_dtype is not None and t.is_floating_point() else t).contiguous()
    entries = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    with OutputWriter(output, entries, overwrite=overwrite, copy_from=folder, metadata=meta) as w:
        for n, t in tensors.items():
            w.write(n, t)
        return w.commit()
