"""Missing labels in tables: NaN / empty cells, and -1 for class targets, are masked out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

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


def test_numeric_bins_add_quantile_bin_columns_that_round_trip() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"age": rng.integers(18, 90, 400).astype(float), "city": rng.choice(["a", "b"], 400)})
    df["y"] = (df.age > 50).astype(int)
    df.loc[3, "age"] = np.nan
    enc = TableEncoder(["y:binary"], numeric_bins=4).fit(df)
    edges = enc.bin_edges["age"]
    assert len(edges) == 3 and edges == sorted(edges)
    # one categorical column (city) plus one bin column for age: 3 inner edges -> 4 bins + missing
    assert enc.input_spec.cardinalities == (3, 5)
    x = enc.transform_features(df)
    bins = x["cat"][:, 1]
    assert bins[3].item() == 0  # missing -> 0
    assert set(bins[~df.age.isna().to_numpy()].tolist()) == {1, 2, 3, 4}
    assert abs(np.bincount(bins.numpy(), minlength=5)[1:] - 100).max() <= 15  # quantiles: ~equal counts
    again = TableEncoder.from_dict(enc.to_dict())
    assert torch.equal(again.transform_features(df)["cat"], x["cat"])
    assert TableEncoder.from_dict(TableEncoder(["y:binary"]).fit(df).to_dict()).input_spec.cardinalities == (3,)
