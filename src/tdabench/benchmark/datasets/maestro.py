"""MAESTRO helpers with dattri's names: event-token data, the Music Transformer, ``train_*`` and ``loss_*``.

Model and recipe are the ``maestro_musictransformer`` setting's (6 layers, 8 heads, d 512,
ff 1024, relative attention; Adam lr 1e-4, betas 0.9/0.98, 20 epochs). The vocabulary is
tdabench's 388 performance events (dattri adds pad/end tokens: 390); dattri's state dicts do
not load into this implementation.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from tdabench.benchmark.data.midi import encode_midi
from tdabench.benchmark.datasets._common import (
    LabelledDataset,
    saved_model_values,
    train_seeded,
)
from tdabench.benchmark.settings import get_setting
from tdabench.errors import DataError

__all__ = [
    "create_maestro_datasets",
    "create_musictransformer_model",
    "loss_maestro_musictransformer",
    "train_maestro_musictransformer",
]

_SETTING = "maestro_musictransformer"


def _generated(root: Path, seq_len: int) -> LabelledDataset:
    """First window of each MIDI file in ``root/generated_music`` (sorted by name)."""
    folder = root / "generated_music"
    files = (
        sorted(p for p in folder.rglob("*") if p.suffix.lower() in (".mid", ".midi"))
        if folder.is_dir()
        else []
    )
    if not files:
        raise DataError(
            f"generated_music=True needs MIDI files under {str(folder)!r} (dattri's generated_music.zip, "
            "extracted there); tdabench never downloads it"
        )
    xs, ys = [], []
    for p in files:
        tok = encode_midi(p)
        if len(tok) > seq_len:
            xs.append(tok[:seq_len])
            ys.append(tok[1 : seq_len + 1])
    if not xs:
        raise DataError(f"no MIDI file under {str(folder)!r} has more than {seq_len} event tokens")
    return LabelledDataset(
        torch.from_numpy(np.stack(xs).astype(np.int64)),
        torch.from_numpy(np.stack(ys).astype(np.int64)),
    )


def create_maestro_datasets(
    dataset_path: str | os.PathLike | None = None,
    generated_music: bool = False,
    *,
    n_train: int | None = None,
    n_test: int | None = None,
) -> tuple[LabelledDataset, LabelledDataset]:
    """Event-token sequences for training and testing, read offline (never downloaded).

    Args:
        dataset_path: a MAESTRO folder (``maestro-v*.csv`` and its MIDI files): the
            ``maestro_musictransformer`` setting's 5,000 training / up to 178 test sequences of
            256 tokens. ``None``: the offline stand-in of the ``maestro_musictransformer_tiny``
            setting (music21's Bach chorales; 64 / 16 sequences of 32 tokens).
        generated_music: test on the MIDI files in ``dataset_path/generated_music`` instead
            (first 256-token window of each).
        n_train, n_test: override the setting's numbers of sequences (tdabench extension).

    Returns:
        ``(train, test)`` datasets of ``(inputs (T,), labels (T,))`` int64; labels are the inputs
        shifted by one event.

    Raises:
        DataError: the path or its files are missing (the message names them).
    """
    if dataset_path is None:
        if generated_music:
            raise DataError(
                "generated_music=True needs dataset_path (the folder holding generated_music/)"
            )
        data = get_setting(f"{_SETTING}_tiny").load()
        return LabelledDataset(*data.train[:2]), LabelledDataset(*data.test[:2])
    root = Path(dataset_path)
    if not root.exists():
        raise DataError(
            f"no MAESTRO data at {str(root)!r}: tdabench never downloads. Unzip maestro-v3.0.0-midi.zip "
            "(or v2) there so that it holds maestro-v*.csv and the MIDI folders; or pass None for the "
            "offline Bach-chorale stand-in"
        )
    sizes = {k: int(v) for k, v in (("n_train", n_train), ("n_test", n_test)) if v is not None}
    setting = get_setting(_SETTING, **sizes)
    generated = _generated(root, setting.data_config["seq_len"]) if generated_music else None
    data = setting.load(data_root=root)
    test = generated if generated is not None else LabelledDataset(*data.test[:2])
    return LabelledDataset(*data.train[:2]), test


def create_musictransformer_model(device: str = "cpu") -> torch.nn.Module:
    """A fresh Music Transformer of the ``maestro_musictransformer`` setting, on ``device``."""
    return get_setting(_SETTING).build_model().to(device)


def _token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def train_maestro_musictransformer(
    train_dataloader: Iterable[Any], seed: int = 0, num_epoch: int = 20, device: str = "cpu"
) -> torch.nn.Module:
    """Train the Music Transformer with the setting's recipe (mean next-event cross-entropy).

    Args:
        train_dataloader: yields ``(inputs (B, T), labels (B, T))`` int64, ``T <= 256``.
        seed: seeds torch, NumPy and ``random`` before the model is created.
        num_epoch: passes over the loader.
        device: training device.

    Returns:
        The trained model after the last epoch (train mode, on ``device``).
    """
    return train_seeded(
        lambda: create_musictransformer_model(device),
        seed,
        _SETTING,
        train_dataloader,
        num_epoch,
        device,
        _token_ce,
    )


def _neg_last_token_ce(logits: Tensor, labels: Tensor) -> Tensor:
    return -F.cross_entropy(logits[:, -1, :], labels[:, -1], reduction="none")


def loss_maestro_musictransformer(
    model_path: str | os.PathLike, dataloader: Iterable[Any], device: str = "cpu"
) -> Tensor:
    """Per-sequence *negative* cross-entropy of the last event, ``(n,)`` (dattri's target; higher is better).

    ``model_path``: a state dict file of :func:`create_musictransformer_model`'s model.
    """
    model = create_musictransformer_model(device)
    return saved_model_values(model, model_path, dataloader, device, _neg_last_token_ce)
