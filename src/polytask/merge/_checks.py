"""Hyper-parameter checks shared by the merge methods: one-line errors naming the value and its range."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_fraction", "check_int", "check_lambda", "check_real", "check_weights"]


def _number(method: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"merge method '{method}': {key} must be a number, got {value!r}")
    return float(value)


def check_lambda(method: str, value: Any, key: str = "lam") -> None:
    """A scaling coefficient: finite and non-zero (negative values subtract task vectors)."""
    v = _number(method, key, value)
    if not math.isfinite(v) or v == 0:
        raise ValueError(f"merge method '{method}': {key}={value} is out of range; use a finite, non-zero number")


def check_fraction(method: str, value: Any, key: str = "density", *, zero_ok: bool = False) -> None:
    """A share of entries: in (0, 1] (or [0, 1) / [0, 1] when ``zero_ok``)."""
    v = _number(method, key, value)
    lo_ok = v >= 0 if zero_ok else v > 0
    if not (lo_ok and v <= 1):
        rng = "[0, 1]" if zero_ok else "(0, 1]"
        raise ValueError(f"merge method '{method}': {key}={value} is out of range {rng}")


def check_real(method: str, value: Any, key: str, *, lo: float = -math.inf, hi: float = math.inf) -> None:
    v = _number(method, key, value)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"merge method '{method}': {key}={value} is out of range [{lo}, {hi}]")


def check_int(method: str, value: Any, key: str, *, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"merge method '{method}': {key}={value!r} must be an integer in [{lo}, {hi}]")


def check_weights(method: str, weights: list[float] | None) -> None:
    """Per-model weights: finite, and not all zero."""
    if weights is None:
        return
    if not all(math.isfinite(w) for w in weights) or not any(weights):
        raise ValueError(f"merge method '{method}': weights {weights} must be finite and not all zero")
