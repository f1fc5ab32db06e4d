"""The merge-method registry.

Every merge method is a typed function registered with its name, paper and defaults
(``@register_merge(...)``). ``data_driven`` says whether it needs task data (a
:class:`polytask.merge.MergeData`); data-free methods never receive any.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from polytask._registry import Entry, Registry

__all__ = ["DATA_DRIVEN", "MERGE_METHODS", "MergeEntry", "register_merge"]

MergeEntry = Entry[Callable[..., Any]]
MERGE_METHODS: Registry[Callable[..., Any]] = Registry("merge method")
DATA_DRIVEN: set[str] = set()


def register_merge(
    name: str, paper: str, description: str, *, data_driven: bool = False, **defaults: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Function decorator: make a merge method available by ``name`` with its paper and defaults."""

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        MERGE_METHODS.register(name, paper, description, **defaults)(fn)
        if data_driven:
            DATA_DRIVEN.add(name)
        return fn

    return deco
