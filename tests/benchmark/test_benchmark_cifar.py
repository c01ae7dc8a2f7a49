"""CIFAR-10 python batches: restricted unpickling, class filter, standardisation."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _benchmark_files import write_cifar

from tdabench.benchmark import get_setting
from tdabench.benchmark.data import CIFAR10_MEAN, CIFAR10_STD, load_cifar, read_cifar_batch
from tdabench.errors import DataError, UnsafeFileError


class _Evil:
    """Unpickling this calls os.system, which would create ``self.path``."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


class _EvilOpen:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_real_layout_batch_is_read(tmp_path: Path) -> None:
    written = write_cifar(tmp_path)
    raw = (tmp_path / "data_batch_1").read_bytes()
    assert b"numpy.core.multiarray\n_reconstruct" in raw  # the global a real (Python 2) batch uses
    x, y = read_cifar_batch(tmp_path / "data_batch_1")
    d = written["data_batch_1"]
    assert x.shape == (30, 3, 32, 32) and x.dtype == np.uint8
    np.testing.assert_array_equal(x.reshape(30, -1), d[b"data"])
    np.testing.assert_array_equal(y, d[b"labels"])
    x3, _ = read_cifar_batch(tmp_path / "data_batch_3")  # str keys, protocol 4
    np.testing.assert_array_equal(x3.reshape(30, -1), written["data_batch_3"]["data"])


@pytest.mark.parametrize("evil_cls", [_Evil, _EvilOpen])
@pytest.mark.parametrize("protocol", [2, 4])
def test_malicious_batch_is_refused_and_runs_nothing(
    tmp_path: Path, evil_cls, protocol: int
) -> None:
    marker = tmp_path / "pwned"
    payload = {b"data": evil_cls(marker), b"labels": [0]}
    (tmp_path / "data_batch_1").write_bytes(pickle.dumps(payload, protocol=protocol))
    with pytest.raises(UnsafeFileError, match="refused"):
        read_cifar_batch(tmp_path / "data_batch_1")
    assert not marker.exists()
    # sanity: plain pickle would have run it (proves the payload is live)
    if evil_cls is _Evil:
        pickle.loads(pickle.dumps(payload, protocol=protocol))
        assert marker.exists()


def test_malformed_batches_are_data_errors(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(pickle.dumps([1, 2, 3]))
    with pytest.raises(DataError, match="not the dict"):
        read_cifar_batch(tmp_path / "a")
    (tmp_path / "b").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 10), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(DataError, match=r"\(N, 3072\)"):
        read_cifar_batch(tmp_path / "b")
    (tmp_path / "c").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError):
        read_cifar_batch(tmp_path / "c")


def test_cifar2_filters_relabels_and_standardises(cifar_root: Path) -> None:
    root = cifar_root / "cifar-10-batches-py"
    parts = [read_cifar_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    xs = np.concatenate([p[0] for p in parts])
    ys = np.concatenate([p[1] for p in parts])
    keep = np.isin(ys, (3, 5))
    n = int(keep.sum()) - 1
    d = load_cifar(cifar_root, n, 3, classes=(3, 5))  # parent folder works too
    assert d.train[0].shape == (n, 3, 32, 32) and d.train[0].dtype == torch.float32
    np.testing.assert_array_equal(d.train[1].numpy(), (ys[keep][:n] == 5).astype(np.int64))
    mean = np.asarray(CIFAR10_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(CIFAR10_STD, np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(
        d.train[0].numpy(), (xs[keep][:n] / 255.0 - mean) / std, rtol=1e-5, atol=1e-5
    )
    assert d.meta["class_names"] == ["cat", "dog"] and len(d.meta["files"]) == 6
    with pytest.raises(DataError, match="lower n_train"):
        load_cifar(cifar_root, n + 2, 3, classes=(3, 5))


def test_cifar_tiny_settings_load_from_data_root(cifar_root: Path) -> None:
    d2 = get_setting("cifar2_resnet9_tiny", n_train=10, n_test=4).load(data_root=cifar_root)
    assert set(d2.train[1].tolist()) <= {0, 1}
    d10 = get_setting("cifar10_resnet9_tiny").load(data_root=cifar_root / "cifar-10-batches-py")
    assert (d10.n_train, d10.n_test) == (64, 16)
    model = get_setting("cifar10_resnet9_tiny").build_model().eval()
    assert model(d10.train[0][:3]).shape == (3, 10)


def test_missing_cifar_names_path_and_data_root(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        get_setting("cifar2_resnet9").load()
    assert "data_root" in str(err.value) and "cifar-10-python" in str(err.value)
    (tmp_path / "data_batch_1").write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_2") as err:
        get_setting("cifar10_resnet9_tiny").load(data_root=tmp_path)
    assert str(tmp_path) in str(err.value)
