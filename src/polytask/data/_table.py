"""Multi-task tables: files -> typed, encoded tensors with per-task label masks.

A :class:`TableEncoder` is fitted on the training split only (medians, means, vocabularies, class
lists, label scales), so validation and test rows never leak into preprocessing. It serialises to
plain JSON for checkpoints: ``predict`` on a new file must encode it exactly as training did, and
nothing is ever unpickled.

Two layouts are supported:

* multi-label: each row may carry a label for every target column (missing cells -> mask False);
* task-column: a ``task`` column says which task a row belongs to and one target column holds its
  label; one task is created per distinct task value (``f"{target}@{value}"``).
"""

from __future__ import annotations

import contextlib
import csv
import difflib
import gzip
import io
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from polytask.data._bundle import DataBundle
from polytask.data._tensors import InputSpec, TaskTensors
from polytask.tasks import Task, TaskKind, parse_task_spec

__all__ = [
    "ColumnError",
    "TableEncoder",
    "TaskSpecLike",
    "load_table",
    "load_task_column_pair",
    "read_table",
    "split_indices",
]

# "name", "name:kind", "name:multiclass(N)", (name,), (name, kind), (name, kind, n_classes) or a Task.
TaskSpecLike = str | tuple[Any, ...] | Task

SUPPORTED_SUFFIXES = (".csv", ".csv.gz", ".tsv", ".tsv.gz", ".parquet")

# Kind inference: more distinct integer values than this -> regression; text -> ask the user.
MAX_INFERRED_CLASSES = 50
_POSITIVE_NAMES = ("1", "true", "yes")
_ENCODER_FORMAT = "polytask.TableEncoder"
_ENCODER_VERSION = 1


class ColumnError(KeyError):
    """A column is unknown or missing. ``str()`` is the plain message (KeyError would quote it)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


# ----------------------------------------------------------------------------- reading files
def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for s in sorted(SUPPORTED_SUFFIXES, key=len, reverse=True):
        if name.endswith(s):
            return s
    return None


def _check_unique_columns(names: Sequence[Any], where: str) -> None:
    seen: set[str] = set()
    dups: list[str] = []
    for n in names:
        key = str(n)
        if key in seen and key not in dups:
            dups.append(key)
        seen.add(key)
    if dups:
        raise ValueError(f"{where}: duplicate column name(s) {_fmt_names(dups)}; rename them so every column is unique")


def read_table(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a .csv/.tsv (optionally .gz) or .parquet file; duplicate column names are an error.

    pandas silently renames duplicate CSV headers (``a``, ``a.1``), which would hide a broken file,
    so the header is checked before parsing.
    """
    p = Path(path)
    suffix = _suffix(p)
    if suffix is None:
        raise ValueError(f"{p}: unsupported file type; supported: {', '.join(SUPPORTED_SUFFIXES)}")
    if not p.is_file():
        raise FileNotFoundError(f"table file not found: {p}")
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        _check_unique_columns(pq.read_schema(p).names, str(p))
        return pd.read_parquet(p)
    sep = "\t" if suffix.startswith(".tsv") else ","
    raw = gzip.open(p, "rb") if suffix.endswith(".gz") else open(p, "rb")
    with raw, io.TextIOWrapper(raw, encoding="utf-8-sig", newline="") as f:
        header = next(csv.reader([f.readline()], delimiter=sep), [])
    if not header:
        raise ValueError(f"{p}: the file is empty (no header row)")
    _check_unique_columns(header, str(p))
    try:
        return pd.read_csv(p, sep=sep, encoding="utf-8-sig", low_memory=False)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{p}: cannot parse the file: {first}") from None


def load_task_column_pair(
    data_csv: str | os.PathLike[str], target_csv: str | os.PathLike[str], task_column: str
) -> pd.DataFrame:
    """Join a features+task-column file with a one-column target file row by row (mtl-regression layout).

    Returns the features frame with the target column appended; use the target's column name as
    the task spec and ``task_column`` as :class:`TableEncoder`'s ``task_column``.
    """
    data = read_table(data_csv)
    target = read_table(target_csv)
    if target.shape[1] != 1:
        raise ValueError(f"{target_csv}: a target file must have exactly one column, got {_fmt_names(target.columns)}")
    if len(target) != len(data):
        raise ValueError(
            f"{data_csv} has {len(data)} rows but {target_csv} has {len(target)}; they must match row by row"
        )
    if task_column not in data.columns:
        raise _unknown_column("task column", task_column, data.columns, str(data_csv))
    name = target.columns[0]
    if name in data.columns:
        raise ValueError(f"target column '{name}' of {target_csv} also exists in {data_csv}; rename one of them")
    out = data.copy()
    out[name] = target[name].to_numpy()
    return out


# ----------------------------------------------------------------------------- small helpers
def _fmt_names(names: Iterable[Any], limit: int = 20) -> str:
    names = [str(n) for n in names]
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f", ... (+{len(names) - limit} more)" if len(names) > limit else "")


