"""UCI Census-Income (KDD) with the task groups of the MMoE paper (Ma et al., KDD 2018).

Only the public *test* file (``census-income/census-income.test.gz``, 99,762 rows) is available
offline, so it is split at random 60/20/20 into train/val/test with a fixed seed; numbers are not
comparable with papers that train on the 199,523-row training file.

Tasks (all binary):

* ``income``: the label column is ``50000+.`` (income above $50K; ~6% positive);
* ``marital``: ``marital stat`` is ``Never married``;
* ``education``: the education level is at least college. The MMoE paper does not list the
  categories, so we read "at least college" as "has been to college": the seven levels the CPS codes
  as post-secondary (A_HGA codes 40-46), from ``Some college but no degree`` up to ``Doctorate
  degree(PhD EdD)`` (:data:`COLLEGE_OR_ABOVE`, the exact strings of the file). High-school levels
  and ``Children`` are negatives.

The source columns of the three targets (income label, ``marital stat``, ``education``) and the
survey ``instance weight`` are removed from the inputs, for every task group, so that the inputs
are the same whichever tasks are trained.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import pandas as pd

from polytask.data import _datadir
from polytask.data._bundle import DataBundle, register_dataset
from polytask.data._table import TableEncoder, split_indices

__all__ = [
    "CENSUS_COLUMNS",
    "CENSUS_FILE",
    "COLLEGE_OR_ABOVE",
    "census_frame",
    "census_group1",
    "census_group2",
    "census_income",
]

CENSUS_FILE = "census-income/census-income.test.gz"

CENSUS_COLUMNS: tuple[str, ...] = (
    "age",
    "class of worker",
    "detailed industry recode",
    "detailed occupation recode",
    "education",
    "wage per hour",
    "enroll in edu inst last wk",
    "marital stat",
    "major industry code",
    "major occupation code",
    "race",
    "hispanic origin",
    "sex",
    "member of a labor union",
    "reason for unemployment",
    "full or part time employment stat",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "tax filer stat",
    "region of previous residence",
    "state of previous residence",
    "detailed household and family stat",
    "detailed household summary in household",
    "instance weight",
    "migration code-change in msa",
    "migration code-change in reg",
    "migration code-move within reg",
    "live in this house 1 year ago",
    "migration prev res in sunbelt",
    "num persons worked for employer",
    "family members under 18",
    "country of birth father",
    "country of birth mother",
    "country of birth self",
    "citizenship",
    "own business or self employed",
    "fill inc questionnaire for veteran's admin",
    "veterans benefits",
    "weeks worked in year",
    "year",
    "income",
)

# Continuous quantities; every other input (including the integer-coded recodes, 'own business or
# self employed', 'veterans benefits' and 'year') is a code, hence categorical.
NUMERIC_COLUMNS: tuple[str, ...] = (
    "age",
    "wage per hour",
    "capital gains",
    "capital losses",
    "dividends from stocks",
    "num persons worked for employer",
    "weeks worked in year",
)

COLLEGE_OR_ABOVE: frozenset[str] = frozenset(
    {
        "Some college but no degree",
        "Associates degree-occup /vocational",
        "Associates degree-academic program",
        "Bachelors degree(BA AB BS)",
        "Masters degree(MA MS MEng MEd MSW MBA)",
        "Prof school degree (MD DDS DVM LLB JD)",
        "Doctorate degree(PhD EdD)",
    }
)

TARGETS: tuple[str, ...] = ("income", "marital", "education")
_SOURCE_COLUMNS = ("income", "marital stat", "education", "instance weight")
_SOURCE = "UCI Census-Income (KDD), public test file; tasks as in Ma et al., KDD 2018 (MMoE)"


@functools.cache
def _parse(path: str, size: int, mtime_ns: int) -> pd.DataFrame:
    """Parse the raw file once per process (keyed by size and mtime so an edited file is re-read)."""
    raw = pd.read_csv(
        path,
        header=None,
        names=list(CENSUS_COLUMNS),
        sep=",",
        skipinitialspace=True,
        dtype=str,
        keep_default_na=False,
        na_values=["?"],
        compression="gzip",
    )
    raw = raw.apply(lambda s: s.str.strip())
    raw = raw.replace({"?": np.nan, "": np.nan})
    if raw.shape[1] != len(CENSUS_COLUMNS):
        raise ValueError(f"{path}: expected {len(CENSUS_COLUMNS)} fields per row, got {raw.shape[1]}")
    labels = set(raw["income"].dropna().unique())
    if not labels <= {"- 50000.", "50000+."}:
        raise ValueError(f"{path}: unexpected income labels {sorted(labels)}; is this the census-income file?")
    df = raw.drop(columns=list(_SOURCE_COLUMNS))
    for c in NUMERIC_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="raise").astype(np.float64)
    df["income"] = (raw["income"] == "50000+.").astype(np.int64)
    df["marital"] = (raw["marital stat"] == "Never married").astype(np.int64)
    df["education"] = raw["education"].isin(COLLEGE_OR_ABOVE).astype(np.int64)
    return df


def census_frame(data_dir: str | os.PathLike[str] | None = None) -> pd.DataFrame:
    """The verified, parsed file: input columns plus the 0/1 targets ``income``, ``marital``, ``education``.

    The frame is cached per process and shared: do not modify it in place.
    """
    path = _datadir.resolve(CENSUS_FILE, root=data_dir)
    st = Path(path).stat()
    return _parse(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


def _load(
    name: str,
    tasks: tuple[str, ...],
    data_dir: str | os.PathLike[str] | None,
    seed: int,
    n_rows: int | None,
    numeric_bins: int = 0,
    numeric_levels: int = 0,
) -> DataBundle:
    df = census_frame(data_dir)
    n_total = len(df)
    if n_rows is not None:
        if not 10 <= n_rows <= n_total:
            raise ValueError(f"n_rows must be between 10 and {n_total}, got {n_rows}")
        keep = np.sort(np.random.default_rng([seed, 1]).permutation(n_total)[:n_rows])
        df = df.iloc[keep]
    tr, va, te = split_indices(len(df), 0.2, 0.2, seed)
    train_df, val_df, test_df = df.iloc[tr], df.iloc[va], df.iloc[te]
    categorical = [c for c in df.columns if c not in NUMERIC_COLUMNS and c not in TARGETS]
    enc = TableEncoder(
        [(t, "binary") for t in tasks],
        numeric=list(NUMERIC_COLUMNS),
        categorical=categorical,
        drop=[t for t in TARGETS if t not in tasks],
        positive={t: "1" for t in tasks},
        numeric_bins=numeric_bins,
        numeric_levels=numeric_levels,
    ).fit(train_df)
    meta = {
        "source": CENSUS_FILE,
        "split": {
            "how": "random 60/20/20 of the public test file (the training file is not available offline)",
            "seed": seed,
            "rows": len(df),
            "rows_in_file": n_total,
            "train": len(train_df),
            "val": len(val_df),
            "test": len(test_df),
        },
        "education_positive": sorted(COLLEGE_OR_ABOVE),
    }
    return DataBundle.encoded(name, enc, train_df, val_df, test_df, meta)


@register_dataset("census-income", "Census-Income (KDD): income, marital, education (binary); 60/20/20", _SOURCE)
def census_income(
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_rows: int | None = None,
    numeric_bins: int = 0,
    numeric_levels: int = 0,
) -> DataBundle:
    """All three MMoE tasks. Only the public test file is available, split 60/20/20 (``seed``)."""
    return _load("census-income", TARGETS, data_dir, seed, n_rows, numeric_bins, numeric_levels)


@register_dataset("census-group1", "Census-Income (KDD), MMoE group 1: income, marital; 60/20/20", _SOURCE)
def census_group1(
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_rows: int | None = None,
    numeric_bins: int = 0,
    numeric_levels: int = 0,
) -> DataBundle:
    """MMoE task group 1 (income, marital). Only the public test file is available, split 60/20/20."""
    return _load("census-group1", ("income", "marital"), data_dir, seed, n_rows, numeric_bins, numeric_levels)


@register_dataset("census-group2", "Census-Income (KDD), MMoE group 2: education, marital; 60/20/20", _SOURCE)
def census_group2(
    data_dir: str | os.PathLike[str] | None = None,
    seed: int = 0,
    n_rows: int | None = None,
    numeric_bins: int = 0,
    numeric_levels: int = 0,
) -> DataBundle:
    """MMoE task group 2 (education, marital). Only the public test file is available, split 60/20/20."""
    return _load("census-group2", ("education", "marital"), data_dir, seed, n_rows, numeric_bins, numeric_levels)
