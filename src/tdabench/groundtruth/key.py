"""Ground-truth specification, resolved configuration and provenance key.

The **ground-truth key** identifies a *population* of ground-truth entries: everything that
determines the number stored for entry ``i``, run ``r``. It is the sha256 of the canonical
JSON of the resolved configuration (:func:`ground_truth_config`):

* ``format``: the store format version;
* ``kind`` (``"lds"``/``"loo"``), ``n_train``, ``subset_ratio`` (LDS), ``num_runs``,
  ``seed`` (base seed from which subsets and model seeds derive, see
  :mod:`tdabench.groundtruth.subsets`), ``shard_size`` (entries per shard: it fixes which
  models are trained together, which can change the last bits of batched training);
* ``targets``: the names of the evaluated targets;
* ``trainer``: ``trainer.fingerprint()`` (model spec, recipe, trainer name/version and,
  by contract, the data fingerprint);
* ``data``: an optional extra data fingerprint given by the caller.

It deliberately does **not** contain ``num_subsets`` or the list of LOO indices: those only
select *which* entries of the population are computed. Entry ``i`` is addressed by its index
and its value never depends on how many other entries exist, so a store grown from 50 to 60
subsets, or from 10 to 100 LOO removals, keeps its key and its completed shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tdabench._io import _jsonable, canonical_json, config_diff, describe_diff
from tdabench.errors import ConfigError
from tdabench.groundtruth.subsets import sampling_key, subset_size

__all__ = [
    "STORE_FORMAT",
    "GroundTruthSpec",
    "canonical_json",
    "config_diff",
    "describe_diff",
    "ground_truth_config",
    "ground_truth_key",
]

STORE_FORMAT = "tdabench-groundtruth/1"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class GroundTruthSpec:
    """What to retrain.

    Args:
        kind: ``"lds"`` (random subsets) or ``"loo"`` (leave one out).
        num_subsets: LDS: compute entries ``0 .. num_subsets - 1``. Not part of the key.
        indices: LOO: training indices to remove (``None`` = all ``n_train``). Not part of
            the key. Entry ``i`` of an LOO store is "trained without sample ``i``".
        subset_ratio: LDS subset size as a fraction of ``n_train``, in (0, 1).
        num_runs: independent models (seeds) per entry; ``>= 2`` enables the noise ceiling.
        seed: base seed; subsets and model seeds derive from it (never random).
        shard_size: entries per shard. Shard ``k`` holds entries
            ``[k * shard_size, (k + 1) * shard_size)`` that are selected.
        targets: names of the targets to evaluate (passed to ``trainer.evaluate``).
        n_train: training-set size; ``None`` takes ``trainer.n_train``.
        keep_checkpoints: also store each shard's stacked weights as safetensors.
    """

    kind: str = "lds"
    num_subsets: int = 100
    indices: tuple[int, ...] | None = None
    subset_ratio: float = 0.5
    num_runs: int = 1
    seed: int = 0
    shard_size: int = 10
    targets: tuple[str, ...] = ("loss",)
    n_train: int | None = None
    keep_checkpoints: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("lds", "loo"):
            raise ConfigError(f"kind must be 'lds' or 'loo', got {self.kind!r}")
        for name in ("num_runs", "shard_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {v!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ConfigError(
                f"seed must be an int, got {self.seed!r}; tdabench never draws random seeds"
            )
        if isinstance(self.targets, str):
            object.__setattr__(self, "targets", (self.targets,))
        targets = tuple(self.targets)
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(
                f"targets must be a non-empty sequence of names, got {self.targets!r}"
            )
        if len(set(targets)) != len(targets):
            raise ConfigError(f"targets contain duplicates: {targets}")
        object.__setattr__(self, "targets", targets)
        if self.kind == "lds":
            n = self.num_subsets
            if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
                raise ConfigError(f"num_subsets must be an int >= 1, got {n!r}")
            r = self.subset_ratio
            if (
                isinstance(r, bool)
                or not isinstance(r, (int, float, np.floating))
                or not 0.0 < float(r) < 1.0
            ):
                raise ConfigError(f"subset_ratio must be in the open interval (0, 1), got {r!r}")
        else:
            if self.indices is not None:
                idx = tuple(int(i) for i in np.asarray(self.indices, dtype=np.int64).reshape(-1))
                if len(idx) == 0:
                    raise ConfigError(
                        "indices is an empty list; pass None for all training samples or at least one index"
                    )
                if len(set(idx)) != len(idx):
                    raise ConfigError(
                        "indices contain duplicates; list each removed training sample once"
                    )
                if min(idx) < 0:
                    raise ConfigError(f"LOO indices must be >= 0, got {min(idx)}")
                object.__setattr__(self, "indices", tuple(sorted(idx)))
        if self.n_train is not None:
            self.validate(int(self.n_train))

    def validate(self, n_train: int) -> None:
        """Check the spec against the training-set size (indices in range, subset size)."""
        if isinstance(n_train, bool) or not isinstance(n_train, (int, np.integer)) or n_train < 2:
            raise ConfigError(f"n_train must be an int >= 2, got {n_train!r}")
        if self.kind == "lds":
            subset_size(int(n_train), float(self.subset_ratio))
        elif self.indices is not None and max(self.indices) >= n_train:
            raise ConfigError(
                f"LOO index {max(self.indices)} is out of range for n_train = {n_train}; indices must be in [0, {n_train})"
            )

    def resolve_n_train(self, trainer: Any = None) -> int:
        """``n_train`` from the spec, else ``trainer.n_train``, else ``len(trainer.data.train[0])``; validated."""
        n = self.n_train if self.n_train is not None else getattr(trainer, "n_train", None)
        if n is None:  # a trainer holding BenchmarkData (``trainer.data.train[0]``)
            train = getattr(getattr(trainer, "data", None), "train", None)
            if isinstance(train, (tuple, list)) and train and hasattr(train[0], "shape"):
                n = int(train[0].shape[0])
        if n is None:
            raise ConfigError(
                "n_train is unknown: set GroundTruthSpec(n_train=...) or give the trainer an n_train attribute"
            )
        self.validate(int(n))
        return int(n)

    def entries(self, n_train: int) -> list[int]:
        """Selected entry indices, sorted (LDS: subsets; LOO: removed training indices)."""
        if self.kind == "lds":
            return list(range(int(self.num_subsets)))
        return list(self.indices) if self.indices is not None else list(range(int(n_train)))

    def shard_ids(self, n_train: int) -> list[int]:
        """Ids of the shards that hold at least one selected entry."""
        return sorted({e // self.shard_size for e in self.entries(n_train)})

    def shard_bounds(self, shard_id: int) -> tuple[int, int]:
        """``(start, stop)`` of shard ``shard_id``'s block of entry indices."""
        if (
            isinstance(shard_id, bool)
            or not isinstance(shard_id, (int, np.integer))
            or shard_id < 0
        ):
            raise ConfigError(f"shard_id must be an int >= 0, got {shard_id!r}")
        return int(shard_id) * self.shard_size, (int(shard_id) + 1) * self.shard_size

    def shard_entries(self, shard_id: int, n_train: int) -> list[int]:
        """Selected entries inside shard ``shard_id`` (may be empty)."""
        start, stop = self.shard_bounds(shard_id)
        return [e for e in self.entries(n_train) if start <= e < stop]

    def sampling_key(self, n_train: int) -> str:
        """See :func:`tdabench.groundtruth.subsets.sampling_key`."""
        return sampling_key(
            self.kind,
            int(self.seed),
            int(n_train),
            float(self.subset_ratio) if self.kind == "lds" else None,
        )


