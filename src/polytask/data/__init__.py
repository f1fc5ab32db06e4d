"""Data: tables and built-in data sets as tensors with per-task label masks, plus the data/cache dirs.

Importing this package registers the built-in data sets (``census-*``, ``mnist``, ``multi-*``, the
multi-task tables ``school``, ``computer``, ``landmine``, ``abalone`` and ``synthetic-outliers``) in
:data:`DATASETS`; loading one reads files only when its loader is called.
"""

from __future__ import annotations

from polytask.data import census, vision
from polytask.data import funnel as funnel  # registers funnel-synthetic
from polytask.data import glue as glue  # registers glue (text; needs transformers when loaded)
from polytask.data import heterogeneous as heterogeneous  # registers hetero-vision
from polytask.data import mtl_regression as mtl_regression  # registers school, computer, landmine, abalone
from polytask.data import synthetic_outliers as synthetic_outliers  # registers synthetic-outliers
from polytask.data._bundle import DATASETS, DataBundle, load_dataset, register_dataset
from polytask.data._datadir import DataIntegrityError, cache_dir, data_dir, resolve, sha256_file, verify_file
from polytask.data._table import (
    ColumnError,
    TableEncoder,
    TaskSpecLike,
    load_table,
    load_task_column_pair,
    read_table,
    split_indices,
)
from polytask.data._tensors import Batch, InputSpec, TaskTensors

__all__ = [
    "DATASETS",
    "Batch",
    "ColumnError",
    "DataBundle",
    "DataIntegrityError",
    "InputSpec",
    "TableEncoder",
    "TaskSpecLike",
    "TaskTensors",
    "cache_dir",
    "census",
    "data_dir",
    "load_dataset",
    "load_table",
    "load_task_column_pair",
    "mtl_regression",
    "read_table",
    "register_dataset",
    "resolve",
    "sha256_file",
    "split_indices",
    "synthetic_outliers",
    "verify_file",
    "vision",
]
