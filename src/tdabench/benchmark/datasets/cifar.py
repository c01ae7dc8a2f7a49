"""CIFAR helpers with dattri's names: CIFAR-2 / CIFAR-10 data, ResNet-9, ``train_*`` and ``loss_*``.

Data are read from the CIFAR-10 python batches at a path you give (never downloaded). The
model and recipe are the ``cifar2_resnet9`` setting's (:class:`tdabench.benchmark.models.ResNet9`,
SGD lr 0.01 momentum 0.9, 10 epochs). dattri's ResNet-9 is a different implementation; its
state dicts do not load into this one.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn.functional as F
from torch import Tensor

from tdabench.benchmark.data import find_cifar_batches, load_cifar, read_cifar_batch
from tdabench.benchmark.datasets._common import (
    LabelledDataset,
    per_sample_ce,
    saved_model_values,
    train_seeded,
)
from tdabench.benchmark.models import ResNet9
from tdabench.benchmark.settings import get_setting
from tdabench.errors import DataError

__all__ = [
    "create_cifar2_dataset",
    "create_cifar_dataset",
    "create_resnet9_model",
    "loss_cifar_resnet9",
    "train_cifar_resnet9",
]


def _require(path: str | os.PathLike) -> Path:
    root = Path(path)
    if not root.exists():
        raise DataError(
            f"no CIFAR-10 data at {str(root)!r}: tdabench never downloads. Extract cifar-10-python.tar.gz "
            "(from the CIFAR-10 page) so that the folder holds data_batch_1..5 and test_batch "
            "(or their cifar-10-batches-py folder), then pass that folder"
        )
    return root


def _count(files: dict[str, Path], names: tuple[str, ...], classes: tuple[int, ...] | None) -> int:
    labels = np.concatenate([read_cifar_batch(files[n])[1] for n in names])
    return int(labels.size if classes is None else np.isin(labels, classes).sum())


def _datasets(
    path: str | os.PathLike, classes: tuple[int, ...] | None
) -> tuple[LabelledDataset, LabelledDataset]:
    """Every image of the batches (after the class filter), in file order."""
    files = find_cifar_batches(_require(path))
    n_train = _count(files, tuple(f"data_batch_{i}" for i in range(1, 6)), classes)
    n_test = _count(files, ("test_batch",), classes)
    data = load_cifar(path, n_train, n_test, classes)
    return LabelledDataset(*data.train[:2]), LabelledDataset(*data.test[:2])


def create_cifar2_dataset(path: str | os.PathLike) -> tuple[LabelledDataset, LabelledDataset]:
    """CIFAR-2: every cat (label 0) and dog (label 1) image of CIFAR-10 (10,000 / 2,000).

    Args:
        path: folder with the CIFAR-10 python batches (``data_batch_1..5``, ``test_batch``).

    Returns:
        ``(train, test)`` datasets of ``(image (3, 32, 32) float32, label int64)``, standardised
        with CIFAR-10's channel mean and std (the benchmark settings' transform; dattri maps to
        ``[-1, 1]`` instead).

    Raises:
        DataError: the folder or a batch file is missing.
    """
    return _datasets(path, get_setting("cifar2_resnet9").data_config["classes"])


def create_cifar_dataset(path: str | os.PathLike) -> tuple[LabelledDataset, LabelledDataset]:
    """CIFAR-10: the 50,000 / 10,000 images, read like :func:`create_cifar2_dataset`."""
    return _datasets(path, None)


def create_resnet9_model(num_classes: int = 2) -> ResNet9:
    """A fresh ResNet-9 of the ``cifar2_resnet9`` setting with ``num_classes`` outputs."""
    return ResNet9(num_classes=int(num_classes), **get_setting("cifar2_resnet9").model_config)


def train_cifar_resnet9(
    dataloader: Iterable[Any],
    seed: int = 0,
    device: str = "cpu",
    num_classes: int = 2,
    num_epochs: int = 10,
) -> ResNet9:
    """Train :func:`create_resnet9_model` with the ``cifar2_resnet9`` recipe.

    Args:
        dataloader: yields ``(images (B, 3, 32, 32), labels (B,))``.
        seed: seeds torch, NumPy and ``random`` before the model is created.
        device: training device.
        num_classes: model outputs.
        num_epochs: passes over ``dataloader``.

    Returns:
        The trained model (train mode, on ``device``).
    """
    return train_seeded(
        lambda: create_resnet9_model(num_classes),
        seed,
        "cifar2_resnet9",
        dataloader,
        num_epochs,
        device,
        F.cross_entropy,
    )


def loss_cifar_resnet9(
    model_path: str | os.PathLike,
    dataloader: Iterable[Any],
    device: str = "cpu",
    num_classes: int = 2,
) -> Tensor:
    """Per-sample cross-entropy ``(n,)`` of the saved ResNet-9 (eval mode) over ``dataloader``."""
    model = create_resnet9_model(num_classes)
    return saved_model_values(model, model_path, dataloader, device, per_sample_ce)
