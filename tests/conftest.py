"""Shared test setup: the read-only data mirror and a per-session cache directory."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

# CI sets POLYTASK_DATA; locally fall back to the shared mirror beside the repository.
_SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if not os.environ.get("POLYTASK_DATA") and _SHARED_DATA.is_dir():
    os.environ["POLYTASK_DATA"] = str(_SHARED_DATA)


@pytest.fixture(scope="session", autouse=True)
def _session_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Derived caches (npz) go to one temp dir per session: shared by the session's tests, never the user's."""
    path = tmp_path_factory.mktemp("polytask-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("POLYTASK_CACHE", str(path))
        yield path


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The data mirror; tests that need real files are skipped when it is absent."""
    env = os.environ.get("POLYTASK_DATA")
    if not env or not Path(env).is_dir():
        pytest.skip("no data directory (set POLYTASK_DATA to the data mirror)")
    return Path(env)