def _unknown_column(what: str, name: str, available: Iterable[Any], where: str = "the data") -> ColumnError:
    cols = [str(c) for c in available]
    close = difflib.get_close_matches(str(name), cols, n=3, cutoff=0.6)
    hint = f" (did you mean {_fmt_names(close)}?)" if close else ""
    return ColumnError(f"unknown {what} '{name}' in {where}{hint}; available columns: {_fmt_names(cols)}")


def _natural_key(s: str) -> tuple[int, float, str]:
    """Numbers first, in numeric order (so '2' < '10'), then text in alphabetical order."""
    try:
        v = float(s)
    except ValueError:
        return (1, 0.0, s)
    return (0, v, s) if np.isfinite(v) else (1, 0.0, s)


def _canon_value(v: Any) -> str | None:
    """Canonical string of one cell, or None when the cell is missing (NaN, None, blank text)."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, (bool, np.bool_)):
        return "True" if v else "False"
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    if isinstance(v, (float, np.floating)):
        f = float(v)
        if not np.isfinite(f):
            return None
        return str(int(f)) if f.is_integer() and abs(f) < 2**53 else repr(f)
    s = str(v)
    return s if s.strip() else None


def _factorize(series: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Codes into canonical string values (-1 = missing) and those values.

    Categories and class labels are compared as canonical strings, so that a column keeps matching
    its training vocabulary when its pandas dtype changes between files (an int column that gains
    a NaN becomes float: 3 -> 3.0 still reads '3'). Only the distinct values go through Python.
    """
    codes, uniques = pd.factorize(series, use_na_sentinel=True)
    values: dict[str, int] = {}
    remap = np.full(len(uniques) + 1, -1, dtype=np.int64)  # last slot: pandas' -1 (missing)
    for i, u in enumerate(uniques):
        c = _canon_value(u)
        if c is not None:
            remap[i] = values.setdefault(c, len(values))
    return remap[codes], list(values)


MISSING_CLASS_LABEL = "-1"


def _label_codes(series: pd.Series) -> tuple[np.ndarray, list[str]]:
    """:func:`_factorize` for class labels, where ``-1`` also marks a missing label (the convention
    of multi-task data sets with partial labels)."""
    codes, values = _factorize(series)
    if MISSING_CLASS_LABEL in values:
        i = values.index(MISSING_CLASS_LABEL)
        codes = np.where(codes == i, -1, codes - (codes > i))
        values = values[:i] + values[i + 1 :]
    return codes, values


def _lookup(codes: np.ndarray, values: list[str], vocab: Sequence[str]) -> np.ndarray:
    """Index of each coded value in ``vocab`` (-1 for missing or not in ``vocab``)."""
    lut = np.append(pd.Index(list(vocab), dtype=object).get_indexer(pd.Index(values, dtype=object)), -1)
    return lut[codes].astype(np.int64)


def _to_float(series: pd.Series, column: str, role: str) -> np.ndarray:
    """Float64 values with NaN for missing; text in the column is an error naming the first bad cell."""
    if pd.api.types.is_bool_dtype(series.dtype) or pd.api.types.is_numeric_dtype(series.dtype):
        vals = series.to_numpy(dtype=np.float64, na_value=np.nan)
    else:
        conv = pd.to_numeric(series, errors="coerce")
        blank = series.isna() | (series.astype(str).str.strip() == "")
        bad = (conv.isna() & ~blank).to_numpy()
        if bad.any():
            pos = int(np.argmax(bad))
            raise ValueError(
                f"{role} '{column}' must be numeric but holds text '{series.iloc[pos]}' at row {series.index[pos]} "
                "(0-based, header not counted); fix the value or declare the column categorical"
            )
        vals = conv.to_numpy(dtype=np.float64, na_value=np.nan)
    return np.where(np.isfinite(vals), vals, np.nan)


def _normalise_spec(spec: TaskSpecLike) -> tuple[str, TaskKind | None, int]:
    if isinstance(spec, Task):
        return spec.name, spec.kind, spec.n_classes
    if isinstance(spec, str):
        return parse_task_spec(spec)
    if isinstance(spec, (tuple, list)) and 1 <= len(spec) <= 3:
        name = str(spec[0])
        kind = spec[1] if len(spec) > 1 else None
        n = int(spec[2]) if len(spec) > 2 and spec[2] is not None else 0
        if kind is not None and not isinstance(kind, TaskKind):
            try:
                kind = TaskKind(str(kind).lower())
            except ValueError:
                valid = ", ".join(k.value for k in TaskKind)
                raise ValueError(f"task '{name}': unknown kind '{kind}'; valid kinds: {valid}") from None
        return name, kind, n
    raise TypeError(f"task spec must be 'name:kind', (name, kind[, n_classes]) or a Task, got {spec!r}")


def _is_listlike(v: Any) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


def _split_labels(v: Any) -> list[str] | None:
    """Labels of one multilabel cell (a list, or text separated by '|'); None when missing."""
    if _is_listlike(v):
        return [str(x) for x in v]
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return None
    s = str(v).strip()
    if not s:
        return None
    return [p.strip() for p in s.split("|") if p.strip()]


