"""tdabench.groundtruth: seeded, sharded, resumable retraining with a provenance-keyed store.

Public names:

* specification and provenance: :class:`GroundTruthSpec`, :func:`ground_truth_config`,
  :func:`ground_truth_key`, :func:`config_diff`;
* deterministic sampling: :func:`sampling_key`, :func:`subset_indices`, :func:`subset_mask`,
  :func:`removal_mask`, :func:`model_seed`, :func:`derive_seed`, :func:`subset_size`;
* the store: :class:`GroundTruthStore`, :func:`open_store`;
* the engine: :func:`run_shard`, :func:`run_shards`, :func:`missing_shards`, :func:`merge`,
  :func:`load_ground_truth`, :func:`load_runs`, :func:`verify`,
  :class:`VerifyReport`;
* a toy trainer for tests and examples: :class:`ToySoftmaxTrainer`, :func:`make_toy_data`.

The benchmark trainers (``SequentialTrainer``, ``BatchedTrainer``, ``make_trainer``,
``unstack``) live in :mod:`tdabench.groundtruth.trainer`, imported lazily on first access.
"""

from __future__ import annotations

import importlib
from typing import Any

from tdabench.groundtruth.engine import (
    VerifyReport,
    load_ground_truth,
    load_runs,
    merge,
    missing_shards,
    open_store,
    run_shard,
    run_shards,
    verify,
)
from tdabench.groundtruth.key import (
    GroundTruthSpec,
    canonical_json,
    config_diff,
    ground_truth_config,
    ground_truth_key,
)
from tdabench.groundtruth.store import GroundTruthStore, table_digest
from tdabench.groundtruth.subsets import (
    derive_seed,
    entry_model_seed,
    model_seed,
    removal_mask,
    sampling_key,
    subset_indices,
    subset_mask,
    subset_size,
)
from tdabench.groundtruth.toy import ToySoftmaxTrainer, make_toy_data

__all__ = [
    "GroundTruthSpec",
    "GroundTruthStore",
    "ToySoftmaxTrainer",
    "VerifyReport",
    "canonical_json",
    "config_diff",
    "derive_seed",
    "entry_model_seed",
    "ground_truth_config",
    "ground_truth_key",
    "load_ground_truth",
    "load_runs",
    "make_toy_data",
    "merge",
    "missing_shards",
    "model_seed",
    "open_store",
    "removal_mask",
    "run_shard",
    "run_shards",
    "sampling_key",
    "subset_indices",
    "subset_mask",
    "subset_size",
    "table_digest",
    "verify",
]

_LAZY_TRAINER = ("Trainer", "SequentialTrainer", "BatchedTrainer", "make_trainer", "unstack")


def __getattr__(name: str) -> Any:
    if name in _LAZY_TRAINER:
        return getattr(importlib.import_module(f"{__name__}.trainer"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