def ground_truth_config(
    spec: GroundTruthSpec,
    trainer_fingerprint: Mapping[str, Any],
    n_train: int,
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The resolved configuration that the key hashes (see the module docstring).

    Args:
        spec: the ground-truth spec.
        trainer_fingerprint: ``trainer.fingerprint()``.
        n_train: training-set size.
        data: optional extra data fingerprint (e.g. ``BenchmarkData.meta``).

    Returns:
        A JSON-able dict.
    """
    spec.validate(n_train)
    return _jsonable(
        {
            "format": STORE_FORMAT,
            "kind": spec.kind,
            "n_train": int(n_train),
            "subset_ratio": float(spec.subset_ratio) if spec.kind == "lds" else None,
            "num_runs": int(spec.num_runs),
            "seed": int(spec.seed),
            "shard_size": int(spec.shard_size),
            "targets": list(spec.targets),
            "trainer": dict(trainer_fingerprint),
            "data": dict(data) if data is not None else None,
        }
    )


def ground_truth_key(
    spec: GroundTruthSpec | Mapping[str, Any],
    trainer_fingerprint: Mapping[str, Any] | None = None,
    n_train: int | None = None,
    data: Mapping[str, Any] | None = None,
) -> str:
    """sha256 (hex) of the canonical JSON of the resolved configuration.

    Call either ``ground_truth_key(config_dict)`` with a dict from
    :func:`ground_truth_config`, or ``ground_truth_key(spec, trainer.fingerprint(), n_train)``.
    """
    if isinstance(spec, GroundTruthSpec):
        if trainer_fingerprint is None or n_train is None:
            raise ConfigError("ground_truth_key(spec, ...) needs trainer_fingerprint and n_train")
        config = ground_truth_config(spec, trainer_fingerprint, n_train, data)
    elif isinstance(spec, Mapping):
        config = dict(spec)
    else:
        raise ConfigError(
            f"ground_truth_key takes a GroundTruthSpec or a config dict, got {type(spec).__name__}"
        )
    return _sha256(canonical_json(config))
