"""Deterministic subsets, removals and model seeds.

Everything here is a pure function of its arguments: no global RNG is touched, so the same
call gives the same answer in any process, on any machine, in any order. That is what makes
sharding safe (shard 7 of 100 computes the same subsets wherever it runs) and extension safe
(asking for subsets 50..59 later never changes subsets 0..49, because subset ``i`` depends
only on ``(key, i)``, never on how many subsets are requested).

Derivation: ``derive_seed(key, *parts)`` is the first 8 bytes (big endian) of
``sha256("tdabench" | key | part_1 | ... )`` with the top bit cleared, i.e. a uniform integer
in ``[0, 2**63)`` that fits an int64 column. Subset ``i`` is
``sort(Generator(PCG64(derive_seed(key, "subset", i))).choice(n_train, size, replace=False))``
with ``size = subset_size(n_train, ratio)``; the seed of the model trained for entry ``i``,
run ``r`` is ``derive_seed(key, "model", i, r)``.

``key`` is the *sampling key* (:func:`sampling_key`): a hash of the kind, the base seed,
``n_train`` and the subset ratio. It deliberately excludes the trainer and data
fingerprints, so two ground truths that differ only in their training recipe (or the
sequential vs. batched trainer, or the notebook ``retrain_lds`` API vs. the engine) use the
same subsets and the same model seeds: paired comparisons for free.
"""

from __future__ import annotations

import hashlib
import json
import math

import numpy as np
import torch

from tdabench._io import mix_seed
from tdabench.errors import ConfigError

__all__ = [
    "derive_seed",
    "entry_model_seed",
    "model_seed",
    "removal_mask",
    "sampling_key",
    "subset_indices",
    "subset_mask",
    "subset_size",
]


def derive_seed(key: str, *parts: object) -> int:
    """A seed in ``[0, 2**63)`` that is a pure function of ``key`` and ``parts``.

    Args:
        key: any string (usually :func:`sampling_key`).
        *parts: ints or strings identifying the use (``"subset", i`` or ``"model", i, r``).
    """
    if not isinstance(key, str):
        raise ConfigError(f"key must be a string, got {type(key).__name__}")
    return mix_seed(key, *parts, scheme="text")


def sampling_key(kind: str, seed: int, n_train: int, subset_ratio: float | None = None) -> str:
    """Key from which the subsets/removals and model seeds of a ground truth are derived.

    Args:
        kind: ``"lds"`` or ``"loo"``.
        seed: the base seed of the ground truth.
        n_train: number of training samples.
        subset_ratio: fraction of the training set in each LDS subset (ignored for LOO).

    Returns:
        A 64-hex-digit sha256 of ``{"kind", "seed", "n_train", "subset_ratio"}``.
    """
    if kind not in ("lds", "loo"):
        raise ConfigError(f"kind must be 'lds' or 'loo', got {kind!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int, got {seed!r}; seeds are explicit in tdabench")
    payload = {
        "kind": kind,
        "seed": int(seed),
        "n_train": int(n_train),
        "subset_ratio": float(subset_ratio) if kind == "lds" else None,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _check_n_train(n_train: int) -> int:
    if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 2:
        raise ConfigError(f"n_train must be an int >= 2, got {n_train!r}")
    return int(n_train)


def subset_size(n_train: int, ratio: float) -> int:
    """Number of samples in an LDS subset: ``round(ratio * n_train)`` (half to even).

    Raises:
        ConfigError: if ``ratio`` is not in the open interval (0, 1) or the size would be
            0 or ``n_train``.
    """
    n_train = _check_n_train(n_train)
    if (
        isinstance(ratio, bool)
        or not isinstance(ratio, (int, float, np.floating))
        or not math.isfinite(float(ratio))
    ):
        raise ConfigError(f"subset_ratio must be a float in (0, 1), got {ratio!r}")
    ratio = float(ratio)
    if not 0.0 < ratio < 1.0:
        raise ConfigError(
            f"subset_ratio must be in the open interval (0, 1), got {ratio}; 0.5 is the usual choice"
        )
    size = round(ratio * n_train)
    if size < 1 or size >= n_train:
        raise ConfigError(
            f"subset_ratio {ratio} of n_train {n_train} gives a subset of {size} samples; "
            "choose a ratio that keeps at least one sample in and one out"
        )
    return int(size)


def subset_indices(key: str, i: int, n_train: int, ratio: float) -> np.ndarray:
    """Training indices of LDS subset ``i``.

    Args:
        key: the sampling key (:func:`sampling_key`).
        i: subset index (``>= 0``).
        n_train: number of training samples.
        ratio: subset ratio in (0, 1).

    Returns:
        Sorted ``int64`` array of shape ``(subset_size(n_train, ratio),)``.
    """
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
        raise ConfigError(f"subset index must be an int >= 0, got {i!r}")
    size = subset_size(n_train, ratio)
    rng = np.random.Generator(np.random.PCG64(derive_seed(key, "subset", int(i))))
    return np.sort(rng.choice(int(n_train), size=size, replace=False)).astype(np.int64)


def subset_mask(key: str, i: int, n_train: int, ratio: float) -> torch.Tensor:
    """Boolean ``(n_train,)`` mask of LDS subset ``i`` (True = in the training subset)."""
    m = torch.zeros(int(n_train), dtype=torch.bool)
    m[torch.from_numpy(subset_indices(key, i, n_train, ratio))] = True
    return m


def removal_mask(i: int, n_train: int) -> torch.Tensor:
    """Boolean ``(n_train,)`` mask of the training set without sample ``i`` (LOO)."""
    n_train = _check_n_train(n_train)
    if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < n_train:
        raise ConfigError(f"LOO index {i!r} is out of range [0, {n_train})")
    m = torch.ones(n_train, dtype=torch.bool)
    m[int(i)] = False
    return m


def _valid_run(run: int) -> bool:
    if isinstance(run, bool) or not isinstance(run, (int, np.integer)) or run < 0:
        raise ConfigError(f"run must be an int >= 0, got {run!r}")
    return True


def model_seed(key: str, index: int, run: int) -> int:
    """Seed (in ``[0, 2**63)``) of the model trained for entry ``index``, run ``run``."""
    if isinstance(run, bool) or not isinstance(run, (int, np.integer)) or run < 0:
        raise ConfigError(f"run must be an int >= 0, got {run!r}")
    return derive_seed(key, "model", int(index), int(run))


def entry_model_seed(kind: str, key: str, index: int, run: int) -> int:
    """Seed of the model for entry ``index``, run ``run`` of a ``kind`` ground truth.

    LOO models of one run share one seed (independent of ``index``): with the trainers'
    shared minibatch stream, two LOO models then differ only by the removed sample, so the
    ground truth measures the removal and not a change of initialisation. LDS subsets are
    independent draws and get independent seeds, :func:`model_seed` of ``(index, run)``.
    """
    if kind == "loo":
        return derive_seed(key, "loo-model", int(run)) if _valid_run(run) else 0
    return model_seed(key, index, run)
