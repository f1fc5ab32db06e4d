"""Named, cited registries: a decorator turns a class or function into a method with its paper.

Architectures, balancers (and later merge methods) share this one mechanism, so that every
catalogue lists its entries the same way and unknown names or hyper-parameters get the same
one-line errors. This module imports nothing of the package.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["Entry", "Registry"]

T = TypeVar("T")


@dataclass(frozen=True)
class Entry(Generic[T]):
    """One registered method: what to call, the paper it implements, and its accepted defaults."""

    name: str
    cls: T
    paper: str
    description: str
    defaults: dict[str, Any]


class Registry(Mapping[str, Entry[T]], Generic[T]):
    """A read-only mapping ``name -> Entry`` filled by :meth:`register`."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[T]] = {}

    def __getitem__(self, name: str) -> Entry[T]:
        if name not in self._entries:
            raise KeyError(f"unknown {self.kind} '{name}'; available: {', '.join(sorted(self._entries))}")
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def register(self, name: str, paper: str, description: str, **defaults: Any) -> Callable[[T], T]:
        """Decorator: make ``obj`` available as ``name``; ``defaults`` are the only accepted parameters."""

        def deco(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = Entry(name, obj, paper, description, dict(defaults))
            return obj

        return deco

    def resolve(self, name: str, params: Mapping[str, Any]) -> tuple[T, dict[str, Any]]:
        """The registered object and the full keyword arguments (defaults overridden by ``params``)."""
        entry = self[name]
        unknown = sorted(set(params) - set(entry.defaults))
        if unknown:
            valid = ", ".join(sorted(entry.defaults)) or "(none)"
            raise ValueError(f"{self.kind} '{name}' has no parameter {unknown}; valid: {valid}")
        return entry.cls, {**entry.defaults, **params}
