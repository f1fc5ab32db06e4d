"""Missing labels in tables: NaN / empty cells, and -1 for class targets, are masked out."""

from __future__ import annotations

import numpy as np
import pandas as pd

from polytask.data import TableEncoder


def test_minus_one_and_nan_are_missing_class_labels() -> None:
    df = pd.DataFrame(
        {
            "x": np.arange(8.0),
            "y": [1, 0, -1, 1, 0, 1, np.nan, 0],
            "m": ["a", "b", "c", "-1", "a", "", "c", "b"],
            "r": [-1.0, 0.5, np.nan, 2.0, 1.0, 0.0, 3.0, -2.0],
        }
    )
    enc = TableEncoder(["y", "m:multiclass", "r:regression"]).fit(df)
    kinds = {t.name: (t.kind.value, t.classes) for t in enc.tasks}
    # -1 does not count as a class: 'y' is inferred binary, 'm' has three classes.
    assert kinds["y"] == ("binary", ("0", "1"))
    assert kinds["m"] == ("multiclass", ("a", "b", "c"))
    t = enc.transform(df)
    assert t.mask["y"].tolist() == [True, True, False, True, True, True, False, True]
    assert t.mask["m"].tolist() == [True, True, True, False, True, False, True, True]
    # For regression targets -1 is an ordinary value; only NaN is missing.
    assert t.mask["r"].tolist() == [True, True, False, True, True, True, True, True]
    assert t.y["r"][0].item() == -1.0
