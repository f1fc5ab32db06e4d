"""The merge-method registry.

Every merge method is a typed function registered with its name, paper and defaults
(``@register_merge(...)``). ``data_driven`` says whether it needs task data (a
:class:`polytask.merge.MergeData`); data-free methods never receive any.

A data-free method is a per-tensor function ``fn(base, models, *, ctx, **params) -> Tensor``: it
gets one aligned tensor of the base model and of every fine-tuned model (float32, or float64 when
the inputs are float64) plus a :class:`polytask.merge.TensorContext`, and returns the merged
tensor. Two optional hooks travel with it:

- ``check(params, n_models)`` validates hyper-parameter values before any tensor is read;
- ``statistics(stream, n_models=..., numel=..., **params)`` computes whole-model statistics by streaming
  passes (``stream()`` yields ``(ctx, base, models)`` per tensor, as often as needed); the result
  reaches every per-tensor call as ``ctx.stats``.

A data-driven method is called once as ``fn(base, models, data=data, **params)`` on whole state dicts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from polytask._registry import Entry, Registry

__all__ = ["DATA_DRIVEN", "HOOKS", "MERGE_METHODS", "MergeEntry", "MergeHooks", "register_merge"]

MergeEntry = Entry[Callable[..., Any]]
MERGE_METHODS: Registry[Callable[..., Any]] = Registry("merge method")
DATA_DRIVEN: set[str] = set()


@dataclass(frozen=True)
class MergeHooks:
    """Optional companions of a data-free method: parameter checks and whole-model statistics."""

    check: Callable[[dict[str, Any], int], None] | None = None
    statistics: Callable[..., Any] | None = None


HOOKS: dict[str, MergeHooks] = {}


def register_merge(
    name: str,
    paper: str,
    description: str,
    *,
    data_driven: bool = False,
    check: Callable[[dict[str, Any], int], None] | None = None,
    statistics: Callable[..., Any] | None = None,
    **defaults: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: make a merge method available by ``name`` with its paper and defaults."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        MERGE_METHODS.register(name, paper, description, **defaults)(fn)
        if data_driven:
            DATA_DRIVEN.add(name)
        HOOKS[name] = MergeHooks(check, statistics)
        return fn

    return deco
