"""Shared pieces of the benchmark data loaders: the data container, hashing, label noise."""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tdabench.errors import ConfigError, DataError, ShapeError

__all__ = [
    "BenchmarkData",
    "describe_files",
    "flip_labels",
    "import_optional",
    "require_path",
    "sha256_file",
    "sha256_tensors",
]


def import_optional(module: str, missing: str) -> Any:
    """``importlib.import_module(module)`` of an optional dependency.

    Raises:
        DataError: ``module`` is not installed; ``missing`` is the message (it names the PyPI
            package and the alternative).
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise DataError(missing) from exc


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def sha256_tensors(tensors: Iterable[Tensor]) -> str:
    """Hex SHA-256 over the dtype, shape and bytes of each tensor (any shape), in order."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def require_path(path: str | os.PathLike, what: str, setting: str | None = None) -> Path:
    """Return ``path`` as a ``Path`` or raise a :class:`DataError` naming it and the fix."""
    p = Path(path).expanduser()
    if not p.exists():
        how = (
            f"get_setting({setting!r}).load(data_root=...)" if setting else "the data_root argument"
        )
        raise DataError(
            f"{what} not found at {str(p)!r}; put the files there or pass their folder with {how}"
        )
    return p


@dataclass
class BenchmarkData:
    """The train and test tensors of one benchmark setting plus their identity.

    Attributes:
        train: ``(inputs, labels)`` with leading dimension ``n_train``. Classification inputs are
            float32 (``(n, 784)`` for MNIST, ``(n, 3, 32, 32)`` for CIFAR), labels int64 ``(n,)``.
            Sequence inputs and labels are int64 token ids ``(n, T)``; labels are the inputs
            shifted by one token.
        test: the same for the test split, leading dimension ``n_test``.
        meta: JSON-able data identity: ``source``, ``files`` (relative name -> sha256 of the raw
            files read), ``split`` (how the samples were chosen, with its seed), ``n_train``,
            ``n_test``, ``tensors_sha256`` (hash of all four tensors), and source-specific keys.
    """

    train: tuple[Tensor, ...]
    test: tuple[Tensor, ...]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, split in (("train", self.train), ("test", self.test)):
            if len(split) < 2:
                raise ShapeError(
                    f"BenchmarkData.{name} must be (inputs, labels); got {len(split)} tensors"
                )
            n = split[0].shape[0]
            if any(t.shape[0] != n for t in split):
                raise ShapeError(
                    f"BenchmarkData.{name} tensors disagree on the leading dimension: "
                    f"{[tuple(t.shape) for t in split]}; every tensor needs one row per sample"
                )
            if n == 0:
                raise DataError(
                    f"BenchmarkData.{name} is empty; check data_root and the requested sizes"
                )
        self.meta.setdefault("n_train", int(self.train[0].shape[0]))
        self.meta.setdefault("n_test", int(self.test[0].shape[0]))
        self.meta.setdefault("tensors_sha256", sha256_tensors((*self.train, *self.test)))

    @property
    def n_train(self) -> int:
        """Training samples: ``train[0].shape[0]``."""
        return int(self.train[0].shape[0])

    @property
    def n_test(self) -> int:
        """Test samples: ``test[0].shape[0]``."""
        return int(self.test[0].shape[0])

    def train_dataset(self) -> torch.utils.data.TensorDataset:
        """The training split as a ``TensorDataset`` of ``(inputs (n, ...), labels (n, ...))``
        (index order = sample index)."""
        return torch.utils.data.TensorDataset(*self.train)

    def test_dataset(self) -> torch.utils.data.TensorDataset:
        """The test split as a ``TensorDataset`` of ``(inputs (n, ...), labels (n, ...))``."""
        return torch.utils.data.TensorDataset(*self.test)

    def with_noisy_labels(self, fraction: float, num_classes: int, seed: int) -> BenchmarkData:
        """A copy whose training labels are flipped by :func:`flip_labels`.

        The flipped indices, fraction and seed are stored in ``meta["label_noise"]`` and the
        data hash is recomputed, so a noisy variant never shares an identity with the clean one.
        """
        inputs, labels, *rest = self.train
        noisy, idx = flip_labels(labels, fraction, num_classes, seed)
        meta = {k: v for k, v in self.meta.items() if k != "tensors_sha256"}
        meta["label_noise"] = {
            "fraction": float(fraction),
            "seed": int(seed),
            "flipped_indices": idx.tolist(),
        }
        return BenchmarkData(train=(inputs, noisy, *rest), test=self.test, meta=meta)


def flip_labels(
    labels: Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Flip a fraction of class labels to a different class, reproducibly.

    ``round(fraction * n)`` indices are drawn without replacement; each chosen label is
    replaced by a uniformly drawn *different* class (``(y + k) mod C`` with ``k`` in ``1..C-1``).

    Args:
        labels: int64 ``(n,)`` class labels in ``[0, num_classes)``.
        fraction: share of labels to flip, in ``[0, 1]``.
        num_classes: number of classes ``C >= 2``.
        seed: seed of the draw (a private ``torch.Generator``; the global RNG is untouched).

    Returns:
        ``(noisy, flipped)``: noisy labels ``(n,)`` and the sorted flipped indices ``(k,)`` int64.
    """
    if not isinstance(labels, Tensor) or labels.dim() != 1:
        raise ShapeError("flip_labels needs a 1-D label tensor (n,)")
    if not 0.0 <= float(fraction) <= 1.0:
        raise ConfigError(f"fraction must lie in [0, 1], got {fraction}")
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes must be >= 2 to flip labels, got {num_classes}")
    labels = labels.to(torch.int64)
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DataError(
            f"labels must lie in [0, {num_classes}); got range [{int(labels.min())}, {int(labels.max())}]"
        )
    n = labels.numel()
    k = round(float(fraction) * n)
    gen = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(n, generator=gen)[:k].sort().values
    shift = torch.randint(1, int(num_classes), (k,), generator=gen)
    noisy = labels.clone()
    noisy[idx] = (labels[idx] + shift) % int(num_classes)
    return noisy, idx


def take_first(arr: np.ndarray, n: int, what: str, setting: str | None) -> np.ndarray:
    """``arr[:n]`` or a DataError when fewer than ``n`` rows exist."""
    if arr.shape[0] < n:
        raise DataError(
            f"{what} has only {arr.shape[0]} samples but {n} were requested"
            + (f" by {setting!r}" if setting else "")
            + "; lower n_train/n_test (get_setting(name, n_train=...)) or use the full data files"
        )
    return arr[:n]


def describe_files(files: Mapping[str, Path]) -> dict[str, dict[str, str]]:
    """``{key: {"name": file name, "sha256": hex}}`` of the raw files read, sorted by key."""
    return {
        key: {"name": Path(p).name, "sha256": sha256_file(p)} for key, p in sorted(files.items())
    }
