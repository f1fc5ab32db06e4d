"""Census-Income (MMoE task groups) on the real file, and the data-dir / sha256 machinery."""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path

import pytest
import torch

from polytask.data import (
    DATASETS,
    DataBundle,
    DataIntegrityError,
    _datadir,
    cache_dir,
    data_dir,
    load_dataset,
    verify_file,
)
from polytask.data.census import CENSUS_FILE, COLLEGE_OR_ABOVE, census_frame, census_income

N_ROWS = 99_762


@pytest.fixture(scope="module")
def census(data_dir: Path) -> DataBundle:
    if not (data_dir / CENSUS_FILE).is_file():
        pytest.skip(f"{CENSUS_FILE} not in the data mirror")
    return load_dataset("census-income")


# ----------------------------------------------------------------------------- census
def test_file_counts_and_targets(census: DataBundle) -> None:
    df = census_frame()
    assert len(df) == N_ROWS
    # positives in the whole public test file (MMoE targets)
    assert int(df["income"].sum()) == 6_186  # 6.20 %
    assert int(df["marital"].sum()) == 43_143  # 43.25 %
    assert int(df["education"].sum()) == 33_410  # 33.49 %
    assert census_frame() is df  # parsed once per process


def test_split_sizes_and_rates(census: DataBundle) -> None:
    assert (len(census.train), len(census.val), len(census.test)) == (59_858, 19_952, 19_952)
    assert census.meta["split"]["train"] == 59_858 and census.meta["split"]["seed"] == 0
    rates = {t: float(census.train.y[t].mean()) for t in ("income", "marital", "education")}
    assert rates["income"] == pytest.approx(0.0620, abs=0.005)
    assert rates["marital"] == pytest.approx(0.4325, abs=0.01)
    assert rates["education"] == pytest.approx(0.3349, abs=0.01)
    for split in (census.train, census.val, census.test):
        assert all(bool(m.all()) for m in split.mask.values())  # no missing labels in census
        assert split.y["income"].dtype == torch.float32


def test_targets_and_weight_are_not_inputs(census: DataBundle) -> None:
    enc = census.encoder
    forbidden = {"income", "marital stat", "marital", "education", "instance weight"}
    assert not forbidden & set(enc.feature_columns)
    assert len(enc.feature_columns) == 42 - 4
    assert enc.num_cols == [
        "age",
        "wage per hour",
        "capital gains",
        "capital losses",
        "dividends from stocks",
        "num persons worked for employer",
        "weeks worked in year",
    ]
    assert census.input_spec.n_numeric == 7 and len(census.input_spec.cardinalities) == 31
    assert [t.name for t in census.tasks] == ["income", "marital", "education"]
    assert all(t.classes == ("0", "1") for t in census.tasks)
    # the education set is the 7 post-secondary levels, spelled as in the file
    assert len(COLLEGE_OR_ABOVE) == 7 and "Some college but no degree" in COLLEGE_OR_ABOVE


def test_task_groups_and_subsampling(data_dir: Path) -> None:
    if not (data_dir / CENSUS_FILE).is_file():
        pytest.skip(f"{CENSUS_FILE} not in the data mirror")
    assert {"census-income", "census-group1", "census-group2"} <= set(DATASETS)
    g1 = load_dataset("census-group1", n_rows=1000)
    g2 = load_dataset("census-group2", n_rows=1000)
    assert [t.name for t in g1.tasks] == ["income", "marital"]
    assert [t.name for t in g2.tasks] == ["education", "marital"]
    assert (len(g1.train), len(g1.val), len(g1.test)) == (600, 200, 200)
    assert g1.input_spec.n_numeric == g2.input_spec.n_numeric == 7  # same inputs for both groups
    # same seed, same rows and labels; another seed, other rows
    assert torch.equal(g1.train.y["marital"], g2.train.y["marital"])
    again = census_income(n_rows=1000)
    assert torch.equal(again.val.x["cat"], load_dataset("census-income", n_rows=1000).val.x["cat"])
    other = census_income(n_rows=1000, seed=1)
    assert not torch.equal(other.train.x["num"], again.train.x["num"])
    with pytest.raises(ValueError, match="n_rows must be between 10 and 99762"):
        census_income(n_rows=5)


def test_tampered_file_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / CENSUS_FILE
    fake.parent.mkdir(parents=True)
    with gzip.open(fake, "wt") as f:
        f.write(", ".join(["1"] * 41 + ["- 50000."]) + "\n")
    with pytest.raises(DataIntegrityError, match=r"census-income\.test\.gz: sha256 mismatch \(expected 5ac4cacd"):
        census_income(data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"data file not found: .*census-income\.test\.gz; set POLYTASK_DATA"):
        census_income(data_dir=tmp_path / "empty")


# ----------------------------------------------------------------------------- data dir and hashes
def test_data_and_cache_dirs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POLYTASK_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("POLYTASK_CACHE", str(tmp_path / "c"))
    assert data_dir() == tmp_path / "d"
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()  # created on demand
    monkeypatch.delenv("POLYTASK_DATA")
    assert data_dir().name == "data" and "polytask" in str(data_dir())


def test_known_hashes_match_the_mirror_list(data_dir: Path) -> None:
    sums = data_dir / "SHA256SUMS"
    if not sums.is_file():
        pytest.skip("no SHA256SUMS in the data mirror")
    listed = {}
    for line in sums.read_text().splitlines():
        digest, name = line.split(maxsplit=1)
        listed[name.removeprefix("./")] = digest
    for rel, digest in _datadir.KNOWN_SHA256.items():
        assert listed[rel] == digest, rel


def test_verify_file_caches_and_detects_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "f.bin"
    path.write_bytes(b"hello")
    good = hashlib.sha256(b"hello").hexdigest()
    assert _datadir.sha256_file(path) == good
    calls = []
    real = _datadir.sha256_file
    monkeypatch.setattr(_datadir, "sha256_file", lambda p: calls.append(p) or real(p))
    verify_file(path, good)
    verify_file(path, good)
    assert len(calls) == 1  # second check served from the in-process cache
    path.write_bytes(b"hellO, longer")  # size (and content) changed -> rehash
    with pytest.raises(DataIntegrityError, match=r"f\.bin: sha256 mismatch .*re-download or restore the original file"):
        verify_file(path, good)
    assert len(calls) == 2
    assert issubclass(DataIntegrityError, ValueError)


def test_resolve(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "a.txt").write_bytes(b"a")
    assert _datadir.resolve("x/a.txt", root=tmp_path) == tmp_path / "x" / "a.txt"  # no known hash: unverified
    with pytest.raises(DataIntegrityError):
        _datadir.resolve("x/a.txt", sha256="0" * 64, root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"x/b\.txt; set POLYTASK_DATA to the folder that holds 'x/b\.txt'"):
        _datadir.resolve("x/b.txt", root=tmp_path)
