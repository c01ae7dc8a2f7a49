"""Shared pieces of the dattri-compatible ``train_*`` / ``loss_*`` helpers."""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from tdabench.benchmark.settings import get_setting
from tdabench.errors import DataError
from tdabench.groundtruth.optim import make_torch_optimizer, normalize_recipe
from tdabench.task import load_state_dict

__all__ = [
    "LabelledDataset",
    "evaluate_per_sample",
    "load_weights",
    "per_sample_ce",
    "saved_model_values",
    "seed_everything",
    "setting_optimizer",
    "train_epochs",
    "train_seeded",
]


class LabelledDataset(TensorDataset):
    """A ``TensorDataset`` of ``(inputs, labels)`` that also exposes ``.data`` and ``.targets``.

    Args:
        inputs: ``(n, ...)`` samples.
        labels: ``(n, ...)`` labels (class ids, or next-token ids for sequences).
    """

    def __init__(self, inputs: Tensor, labels: Tensor) -> None:
        super().__init__(inputs, labels)

    @property
    def data(self) -> Tensor:
        """The inputs ``(n, ...)``."""
        return self.tensors[0]

    @property
    def targets(self) -> Tensor:
        """The labels ``(n, ...)``."""
        return self.tensors[1]


def seed_everything(seed: int) -> None:
    """Seed torch, NumPy and ``random`` as dattri's training helpers do (model init, dropout, shuffling)."""
    torch.manual_seed(int(seed))
    np.random.seed(int(seed) % 2**32)  # dattri's helpers seed the global NumPy RNG too
    random.seed(int(seed))


def setting_optimizer(setting: str, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimiser of a benchmark setting's recipe (optimizer, lr, momentum, betas)."""
    return make_torch_optimizer(normalize_recipe(get_setting(setting).recipe), params)


def train_epochs(
    model: nn.Module,
    dataloader: Iterable[Any],
    optimizer: torch.optim.Optimizer,
    epochs: int,
    device: str | torch.device,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> nn.Module:
    """Plain minibatch training: ``epochs`` passes over ``dataloader`` of ``(inputs, labels)``."""
    model.to(device)
    model.train()
    steps = 0
    for _ in range(int(epochs)):
        for batch in dataloader:
            inputs, labels = batch[0].to(device), batch[1].to(device)
            optimizer.zero_grad()
            loss_fn(model(inputs), labels).backward()
            optimizer.step()
            steps += 1
    if steps == 0 and int(epochs) > 0:
        raise DataError("the training dataloader is empty; pass a loader over at least one sample")
    return model


def load_weights(
    model: nn.Module, model_path: str | os.PathLike, device: str | torch.device
) -> nn.Module:
    """Load a state dict file (safetensors, or torch with ``weights_only=True``) into ``model``; eval mode."""
    model.load_state_dict(load_state_dict(model_path))
    model.to(device)
    model.eval()
    return model


def evaluate_per_sample(
    model: nn.Module,
    dataloader: Iterable[Any],
    device: str | torch.device,
    value_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """``value_fn(model(inputs), labels) -> (B,)`` over the loader, concatenated on the CPU: ``(n,)``."""
    out = []
    with torch.no_grad():
        for batch in dataloader:
            inputs, labels = batch[0].to(device), batch[1].to(device)
            out.append(value_fn(model(inputs), labels).detach().cpu())
    if not out:
        raise DataError("the dataloader is empty; pass a loader over at least one sample")
    return torch.cat(out)


def per_sample_ce(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each sample: logits ``(B, C)``, labels ``(B,)`` -> ``(B,)``."""
    return F.cross_entropy(logits, labels, reduction="none")


def train_seeded(
    make_model: Callable[[], nn.Module],
    seed: int,
    setting: str,
    dataloader: Iterable[Any],
    epochs: int,
    device: str | torch.device,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
) -> nn.Module:
    """Seed (:func:`seed_everything`), create the model, then :func:`train_epochs` it with the
    optimiser of ``setting``'s recipe (:func:`setting_optimizer`), as dattri's ``train_*`` do.
    ``loss_fn(outputs (B, ...), labels (B, ...)) -> scalar``."""
    seed_everything(seed)
    model = make_model()
    opt = setting_optimizer(setting, model.parameters())
    return train_epochs(model, dataloader, opt, epochs, device, loss_fn)


def saved_model_values(
    model: nn.Module,
    model_path: str | os.PathLike,
    dataloader: Iterable[Any],
    device: str | torch.device,
    value_fn: Callable[[Tensor, Tensor], Tensor],
) -> Tensor:
    """:func:`evaluate_per_sample` ``(n,)`` of ``model`` with the weights at ``model_path``."""
    return evaluate_per_sample(
        load_weights(model, model_path, device), dataloader, device, value_fn
    )