def _ints_below(values: Iterable[str], n: int) -> bool:
    try:
        return all(float(v) == int(float(v)) and 0 <= int(float(v)) < n for v in values)
    except ValueError:
        return False


# ----------------------------------------------------------------------------- splitting
def split_indices(
    n: int,
    val_fraction: float,
    test_fraction: float,
    seed: int = 0,
    groups: Sequence[Any] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random train/val/test row indices (each sorted).

    With ``groups`` (a task column) the split is stratified per group, and every group keeps at
    least one training row, so no task is unseen at training time.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(
            f"val_fraction={val_fraction} and test_fraction={test_fraction} must be in [0, 1) and sum to less than 1"
        )
    perm = np.random.default_rng(seed).permutation(n)
    if groups is None:
        parts = [perm]
    else:
        codes = pd.factorize(pd.Series(np.asarray(groups, dtype=object)[perm]), sort=True)[0]
        order = np.argsort(codes, kind="stable")
        bounds = np.cumsum(np.bincount(codes[order]))[:-1] if len(codes) else []
        parts = np.split(perm[order], bounds)
    train, val, test = [], [], []
    for part in parts:
        m = len(part)
        n_val = round(m * val_fraction)
        n_test = round(m * test_fraction)
        if groups is not None:
            while m - n_val - n_test < 1 and (n_val or n_test):
                if n_test >= n_val and n_test:
                    n_test -= 1
                else:
                    n_val -= 1
        val.append(part[:n_val])
        test.append(part[n_val : n_val + n_test])
        train.append(part[n_val + n_test :])
    tr, va, te = (np.sort(np.concatenate(p)).astype(np.int64) for p in (train, val, test))
    return tr, va, te


# ----------------------------------------------------------------------------- encoder
class TableEncoder:
    """Typed encoding of a multi-task table, fitted on the training split only.

    Args:
        tasks: target specs: ``"name:kind"`` strings, ``(name, kind, n_classes)`` tuples (kind may be
            None to infer it) or :class:`~polytask.tasks.Task` objects. With ``task_column``: exactly one.
        numeric, categorical: force these columns' types (others: numeric dtypes -> numeric; text,
            bool and category dtypes -> categorical).
        drop: columns to ignore (ids, leaky columns).
        task_column: task-column layout; this column names the task of each row.
        max_categories: keep at most this many most frequent categories per column (others -> unknown id 0).
        positive: positive class per binary target (default: '1'/'true'/'yes' if present, else the
            class that sorts last).
        numeric_bins: if >= 2, each numeric column also gets a categorical column of its training
            quantile bin (this many quantiles; duplicate edges merged), for non-monotone effects.
        numeric_levels: if >= 1, each numeric column also gets a categorical column of its *exact*
            value, for values that occur at least this often in the training split (rarer, unseen and
            missing values -> id 0). For columns whose particular values carry meaning beyond their
            size (ages, weeks worked, specific amounts such as a tax bracket's capital gains).

    Kind inference (when a spec has no kind): 2 distinct values -> binary; numbers with fractions or
    more than 50 distinct values -> regression; up to 50 distinct values -> multiclass; list cells ->
    multilabel; otherwise an error asks for the kind.

    Encoding: numeric -> median imputation, then ``(x - mean) / std`` with train statistics (std 0 ->
    1); categorical -> ids ``1..V`` from the training vocabulary, 0 for missing or unseen values. The
    optional bin and level columns of numeric features follow the categorical columns in ``x["cat"]``
    (all bin columns, then all level columns, each in numeric-column order).
    Labels: binary float 0/1, multiclass int64, multilabel float (N, L), regression float32 in the
    original units (the Task standardises in its loss). Missing labels have ``mask == False``, y 0.
    """

    def __init__(
        self,
        tasks: Sequence[TaskSpecLike],
        numeric: Sequence[str] | None = None,
        categorical: Sequence[str] | None = None,
        drop: Sequence[str] | None = None,
        task_column: str | None = None,
        max_categories: int | None = None,
        positive: dict[str, str] | None = None,
        numeric_bins: int = 0,
        numeric_levels: int = 0,
    ) -> None:
        if isinstance(tasks, (str, Task)):
            tasks = [tasks]
        self.specs: list[tuple[str, TaskKind | None, int]] = [_normalise_spec(s) for s in tasks]
        if not self.specs:
            raise ValueError("no tasks given; name at least one target column, e.g. tasks=['income:binary']")
        names = [s[0] for s in self.specs]
        dups = sorted({n for n in names if names.count(n) > 1})
        if dups:
            raise ValueError(f"duplicate task name(s) {_fmt_names(dups)}; each target may be given once")
        if task_column is not None and len(self.specs) != 1:
            raise ValueError(
                f"task_column='{task_column}' needs exactly one target spec (e.g. 'y:regression'), "
                f"got {_fmt_names(names)}"
            )
        if max_categories is not None and max_categories < 1:
            raise ValueError(f"max_categories must be >= 1, got {max_categories}")
        if numeric_bins < 0 or numeric_bins == 1:
            raise ValueError(f"numeric_bins must be 0 (off) or >= 2, got {numeric_bins}")
        self.numeric_bins = int(numeric_bins)
        if numeric_levels < 0:
            raise ValueError(f"numeric_levels must be 0 (off) or a minimum count >= 1, got {numeric_levels}")
        self.numeric_levels = int(numeric_levels)
        self.numeric = list(numeric) if numeric is not None else None
        self.categorical = list(categorical) if categorical is not None else None
        self.drop = list(drop) if drop is not None else []
        self.task_column = task_column
        self.max_categories = max_categories
        self.positive = {str(k): str(v) for k, v in (positive or {}).items()}
        both = sorted(set(self.numeric or ()) & set(self.categorical or ()))
        if both:
            raise ValueError(f"column(s) {_fmt_names(both)} are declared both numeric and categorical; pick one")
        # fitted state
        self.num_cols: list[str] = []
        self.num_stats: dict[str, tuple[float, float, float]] = {}  # column -> (median, mean, std)
        self.bin_edges: dict[str, list[float]] = {}  # column -> inner quantile edges (numeric_bins > 0)
        self.levels: dict[str, list[float]] = {}  # column -> sorted frequent values (numeric_levels > 0)
        self.cat_cols: list[str] = []
        self.vocabs: dict[str, list[str]] = {}
        self.task_values: list[str] = []  # task-column layout: the value of each task, in task order
        self._tasks: list[Task] = []
        self._fitted = False

    # ------------------------------------------------------------------ properties
    @property
    def target_columns(self) -> list[str]:
        return [s[0] for s in self.specs]

    @property
    def feature_columns(self) -> list[str]:
        self._require_fitted()
        return [*self.num_cols, *self.cat_cols]

    @property
    def tasks(self) -> list[Task]:
        self._require_fitted()
        return list(self._tasks)

    @property
    def input_spec(self) -> InputSpec:
        self._require_fitted()
        return InputSpec(
            kind="tabular",
            n_numeric=len(self.num_cols),
            cardinalities=tuple(len(self.vocabs[c]) + 1 for c in self.cat_cols)
            + tuple(len(self.bin_edges[c]) + 2 for c in self.num_cols if c in self.bin_edges)
            + tuple(len(self.levels[c]) + 1 for c in self.num_cols if c in self.levels),
        )

    def _require_fitted(self) -> None:
        if not self._fitted:
            raise RuntimeError("this TableEncoder is not fitted yet; call fit(train_df) first")

    def __repr__(self) -> str:
        state = (
            f"{len(self.num_cols)} numeric, {len(self.cat_cols)} categorical, {len(self._tasks)} tasks"
            if self._fitted
            else "not fitted"
        )
        return f"TableEncoder(targets={self.target_columns}, task_column={self.task_column!r}; {state})"

    # ------------------------------------------------------------------ fit
    def fit(self, df: pd.DataFrame) -> TableEncoder:
        """Learn feature types, statistics, vocabularies and task specs from the training split."""
        _check_unique_columns(list(df.columns), "training data")
        cols = [str(c) for c in df.columns]
        if len(df) == 0:
            raise ValueError("training data has no rows")
        for name in self.target_columns:
            if name not in cols:
                raise _unknown_column("target column", name, cols, "training data")
        if self.task_column is not None:
            if self.task_column not in cols:
                raise _unknown_column("task column", self.task_column, cols, "training data")
            if self.task_column in self.target_columns:
                raise ValueError(f"column '{self.task_column}' cannot be both the task column and a target")
        reserved = {*self.target_columns, *([self.task_column] if self.task_column else [])}
        for role, listed in (("numeric", self.numeric), ("categorical", self.categorical), ("drop", self.drop)):
            for c in listed or ():
                if c not in cols:
                    raise _unknown_column(f"{role} column", c, cols, "training data")
                if c in reserved:
                    raise ValueError(f"column '{c}' is a target or the task column; it cannot also be listed in {role}")
        features = [c for c in cols if c not in reserved and c not in self.drop]
        num_set, cat_set = set(self.numeric or ()), set(self.categorical or ())

        num_cols, cat_cols = [], []
        for c in features:
            dtype = df[c].dtype
            if c in num_set:
                num_cols.append(c)
            elif c in cat_set or pd.api.types.is_bool_dtype(dtype):
                cat_cols.append(c)
            elif pd.api.types.is_numeric_dtype(dtype):
                num_cols.append(c)
            else:
                cat_cols.append(c)

        num_stats: dict[str, tuple[float, float, float]] = {}
        bin_edges: dict[str, list[float]] = {}
        levels: dict[str, list[float]] = {}
        for c in num_cols:
            v = _to_float(df[c], c, "numeric column")
            present = v[~np.isnan(v)]
            if present.size:
                median, mean, std = float(np.median(present)), float(present.mean()), float(present.std())
            else:
                median, mean, std = 0.0, 0.0, 1.0
            num_stats[c] = (median, mean, std if std > 0 and np.isfinite(std) else 1.0)
            if self.numeric_bins and present.size:
                # Quantile bins, embedded as an extra categorical column: lets models (and one-hot
                # linear models) fit non-monotone effects of a numeric feature.
                inner = np.quantile(present, np.linspace(0, 1, self.numeric_bins + 1)[1:-1])
                bin_edges[c] = [float(e) for e in np.unique(inner)]
            if self.numeric_levels and present.size:
                values, counts = np.unique(present, return_counts=True)
                frequent = values[counts >= self.numeric_levels]
                if frequent.size:  # a column without frequent values would add a constant id 0
                    levels[c] = [float(x) for x in frequent]

        vocabs: dict[str, list[str]] = {}
        for c in cat_cols:
            codes, values = _factorize(df[c])
            if self.max_categories is not None and len(values) > self.max_categories:
                counts = np.bincount(codes[codes >= 0], minlength=len(values))
                ranked = sorted(range(len(values)), key=lambda i: (-counts[i], _natural_key(values[i])))
                values = [values[i] for i in ranked[: self.max_categories]]
            vocabs[c] = sorted(values, key=_natural_key)

        if self.task_column is None:
            tasks = [self._fit_target(df[name], name, kind, n) for name, kind, n in self.specs]
            task_values: list[str] = []
        else:
            tasks, task_values = self._fit_task_column(df)

        self.num_cols, self.num_stats, self.cat_cols, self.vocabs = num_cols, num_stats, cat_cols, vocabs
        self.bin_edges, self.levels = bin_edges, levels
        self._tasks, self.task_values = tasks, task_values
        self._fitted = True
        return self

    def _infer_kind(self, series: pd.Series, name: str) -> TaskKind:
        present = series.dropna()
        if len(present) and _is_listlike(present.iloc[0]):
            return TaskKind.MULTILABEL
        distinct = _factorize(series)[1]
        labels = _label_codes(series)[1]
        self._check_classes(name, set(labels))
        if len(labels) == 2:
            return TaskKind.BINARY
        try:
            vals = np.array([float(v) for v in distinct])
        except ValueError:
            vals = None
        if vals is not None:
            if len(distinct) > MAX_INFERRED_CLASSES or bool(np.any(vals != np.floor(vals))):
                return TaskKind.REGRESSION
            return TaskKind.MULTICLASS
        if len(distinct) <= MAX_INFERRED_CLASSES:
            return TaskKind.MULTICLASS
        raise ValueError(
            f"cannot infer the kind of target '{name}' ({len(distinct)} distinct text values); "
            f"give it, e.g. '{name}:multiclass' or '{name}:regression'"
        )

    @staticmethod
    def _check_classes(name: str, distinct: set[str]) -> None:
        if not distinct:
            raise ValueError(f"target '{name}' has no labels in the training data; drop it or fill in labels")
        if len(distinct) == 1:
            raise ValueError(
                f"target '{name}' has a single class '{next(iter(distinct))}' in the training data; "
                "a classifier needs at least two (drop the target or add rows of another class)"
            )

    def _fit_target(self, series: pd.Series, name: str, kind: TaskKind | None, n: int, task_name: str = "") -> Task:
        task_name = task_name or name
        kind = kind or self._infer_kind(series, name)
        if kind is TaskKind.REGRESSION:
            v = _to_float(series, name, "regression target")
            present = v[~np.isnan(v)]
            if present.size == 0:
                raise ValueError(f"target '{name}' has no labels in the training data; drop it or fill in labels")
            std = float(present.std())
            return Task(
                task_name, kind, y_mean=float(present.mean()), y_std=std if std > 0 and np.isfinite(std) else 1.0
            )
        if kind is TaskKind.MULTILABEL:
            cells = [p for p in map(_split_labels, series) if p is not None]
            if not cells:
                raise ValueError(f"target '{name}' has no labels in the training data; drop it or fill in labels")
            labels = {label for parts in cells for label in parts}
            classes = self._class_list(name, labels, n, kind)
            return Task(task_name, kind, n_classes=len(classes), classes=tuple(classes))
        distinct = set(_label_codes(series)[1])
        self._check_classes(name, distinct)
        if kind is TaskKind.BINARY:
            ordered = sorted(distinct, key=_natural_key)
            if len(ordered) != 2:
                raise ValueError(
                    f"binary target '{name}' has {len(ordered)} classes in the training data "
                    f"({_fmt_names(ordered, 8)}); declare it '{name}:multiclass'"
                )
            pos = self.positive.get(name)
            if pos is not None and pos not in ordered:
                raise ValueError(
                    f"positive class '{pos}' of target '{name}' is not one of its classes {_fmt_names(ordered)}"
                )
            if pos is None:
                named = [c for c in ordered if c.strip().lower() in _POSITIVE_NAMES]
                pos = named[0] if len(named) == 1 else ordered[-1]
            neg = ordered[0] if ordered[1] == pos else ordered[1]
            return Task(task_name, kind, n_classes=2, classes=(neg, pos))
        classes = self._class_list(name, distinct, n, kind)
        return Task(task_name, kind, n_classes=len(classes), classes=tuple(classes))

    @staticmethod
    def _class_list(name: str, observed: set[str], n: int, kind: TaskKind) -> list[str]:
        ordered = sorted(observed, key=_natural_key)
        if kind is TaskKind.MULTILABEL and len(ordered) < 2 and not n:
            raise ValueError(
                f"multilabel target '{name}' has {len(ordered)} label(s) in the training data; it needs >= 2"
            )
        if not n or n == len(ordered):
            return ordered
        if _ints_below(ordered, n):  # integer labels 0..n-1, some absent from training
            return [str(i) for i in range(n)]
        raise ValueError(
            f"target '{name}' is declared with {n} classes but the training data has {len(ordered)} "
            f"({_fmt_names(ordered, 8)}); fix the class count or the labels"
        )

    def _fit_task_column(self, df: pd.DataFrame) -> tuple[list[Task], list[str]]:
        name, kind, n = self.specs[0]
        tc = self.task_column
        assert tc is not None
        codes, values = _factorize(df[tc])
        if (codes < 0).any():
            pos = int(np.argmax(codes < 0))
            raise ValueError(f"task column '{tc}' is empty at row {df.index[pos]}; every row must name its task")
        task_values = sorted(values, key=_natural_key)
        row_task = _lookup(codes, values, task_values)
        kind = kind or self._infer_kind(df[name], name)
        overall = self._fit_target(df[name], name, kind, n)
        tasks = []
        y_all = _to_float(df[name], name, "regression target") if kind is TaskKind.REGRESSION else None
        for i, v in enumerate(task_values):
            task_name = f"{name}@{v}"
            if y_all is not None:
                y = y_all[row_task == i]
                present = y[~np.isnan(y)]
                mean = float(present.mean()) if present.size else overall.y_mean
                std = float(present.std()) if present.size else overall.y_std
                tasks.append(Task(task_name, kind, y_mean=mean, y_std=std if std > 0 and np.isfinite(std) else 1.0))
            else:
                tasks.append(Task(task_name, kind, n_classes=overall.n_classes, classes=overall.classes))
        return tasks, task_values

    # ------------------------------------------------------------------ transform
    def _check_columns(self, df: pd.DataFrame, need_targets: bool) -> None:
        _check_unique_columns(list(df.columns), "input data")
        cols = [str(c) for c in df.columns]
        missing = [c for c in self.feature_columns if c not in cols]
        if missing:
            raise ColumnError(
                f"input data lacks feature column(s) {_fmt_names(missing)} that the model was trained on; "
                f"available columns: {_fmt_names(cols)}"
            )
        if need_targets:
            needed = [*self.target_columns, *([self.task_column] if self.task_column else [])]
            lacking = [c for c in needed if c not in cols]
            if lacking:
                raise ColumnError(
                    f"input data lacks target/task column(s) {_fmt_names(lacking)}; available: {_fmt_names(cols)}"
                )
        known = {*self.feature_columns, *self.target_columns, *self.drop}
        if self.task_column:
            known.add(self.task_column)
        extra = [c for c in cols if c not in known]
        if extra:
            raise ValueError(
                f"input data has column(s) {_fmt_names(extra)} that are neither features nor targets of this model; "
                "drop them (drop=[...] when fitting, or remove them from the file)"
            )

    def _encode_features(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        n = len(df)
        num = np.empty((n, len(self.num_cols)), dtype=np.float32)
        for j, c in enumerate(self.num_cols):
            median, mean, std = self.num_stats[c]
            v = _to_float(df[c], c, "numeric column")
            v = np.where(np.isnan(v), median, v)
            num[:, j] = (v - mean) / std
        binned = [c for c in self.num_cols if c in self.bin_edges]
        leveled = [c for c in self.num_cols if c in self.levels]
        cat = np.empty((n, len(self.cat_cols) + len(binned) + len(leveled)), dtype=np.int64)
        for j, c in enumerate(self.cat_cols):
            codes, values = _factorize(df[c])
            cat[:, j] = _lookup(codes, values, self.vocabs[c]) + 1  # missing and unseen -> 0
        for j, c in enumerate(binned, start=len(self.cat_cols)):
            v = _to_float(df[c], c, "numeric column")
            ids = np.searchsorted(np.asarray(self.bin_edges[c]), v, side="right") + 1
            cat[:, j] = np.where(np.isnan(v), 0, ids)  # missing -> 0
        for j, c in enumerate(leveled, start=len(self.cat_cols) + len(binned)):
            v = _to_float(df[c], c, "numeric column")
            known = np.asarray(self.levels[c])
            pos = np.minimum(np.searchsorted(known, v), len(known) - 1)  # NaN sorts last
            cat[:, j] = np.where(known[pos] == v, pos + 1, 0)  # rare, unseen and missing -> 0
        return {"num": torch.from_numpy(num), "cat": torch.from_numpy(cat)}

    def transform_features(self, df: pd.DataFrame) -> dict[str, torch.Tensor]:
        """Inputs only (``{"num", "cat"}``), for prediction on files without labels."""
        self._require_fitted()
        self._check_columns(df, need_targets=False)
        return self._encode_features(df)

    def transform(self, df: pd.DataFrame) -> TaskTensors:
        """Inputs, labels and label masks of a split, encoded with the training statistics."""
        self._require_fitted()
        self._check_columns(df, need_targets=True)
        x = self._encode_features(df)
        y: dict[str, torch.Tensor] = {}
        mask: dict[str, torch.Tensor] = {}
        if self.task_column is None:
            for task in self._tasks:
                y[task.name], mask[task.name] = self._encode_target(df[task.name], task.name, task)
        else:
            name = self.target_columns[0]
            codes, values = _factorize(df[self.task_column])
            row_task = _lookup(codes, values, self.task_values)
            if (codes < 0).any():
                pos = int(np.argmax(codes < 0))
                raise ValueError(
                    f"task column '{self.task_column}' is empty at row {df.index[pos]}; every row must name its task"
                )
            unknown = sorted({values[c] for c in np.unique(codes[row_task < 0])}, key=_natural_key)
            if unknown:
                raise ValueError(
                    f"task column '{self.task_column}' has value(s) {_fmt_names(unknown, 8)} that were not in the "
                    f"training data; the model has tasks for {_fmt_names(self.task_values, 8)}"
                )
            y_all, m_all = self._encode_target(df[name], name, self._tasks[0])
            for i, task in enumerate(self._tasks):
                rows = torch.from_numpy(row_task == i)
                y[task.name] = torch.where(rows, y_all, torch.zeros((), dtype=y_all.dtype))
                mask[task.name] = rows & m_all
        return TaskTensors(x, y, mask)

    @staticmethod
    def _encode_target(series: pd.Series, column: str, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(series)
        if task.kind is TaskKind.REGRESSION:
            v = _to_float(series, column, "regression target")
            present = ~np.isnan(v)
            return torch.from_numpy(np.where(present, v, 0.0).astype(np.float32)), torch.from_numpy(present)
        index = {c: i for i, c in enumerate(task.classes)}
        if task.kind is TaskKind.MULTILABEL:
            y = np.zeros((n, len(task.classes)), dtype=np.float32)
            present = np.zeros(n, dtype=bool)
            for r, cell in enumerate(series):
                parts = _split_labels(cell)
                if parts is None:
                    continue
                present[r] = True
                for p in parts:
                    if p not in index:
                        raise ValueError(_unseen_label(column, p, task))
                    y[r, index[p]] = 1.0
            m = np.repeat(present[:, None], len(task.classes), axis=1)
            return torch.from_numpy(y), torch.from_numpy(m)
        raw, values = _label_codes(series)
        codes = _lookup(raw, values, task.classes)
        missing = raw < 0
        bad = (codes < 0) & ~missing
        if bad.any():
            raise ValueError(_unseen_label(column, values[raw[int(np.argmax(bad))]], task))
        codes[missing] = 0
        present = torch.from_numpy(~missing)
        if task.kind is TaskKind.BINARY:
            return torch.from_numpy(codes.astype(np.float32)), present
        return torch.from_numpy(codes), present

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable fitted state (saved in checkpoints; :meth:`from_dict` restores it exactly)."""
        self._require_fitted()
        return {
            "format": _ENCODER_FORMAT,
            "version": _ENCODER_VERSION,
            "config": {
                "tasks": [[name, kind.value if kind else None, n] for name, kind, n in self.specs],
                "numeric": self.numeric,
                "categorical": self.categorical,
                "drop": list(self.drop),
                "task_column": self.task_column,
                "max_categories": self.max_categories,
                "positive": dict(self.positive),
                "numeric_bins": self.numeric_bins,
                "numeric_levels": self.numeric_levels,
            },
            "numeric": [
                {
                    "name": c,
                    "median": self.num_stats[c][0],
                    "mean": self.num_stats[c][1],
                    "std": self.num_stats[c][2],
                    **({"bin_edges": self.bin_edges[c]} if c in self.bin_edges else {}),
                    **({"levels": self.levels[c]} if c in self.levels else {}),
                }
                for c in self.num_cols
            ],
            "categorical": [{"name": c, "vocab": list(self.vocabs[c])} for c in self.cat_cols],
            "task_values": list(self.task_values),
            "tasks": [t.to_dict() for t in self._tasks],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TableEncoder:
        if d.get("format") != _ENCODER_FORMAT or d.get("version") != _ENCODER_VERSION:
            raise ValueError(
                f"not a polytask TableEncoder v{_ENCODER_VERSION} state (format={d.get('format')!r}, "
                f"version={d.get('version')!r}); was it saved by another polytask version?"
            )
        cfg = d["config"]
        enc = cls(
            [tuple(s) for s in cfg["tasks"]],
            numeric=cfg["numeric"],
            categorical=cfg["categorical"],
            drop=cfg["drop"],
            task_column=cfg["task_column"],
            max_categories=cfg["max_categories"],
            positive=cfg["positive"],
            numeric_bins=cfg.get("numeric_bins", 0),
            numeric_levels=cfg.get("numeric_levels", 0),
        )
        enc.bin_edges = {e["name"]: [float(x) for x in e["bin_edges"]] for e in d["numeric"] if "bin_edges" in e}
        enc.levels = {e["name"]: [float(x) for x in e["levels"]] for e in d["numeric"] if "levels" in e}
        enc.num_cols = [e["name"] for e in d["numeric"]]
        enc.num_stats = {e["name"]: (float(e["median"]), float(e["mean"]), float(e["std"])) for e in d["numeric"]}
        enc.cat_cols = [e["name"] for e in d["categorical"]]
        enc.vocabs = {e["name"]: [str(v) for v in e["vocab"]] for e in d["categorical"]}
        enc.task_values = [str(v) for v in d["task_values"]]
        enc._tasks = [Task.from_dict(t) for t in d["tasks"]]
        enc._fitted = True
        return enc


def _unseen_label(column: str, value: str, task: Task) -> str:
    return (
        f"target '{column}' has label '{value}' that is not among the training classes {_fmt_names(task.classes, 8)}; "
        "add rows of that class to the training data or mark the label missing"
    )


# ----------------------------------------------------------------------------- one call
def _stem(path: Path) -> str:
    suffix = _suffix(path)
    return path.name[: -len(suffix)] if suffix else path.stem


@contextlib.contextmanager
def _naming(path: Path) -> Iterator[None]:
    """Prefix the file name to a column/value error raised inside, keeping its type."""
    try:
        yield
    except (ColumnError, ValueError) as e:
        msg = str(e)
        if msg.startswith(str(path)):
            raise
        try:
            named = type(e)(f"{path}: {msg}")
        except TypeError:
            named = ValueError(f"{path}: {msg}")
        raise named from e


def load_table(
    path: str | os.PathLike[str],
    tasks: Sequence[TaskSpecLike],
    val: str | os.PathLike[str] | None = None,
    test: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    seed: int = 0,
    numeric: Sequence[str] | None = None,
    categorical: Sequence[str] | None = None,
    drop: Sequence[str] | None = None,
    task_column: str | None = None,
    max_categories: int | None = None,
    positive: dict[str, str] | None = None,
    numeric_bins: int = 0,
    numeric_levels: int = 0,
) -> DataBundle:
    """Read a table (and optional val/test files) into a :class:`DataBundle`.

    Splits that are not given as files are cut from ``path`` at random (seeded; stratified by task
    in the task-column layout). The encoder is fitted on the training rows only and is kept in
    ``bundle.encoder`` for checkpoints. ``test_fraction=0`` without a test file gives no test split.
    ``numeric_bins`` and ``numeric_levels`` are :class:`TableEncoder`'s.
    """
    p = Path(path)
    df = read_table(p)
    vf = 0.0 if val is not None else val_fraction
    tf = 0.0 if test is not None else test_fraction
    if val is None and val_fraction <= 0:
        raise ValueError("no validation split: give a val file or val_fraction > 0 (model selection needs one)")
    groups = None
    if task_column is not None and task_column in df.columns:
        groups = _factorize(df[task_column])[0]
    tr, va, te = split_indices(len(df), vf, tf, seed, groups)
    train_df = df.iloc[tr]
    val_df = read_table(val) if val is not None else df.iloc[va]
    test_df = read_table(test) if test is not None else (df.iloc[te] if tf > 0 else None)
    enc = TableEncoder(
        tasks,
        numeric=numeric,
        categorical=categorical,
        drop=drop,
        task_column=task_column,
        max_categories=max_categories,
        positive=positive,
        numeric_bins=numeric_bins,
        numeric_levels=numeric_levels,
    )
    with _naming(p):
        enc.fit(train_df)
        train_tensors = enc.transform(train_df)
    with _naming(Path(val) if val is not None else p):
        val_tensors = enc.transform(val_df)
    with _naming(Path(test) if test is not None else p):
        test_tensors = enc.transform(test_df) if test_df is not None else None
    split = {
        "train": len(train_df),
        "val": len(val_df),
        "test": 0 if test_df is None else len(test_df),
        "seed": seed,
        "val_from": str(val) if val is not None else f"random {val_fraction:g} of {p.name}",
        "test_from": str(test) if test is not None else (f"random {test_fraction:g} of {p.name}" if tf > 0 else None),
        "stratified_by": task_column if groups is not None else None,
    }
    return DataBundle(
        name=_stem(p),
        tasks=enc.tasks,
        input_spec=enc.input_spec,
        train=train_tensors,
        val=val_tensors,
        test=test_tensors,
        encoder=enc,
        meta={"source": str(p), "split": split},
    )
