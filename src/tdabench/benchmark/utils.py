"""dattri-compatible data helpers: label flipping for mislabel detection, an ordered sampler.

>>> import torch
>>> noisy, idx = flip_label(torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]), p=0.3, seed=0)
>>> len(idx), bool((noisy[idx] != torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])[idx]).all())
(3, True)
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Sampler

from tdabench.errors import ConfigError, ShapeError

__all__ = ["SubsetSampler", "flip_label"]


def _label_space(label: np.ndarray, label_space: Any) -> np.ndarray:
    if label_space is None:
        space = np.unique(label)
    else:
        raw = (
            label_space.cpu().numpy()
            if isinstance(label_space, Tensor)
            else np.asarray(list(label_space))
        )
        space = np.unique(raw)
    if space.size < 2:
        raise ConfigError(
            f"flip_label needs a label space of at least 2 values to flip into, got {space.tolist()}; "
            "pass label_space= with every class"
        )
    return space


def flip_label(
    label: np.ndarray | Tensor,
    label_space: Sequence[Any] | np.ndarray | Tensor | None = None,
    p: float = 0.1,
    seed: int | None = None,
) -> tuple[np.ndarray | Tensor, list[int]]:
    """Replace a random ``int(p * n)`` labels by a different label of the label space.

    Same semantics as dattri's ``flip_label``: the flipped positions are drawn without
    replacement; each flipped label becomes a uniform draw from ``label_space`` minus its own
    value; the input is not modified.

    Args:
        label: labels ``(n,)``, a tensor or a NumPy array.
        label_space: the values a label may take; default: the distinct values of ``label``.
        p: fraction of labels to flip, in ``[0, 1]``.
        seed: seed of the draw (``None``: fresh randomness, as dattri). The global RNGs are untouched.

    Returns:
        ``(flipped, noise_index)``: flipped labels ``(n,)`` of the input's type and dtype, and
        the flipped positions as a list of ``int(p * n)`` ints (in draw order).

    Raises:
        ShapeError: ``label`` is not 1-D.
        ConfigError: ``p`` outside ``[0, 1]``, a label space with fewer than 2 values, or a label
            outside the given label space.
    """
    is_tensor = isinstance(label, Tensor)
    arr = label.detach().cpu().numpy() if is_tensor else np.asarray(label)
    if arr.ndim != 1:
        raise ShapeError(f"flip_label needs a 1-D label vector (n,), got shape {arr.shape}")
    if not 0.0 <= float(p) <= 1.0:
        raise ConfigError(f"p must lie in [0, 1], got {p}")
    space = _label_space(arr, label_space)
    if label_space is not None and not np.isin(arr, space).all():
        raise ConfigError(
            "some labels are not in label_space; pass the full label space (or None to infer it)"
        )
    rng = np.random.default_rng(seed)
    n = arr.shape[0]
    noise_index = rng.choice(n, size=int(float(p) * n), replace=False)
    # A uniform draw from the other |space| - 1 values: position of the label in the space,
    # plus a shift in 1..|space|-1, modulo |space|.
    pos = np.searchsorted(space, arr[noise_index])
    shift = rng.integers(1, space.size, size=noise_index.size)
    new_values = space[(pos + shift) % space.size]
    flipped = arr.copy()
    flipped[noise_index] = new_values.astype(arr.dtype, copy=False)
    out = torch.as_tensor(flipped, dtype=label.dtype).to(label.device) if is_tensor else flipped
    return out, [int(i) for i in noise_index]


class SubsetSampler(Sampler[int]):
    """Yield a fixed list of dataset indices, in the given order, once.

    For attribution over a chosen subset in a fixed order (use ``SubsetRandomSampler`` to
    train on a shuffled subset).

    Args:
        indices: dataset indices to yield, ``(k,)``; a list, a range, an array or a 1-D tensor.
    """

    def __init__(self, indices: Sequence[int] | np.ndarray | Tensor) -> None:
        if isinstance(indices, Tensor):
            if indices.dim() != 1 or indices.is_floating_point():
                raise ConfigError("SubsetSampler needs a 1-D integer index tensor")
            indices = indices.tolist()
        self.indices = indices

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
