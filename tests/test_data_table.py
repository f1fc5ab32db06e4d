"""Tables -> tensors: typing, train-only statistics, label masks, task-column layout, errors, round trip."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from polytask.data import (
    ColumnError,
    DataBundle,
    TableEncoder,
    load_table,
    load_task_column_pair,
    read_table,
    split_indices,
)
from polytask.data._datadir import resolve
from polytask.tasks import TaskKind


def _frame(n: int = 40, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame(
        {
            "age": rng.integers(18, 80, n).astype(float),
            "score": rng.normal(size=n),
            "city": rng.choice(["paris", "rome", "oslo"], n),
            "member": rng.choice([True, False], n),
            "clicked": rng.choice(["yes", "no"], n),
            "grade": rng.choice([2, 10, 3], n),
            "price": rng.normal(100, 10, n),
        }
    )


TASKS = ["clicked:binary", "grade:multiclass", "price:regression"]


# ----------------------------------------------------------------------------- read_table
def test_read_table_formats(tmp_path: Path) -> None:
    df = _frame(10)
    df.to_csv(tmp_path / "a.csv", index=False)
    df.to_csv(tmp_path / "a.tsv", sep="\t", index=False)
    df.to_csv(tmp_path / "a.csv.gz", index=False)
    df.to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.tsv", "a.csv.gz", "a.parquet"):
        got = read_table(tmp_path / name)
        assert list(got.columns) == list(df.columns), name
        np.testing.assert_allclose(got["price"].to_numpy(), df["price"].to_numpy())


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"table file not found: .*nope\.csv"):
        read_table(tmp_path / "nope.csv")
    (tmp_path / "a.xlsx").write_text("x")
    with pytest.raises(ValueError, match=r"a\.xlsx: unsupported file type; supported: \.csv, \.csv\.gz, \.tsv"):
        read_table(tmp_path / "a.xlsx")
    (tmp_path / "dup.csv").write_text("a,b,a\n1,2,3\n")
    with pytest.raises(ValueError, match=r"dup\.csv: duplicate column name\(s\) 'a'"):
        read_table(tmp_path / "dup.csv")
    with gzip.open(tmp_path / "dup.csv.gz", "wt") as f:
        f.write("x,x\n1,2\n")
    with pytest.raises(ValueError, match="duplicate column"):
        read_table(tmp_path / "dup.csv.gz")


# ----------------------------------------------------------------------------- features
def test_feature_typing_and_shapes() -> None:
    df = _frame()
    enc = TableEncoder(TASKS).fit(df)
    assert enc.num_cols == ["age", "score"]
    assert enc.cat_cols == ["city", "member"]  # text and bool -> categorical
    out = enc.transform(df)
    assert out.x["num"].dtype == torch.float32 and out.x["num"].shape == (40, 2)
    assert out.x["cat"].dtype == torch.int64 and out.x["cat"].shape == (40, 2)
    assert enc.input_spec.kind == "tabular"
    assert enc.input_spec.n_numeric == 2 and enc.input_spec.cardinalities == (4, 3)  # vocab + unknown

    forced = TableEncoder(TASKS, numeric=["member"], categorical=["age"], drop=["score"]).fit(df)
    assert forced.num_cols == ["member"] and forced.cat_cols == ["age", "city"]


def test_no_numeric_or_no_categorical_gives_empty_matrices() -> None:
    df = _frame()[["city", "clicked"]]
    out = TableEncoder(["clicked"]).fit(df).transform(df)
    assert out.x["num"].shape == (40, 0) and out.x["num"].dtype == torch.float32
    assert out.x["cat"].shape == (40, 1)
    df2 = _frame()[["score", "clicked"]]
    out2 = TableEncoder(["clicked"]).fit(df2).transform(df2)
    assert out2.x["cat"].shape == (40, 0) and out2.x["cat"].dtype == torch.int64


def test_numeric_scaling_uses_training_statistics_only() -> None:
    train = pd.DataFrame({"v": [1.0, 2.0, 3.0, np.nan], "y": [0, 1, 0, 1]})
    test = pd.DataFrame({"v": [5.0, np.nan, 1000.0], "y": [0, 1, 1]})
    enc = TableEncoder(["y"]).fit(train)
    median, mean, std = enc.num_stats["v"]
    assert (median, mean) == (2.0, 2.0) and std == pytest.approx(math.sqrt(2 / 3))
    got = enc.transform(test).x["num"][:, 0]
    expected = torch.tensor([(5 - 2) / std, 0.0, (1000 - 2) / std], dtype=torch.float32)
    torch.testing.assert_close(got, expected)
    # the 1000 in the test split does not move the statistics
    assert enc.num_stats["v"] == (median, mean, std)
    const = TableEncoder(["y"]).fit(pd.DataFrame({"v": [4.0, 4.0], "y": [0, 1]}))
    assert const.num_stats["v"][2] == 1.0  # std 0 -> 1


def test_categorical_vocabulary_unseen_and_missing_map_to_zero() -> None:
    train = pd.DataFrame({"c": ["b", "a", "b", None], "y": [0, 1, 0, 1]})
    test = pd.DataFrame({"c": ["a", "b", "zzz", None], "y": [0, 0, 1, 1]})
    enc = TableEncoder(["y"]).fit(train)
    assert enc.vocabs["c"] == ["a", "b"]
    assert enc.transform(test).x["cat"][:, 0].tolist() == [1, 2, 0, 0]


def test_categorical_ints_survive_dtype_change() -> None:
    """An int column read as float at predict time (because of a NaN) still matches its vocabulary."""
    train = pd.DataFrame({"code": [3, 7, 3], "y": [0, 1, 1]})
    enc = TableEncoder(["y"], categorical=["code"]).fit(train)
    assert enc.vocabs["code"] == ["3", "7"]
    later = pd.DataFrame({"code": [7.0, np.nan, 3.0]})
    assert enc.transform_features(later)["cat"][:, 0].tolist() == [2, 0, 1]


def test_max_categories_keeps_most_frequent() -> None:
    train = pd.DataFrame({"c": list("aaabbc"), "y": [0, 1] * 3})
    enc = TableEncoder(["y"], max_categories=2).fit(train)
    assert enc.vocabs["c"] == ["a", "b"]
    assert enc.transform_features(pd.DataFrame({"c": ["c", "a"]}))["cat"][:, 0].tolist() == [0, 1]


# ----------------------------------------------------------------------------- targets
def test_targets_labels_and_masks() -> None:
    df = pd.DataFrame(
        {
            "x": [1.0, 2.0, 3.0, 4.0, 5.0],
            "b": ["no", "yes", None, "yes", "no"],
            "m": [10, 2, 3, np.nan, 2],
            "r": [1.5, np.nan, 3.5, 2.0, 3.0],
        }
    )
    enc = TableEncoder(["b:binary", "m:multiclass", "r:regression"]).fit(df)
    b, m, r = enc.tasks
    assert b.classes == ("no", "yes")  # 'yes' is positive
    assert m.classes == ("2", "3", "10")  # natural order
    assert r.y_mean == pytest.approx(2.5) and r.y_std == pytest.approx(np.std([1.5, 3.5, 2.0, 3.0]))
    out = enc.transform(df)
    assert out.y["b"].dtype == torch.float32 and out.y["b"].tolist() == [0, 1, 0, 1, 0]
    assert out.mask["b"].tolist() == [True, True, False, True, True]
    assert out.y["m"].dtype == torch.int64 and out.y["m"].tolist() == [2, 0, 1, 0, 0]
    assert out.mask["m"].tolist() == [True, True, True, False, True]
    assert out.y["r"].dtype == torch.float32 and out.y["r"].tolist() == [1.5, 0.0, 3.5, 2.0, 3.0]  # original units
    assert out.mask["r"].tolist() == [True, False, True, True, True]
    assert enc.target_columns == ["b", "m", "r"] and "x" in enc.feature_columns


def test_binary_positive_class_rules() -> None:
    def pos(values: list, **kw: object) -> str:
        df = pd.DataFrame({"x": range(len(values)), "t": values})
        return TableEncoder(["t:binary"], **kw).fit(df).tasks[0].classes[1]  # type: ignore[arg-type]

    assert pos(["b", "a", "a"]) == "b"  # sorts last
    assert pos(["1", "0"]) == "1"
    assert pos([True, False]) == "True"
    assert pos(["yes", "zzz"]) == "yes"  # a named positive beats sort order
    assert pos(["b", "a"], positive={"t": "a"}) == "a"
    with pytest.raises(ValueError, match="positive class 'c' of target 't' is not one of its classes"):
        pos(["b", "a"], positive={"t": "c"})


def test_multiclass_declared_count_and_multilabel() -> None:
    df = pd.DataFrame({"x": [1, 2, 3], "d": [0, 4, 1], "tags": ["a|b", None, "c"]})
    enc = TableEncoder(["d:multiclass(10)", "tags:multilabel"]).fit(df)
    d, tags = enc.tasks
    assert d.n_classes == 10 and d.classes[:3] == ("0", "1", "2")
    assert tags.classes == ("a", "b", "c")
    out = enc.transform(df)
    assert out.y["d"].tolist() == [0, 4, 1]
    assert out.y["tags"].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    assert out.mask["tags"].tolist() == [[True] * 3, [False] * 3, [True] * 3]


def test_kind_inference() -> None:
    rng = np.random.default_rng(0)
    df = pd.DataFrame(
        {
            "x": rng.normal(size=200),
            "reg": rng.normal(size=200),
            "bin": rng.choice([0, 1], 200),
            "mc": rng.choice([1, 2, 3], 200),
            "txt": rng.choice(list("abcd"), 200),
        }
    )
    kinds = {t.name: t.kind for t in TableEncoder(["reg", "bin", "mc", "txt"]).fit(df).tasks}
    assert kinds == {
        "reg": TaskKind.REGRESSION,
        "bin": TaskKind.BINARY,
        "mc": TaskKind.MULTICLASS,
        "txt": TaskKind.MULTICLASS,
    }
    many = pd.DataFrame({"x": range(200), "t": [f"v{i}" for i in range(200)]})
    with pytest.raises(ValueError, match=r"cannot infer the kind of target 't' \(200 distinct text values\); give it"):
        TableEncoder(["t"]).fit(many)


def test_task_spec_forms() -> None:
    df = _frame()
    a = TableEncoder(TASKS).fit(df).tasks
    b = TableEncoder([("clicked", "binary"), ("grade", TaskKind.MULTICLASS, 0), ("price", None)]).fit(df).tasks
    assert a == b


# ----------------------------------------------------------------------------- round trip
def test_to_dict_from_dict_round_trip_is_exact() -> None:
    df = _frame(60)
    df.loc[3, "city"] = None
    df.loc[5, "age"] = np.nan
    enc = TableEncoder(TASKS, max_categories=5, positive={"clicked": "yes"}).fit(df.iloc[:40])
    state = json.loads(json.dumps(enc.to_dict()))
    back = TableEncoder.from_dict(state)
    assert back.to_dict() == enc.to_dict()
    assert back.tasks == enc.tasks and back.input_spec == enc.input_spec
    a, b = enc.transform(df.iloc[40:]), back.transform(df.iloc[40:])
    for k in ("num", "cat"):
        assert torch.equal(a.x[k], b.x[k])
    for t in a.y:
        assert torch.equal(a.y[t], b.y[t]) and torch.equal(a.mask[t], b.mask[t])
    with pytest.raises(ValueError, match="not a polytask TableEncoder"):
        TableEncoder.from_dict({"format": "pickle"})


def test_task_column_round_trip() -> None:
    df = pd.DataFrame({"f": [1.0, 2, 3, 4], "task": [1, 2, 1, 2], "y": [1.0, 2, 3, 5]})
    enc = TableEncoder(["y:regression"], task_column="task").fit(df)
    back = TableEncoder.from_dict(json.loads(json.dumps(enc.to_dict())))
    assert back.to_dict() == enc.to_dict()
    assert torch.equal(back.transform(df).y["y@2"], enc.transform(df).y["y@2"])


# ----------------------------------------------------------------------------- task-column layout
def test_task_column_layout() -> None:
    df = pd.DataFrame(
        {
            "f": [0.0, 1.0, 2.0, 3.0, 4.0, 5.0],
            "task": [10, 2, 10, 2, 10, 2],
            "y": [1.0, 5.0, 3.0, 7.0, np.nan, 9.0],
        }
    )
    enc = TableEncoder(["y:regression"], task_column="task").fit(df)
    assert [t.name for t in enc.tasks] == ["y@2", "y@10"]  # natural order
    assert enc.feature_columns == ["f"]  # the task column is not a feature
    t2, t10 = enc.tasks
    assert (t2.y_mean, t10.y_mean) == (7.0, 2.0)  # per-task label scale
    out = enc.transform(df)
    assert out.mask["y@2"].tolist() == [False, True, False, True, False, True]
    assert out.mask["y@10"].tolist() == [True, False, True, False, False, False]  # NaN label -> missing
    assert out.y["y@10"].tolist() == [1.0, 0.0, 3.0, 0.0, 0.0, 0.0]
    # at most one task present per row
    assert (out.mask["y@2"].int() + out.mask["y@10"].int()).max() == 1
    with pytest.raises(ValueError, match=r"task column 'task' has value\(s\) '7' that were not in the training data"):
        enc.transform(pd.DataFrame({"f": [1.0], "task": [7], "y": [1.0]}))


def test_task_column_needs_exactly_one_target() -> None:
    with pytest.raises(ValueError, match="task_column='task' needs exactly one target spec"):
        TableEncoder(["a:regression", "b:regression"], task_column="task")


def test_mtl_regression_pair_computer(data_dir: Path) -> None:
    folder = "mtl-regression/computer"
    data = resolve(f"{folder}/computer_data.csv")  # sha256-checked
    target = resolve(f"{folder}/computer_target.csv")
    df = load_task_column_pair(data, target, "task")
    assert df.shape == (3800, 15) and df.columns[-1] == "0"
    enc = TableEncoder(["0:regression"], task_column="task").fit(df)
    assert len(enc.tasks) == 190 and enc.tasks[0].name == "0@0" and enc.tasks[-1].name == "0@189"
    out = enc.transform(df)
    assert sum(int(m.sum()) for m in out.mask.values()) == 3800
    with pytest.raises(ValueError, match=r"has 3800 rows but .* has 4177"):
        load_task_column_pair(data, resolve("mtl-regression/abalone/abalone_target.csv"), "task")


# ----------------------------------------------------------------------------- errors
def test_unknown_columns_name_close_matches() -> None:
    df = _frame()
    with pytest.raises(ColumnError, match=r"target column 'clickd' .*did you mean 'clicked'\?\); available"):
        TableEncoder(["clickd:binary"]).fit(df)
    with pytest.raises(ColumnError, match=r"unknown numeric column 'agee' .*did you mean 'age'"):
        TableEncoder(["clicked"], numeric=["agee"]).fit(df)
    with pytest.raises(ColumnError, match=r"unknown task column 'tsk'"):
        TableEncoder(["price"], task_column="tsk").fit(df)
    err = ColumnError("plain message")
    assert str(err) == "plain message"  # no KeyError quotes


def test_duplicate_columns_and_task_names() -> None:
    df = pd.DataFrame([[1, 2, 0], [3, 4, 1]], columns=["a", "a", "y"])
    with pytest.raises(ValueError, match=r"training data: duplicate column name\(s\) 'a'"):
        TableEncoder(["y"]).fit(df)
    with pytest.raises(ValueError, match=r"duplicate task name\(s\) 'y'; each target may be given once"):
        TableEncoder(["y:binary", "y:multiclass"])


def test_single_class_and_no_labels() -> None:
    df = pd.DataFrame({"x": [1, 2, 3], "one": ["a", "a", None], "none": [np.nan] * 3})
    with pytest.raises(ValueError, match="target 'one' has a single class 'a' in the training data"):
        TableEncoder(["one:binary"]).fit(df)
    with pytest.raises(ValueError, match="target 'one' has a single class"):
        TableEncoder(["one"]).fit(df)
    with pytest.raises(ValueError, match="target 'none' has no labels in the training data"):
        TableEncoder(["none:regression"]).fit(df)
    with pytest.raises(ValueError, match="target 'none' has no labels"):
        TableEncoder(["none"]).fit(df)


def test_text_in_numeric_column_names_value_and_row() -> None:
    df = pd.DataFrame({"v": ["1.5", "2", "oops", "4"], "y": [0, 1, 0, 1]})
    with pytest.raises(ValueError, match=r"numeric column 'v' must be numeric but holds text 'oops' at row 2"):
        TableEncoder(["y"], numeric=["v"]).fit(df)
    enc = TableEncoder(["y"]).fit(pd.DataFrame({"v": [1.0, 2.0], "y": [0, 1]}))
    with pytest.raises(ValueError, match="'v' must be numeric but holds text 'n/a!'"):
        enc.transform_features(pd.DataFrame({"v": ["3", "n/a!"]}))
    with pytest.raises(ValueError, match="regression target 'y' must be numeric but holds text 'high'"):
        TableEncoder(["y:regression"]).fit(pd.DataFrame({"x": [1, 2], "y": ["1.0", "high"]}))


def test_transform_checks_columns() -> None:
    df = _frame()
    enc = TableEncoder(TASKS, drop=["member"]).fit(df)
    with pytest.raises(ColumnError, match=r"lacks feature column\(s\) 'age', 'city' that the model was trained on"):
        enc.transform_features(df.drop(columns=["age", "city"]))
    with pytest.raises(ValueError, match=r"column\(s\) 'id' that are neither features nor targets.*drop them"):
        enc.transform_features(df.assign(id=1))
    with pytest.raises(ColumnError, match=r"lacks target/task column\(s\) 'price'"):
        enc.transform(df.drop(columns=["price"]))
    # features only: targets may be absent, dropped columns may be present or absent
    feats = enc.transform_features(df[["age", "score", "city"]])
    assert feats["num"].shape == (40, 2) and set(feats) == {"num", "cat"}
    with pytest.raises(ValueError, match=r"label '9' that is not among the training classes"):
        enc.transform(df.assign(grade=9))
    with pytest.raises(RuntimeError, match="not fitted"):
        TableEncoder(TASKS).transform(df)


# ----------------------------------------------------------------------------- splits and load_table
def test_split_indices() -> None:
    tr, va, te = split_indices(100, 0.1, 0.2, seed=3)
    assert (len(tr), len(va), len(te)) == (70, 10, 20)
    assert sorted(np.concatenate([tr, va, te]).tolist()) == list(range(100))
    again = split_indices(100, 0.1, 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((tr, va, te), again, strict=True))
    assert not np.array_equal(tr, split_indices(100, 0.1, 0.2, seed=4)[0])
    groups = np.repeat(np.arange(10), [1, 2, 3, 4, 10, 10, 10, 10, 20, 30])
    tr, va, te = split_indices(len(groups), 0.2, 0.2, seed=0, groups=groups)
    assert set(groups[tr]) == set(range(10))  # every task keeps a training row
    with pytest.raises(ValueError, match="must be in"):
        split_indices(10, 0.6, 0.6)


def test_load_table_single_file(tmp_path: Path) -> None:
    df = _frame(100)
    df.to_csv(tmp_path / "clicks.csv.gz", index=False)
    bundle = load_table(tmp_path / "clicks.csv.gz", TASKS, seed=1)
    assert isinstance(bundle, DataBundle) and bundle.name == "clicks"
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (80, 10, 10)
    assert bundle.meta["split"]["train"] == 80
    assert [t.name for t in bundle.tasks] == ["clicked", "grade", "price"]
    # the encoder saw the training rows only
    tr, _, _ = split_indices(100, 0.1, 0.1, seed=1)
    train_age = read_table(tmp_path / "clicks.csv.gz")["age"].to_numpy()[tr]
    assert bundle.encoder.num_stats["age"][1] == pytest.approx(train_age.mean())
    again = load_table(tmp_path / "clicks.csv.gz", TASKS, seed=1)
    assert torch.equal(again.val.x["num"], bundle.val.x["num"])


def test_load_table_with_files(tmp_path: Path) -> None:
    _frame(50, seed=0).to_csv(tmp_path / "train.csv", index=False)
    _frame(20, seed=1).to_parquet(tmp_path / "val.parquet")
    _frame(30, seed=2).to_csv(tmp_path / "test.tsv", sep="\t", index=False)
    b = load_table(tmp_path / "train.csv", TASKS, val=tmp_path / "val.parquet", test=tmp_path / "test.tsv")
    assert (len(b.train), len(b.val), len(b.test)) == (50, 20, 30)
    b2 = load_table(tmp_path / "train.csv", TASKS, test_fraction=0)
    assert b2.test is None and (len(b2.train), len(b2.val)) == (45, 5)
    with pytest.raises(ValueError, match="no validation split"):
        load_table(tmp_path / "train.csv", TASKS, val_fraction=0)


def test_load_table_task_column_stratified(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    task = np.repeat([1, 2, 3], [3, 30, 60])
    pd.DataFrame({"f": rng.normal(size=93), "task": task, "y": rng.normal(size=93)}).to_csv(
        tmp_path / "t.csv", index=False
    )
    b = load_table(tmp_path / "t.csv", ["y:regression"], task_column="task", val_fraction=0.3, test_fraction=0.3)
    assert [t.name for t in b.tasks] == ["y@1", "y@2", "y@3"]
    assert all(int(m.sum()) >= 1 for m in b.train.mask.values())
    assert b.meta["split"]["stratified_by"] == "task"


def _levels_frame() -> pd.DataFrame:
    # 'gain': 0 (x6), 500 (x3), 7 (x1), missing (x1); 'age': all distinct except 30 (x2)
    return pd.DataFrame(
        {
            "gain": [0.0, 0, 0, 500, 0, 500, 7, 0, 500, 0, np.nan],
            "age": [30.0, 31, 32, 33, 34, 35, 36, 37, 38, 30, 40],
            "city": ["a", "b"] * 5 + ["a"],
            "y": [0, 1] * 5 + [1],
        }
    )


def test_numeric_levels_embed_frequent_exact_values() -> None:
    df = _levels_frame()
    enc = TableEncoder(["y:binary"], numeric_levels=3).fit(df)
    assert enc.levels == {"gain": [0.0, 500.0]}  # age has no value seen 3 times: no level column for it
    # city, then one level column for gain: 2 levels + the rare/unseen/missing id 0
    assert enc.input_spec.cardinalities == (3, 3)
    assert enc.input_spec.n_numeric == 2  # the standardised values stay
    new = pd.DataFrame({"gain": [0.0, 500.0, 7.0, 123.0, np.nan], "age": [30.0] * 5, "city": ["a"] * 5})
    ids = enc.transform_features(new)["cat"][:, 1].tolist()
    assert ids == [1, 2, 0, 0, 0]  # frequent values get ids; rare (7), unseen (123) and missing -> 0


def test_numeric_levels_min_count_and_off_by_default() -> None:
    df = _levels_frame()
    enc = TableEncoder(["y:binary"], numeric_levels=2).fit(df)
    assert enc.levels == {"gain": [0.0, 500.0], "age": [30.0]}
    assert enc.input_spec.cardinalities == (3, 3, 2)  # city, gain levels, age levels (numeric-column order)
    one = TableEncoder(["y:binary"], numeric_levels=1).fit(df)
    assert one.levels["gain"] == [0.0, 7.0, 500.0]  # every observed value
    plain = TableEncoder(["y:binary"]).fit(df)
    assert plain.levels == {} and plain.input_spec.cardinalities == (3,)
    with pytest.raises(ValueError, match="numeric_levels"):
        TableEncoder(["y:binary"], numeric_levels=-1)


def test_numeric_levels_follow_bins_and_round_trip() -> None:
    df = _levels_frame()
    enc = TableEncoder(["y:binary"], numeric_bins=2, numeric_levels=3).fit(df)
    # city, bin columns (gain, age), then the level column (gain)
    assert len(enc.input_spec.cardinalities) == 4
    assert enc.input_spec.cardinalities[-1] == 3
    x = enc.transform_features(df)
    assert x["cat"][:, -1].tolist() == [1, 1, 1, 2, 1, 2, 0, 1, 2, 1, 0]
    doc = json.loads(json.dumps(enc.to_dict()))
    again = TableEncoder.from_dict(doc)
    assert again.numeric_levels == 3 and again.levels == enc.levels
    assert again.input_spec == enc.input_spec
    assert torch.equal(again.transform_features(df)["cat"], x["cat"])
    assert torch.equal(again.transform_features(df)["num"], x["num"])
    # states saved before the option existed still load (no levels)
    old = TableEncoder(["y:binary"]).fit(df).to_dict()
    del old["config"]["numeric_levels"]
    assert TableEncoder.from_dict(old).levels == {}


def test_load_table_passes_numeric_levels(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    pd.concat([_levels_frame()] * 4, ignore_index=True).to_csv(path, index=False)
    bundle = load_table(path, ["y:binary"], numeric_levels=3, seed=0)
    assert "gain" in bundle.encoder.levels
    assert bundle.train.x["cat"].shape[1] == len(bundle.input_spec.cardinalities)
