"""Where data lives, and proof that it is the data we think it is.

Real data sets are read from a data directory (``POLYTASK_DATA``) that the package never writes to;
derived, rebuildable artefacts (parsed arrays, built image sets) go to a separate cache directory
(``POLYTASK_CACHE``). Every known file is checked against its sha256 before use, so a truncated or
edited file fails loudly instead of silently shifting benchmark numbers. Hashing a large file costs
seconds, so a successful check is remembered in-process for as long as the file's size and
modification time stay the same.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import platformdirs

__all__ = [
    "KNOWN_SHA256",
    "DataIntegrityError",
    "cache_dir",
    "data_dir",
    "resolve",
    "sha256_file",
    "verify_file",
]

DATA_ENV = "POLYTASK_DATA"
CACHE_ENV = "POLYTASK_CACHE"

# sha256 of every file of the data mirror (copied from its SHA256SUMS), by path relative to the data dir.
KNOWN_SHA256: dict[str, str] = {
    "census-income/census-income.test.gz": "5ac4cacd3ca9f1ecb10de1a0a41e4ac68fdc419e3fec190f5c0c6cc03b2ea659",
    "mtl-regression/abalone/abalone_data.csv": "45f02fb7454a0cf6399c7568137ed197fca6219d6025290871b6065de575c33a",
    "mtl-regression/abalone/abalone_target.csv": "262ba46a478b45701fb4b55d8e9b1c79d899b675544781435db17bdeddc153bb",
    "mtl-regression/computer/computer_data.csv": "8c9e5c8e1742a09aaea8f645a062b99a3a0d2c302357fc43cdc3ec0f6d3063de",
    "mtl-regression/computer/computer_target.csv": "4b75124bf3771212385ae89e0e59bee013b1a0096ef945d9460c7b6cc49a4f91",
    "mtl-regression/landmine/landmine_data.csv": "368182c609770b4fcfce56cbfaeaeceb9edf3f6677faa8ecc2a7d8dd90dc100d",
    "mtl-regression/landmine/landmine_target.csv": "d838bf310056c957afd35cb7f04f7211d5e3aaed58198ff6fd59a5a0207bdf10",
    "mtl-regression/school/school_data.csv": "17674aba326f25963684b7309f363da00733cc1ceef84f6af61d365dccaf2cfb",
    "mtl-regression/school/school_target.csv": "94fb1e5d3a477c4d0c2da1a212bb7e6f9da7f6f617d21c67297634e05c9899cd",
}


class DataIntegrityError(ValueError):
    """A data file's content differs from the published one (wrong sha256)."""


def data_dir() -> Path:
    """The read-only data directory: ``$POLYTASK_DATA``, else ``<user cache dir>/polytask/data``."""
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("polytask")) / "data"


def cache_dir() -> Path:
    """The directory for derived caches (created on demand): ``$POLYTASK_CACHE``, else the user cache dir."""
    env = os.environ.get(CACHE_ENV)
    path = Path(env).expanduser() if env else Path(platformdirs.user_cache_dir("polytask"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes, read in chunks (files may be larger than memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


# resolved path -> (size, mtime_ns, sha256) of files that passed verification in this process.
_VERIFIED: dict[str, tuple[int, int, str]] = {}


def verify_file(path: str | os.PathLike[str], expected_sha256: str) -> Path:
    """Check ``path`` against ``expected_sha256``; return the path or raise :class:`DataIntegrityError`."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    expected = expected_sha256.lower()
    st = p.stat()
    key = str(p.resolve())
    if _VERIFIED.get(key) == (st.st_size, st.st_mtime_ns, expected):
        return p
    actual = sha256_file(p)
    if actual != expected:
        raise DataIntegrityError(
            f"{p}: sha256 mismatch (expected {expected}, got {actual}); "
            "the file is corrupt or was modified: re-download or restore the original file"
        )
    _VERIFIED[key] = (st.st_size, st.st_mtime_ns, expected)
    return p


def resolve(relpath: str, sha256: str | None = None, root: str | os.PathLike[str] | None = None) -> Path:
    """Find ``relpath`` under the data directory (or ``root``) and verify it.

    ``sha256`` defaults to the known hash of ``relpath`` (:data:`KNOWN_SHA256`); a file with neither
    is returned unverified.
    """
    base = Path(root).expanduser() if root is not None else data_dir()
    path = base / relpath
    if not path.is_file():
        raise FileNotFoundError(
            f"data file not found: {path}; set {DATA_ENV} to the folder that holds '{relpath}' (now {base})"
        )
    expected = sha256 if sha256 is not None else KNOWN_SHA256.get(relpath)
    if expected is not None:
        verify_file(path, expected)
    return path
