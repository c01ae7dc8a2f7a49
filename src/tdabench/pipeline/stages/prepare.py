"""``tdabench prepare``: load the split, record its identity, flip labels for mislabel detection."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tdabench.benchmark import flip_labels
from tdabench.pipeline.io import write_json, write_sidecar, write_table
from tdabench.pipeline.stages._common import data_fingerprint, load, provenance, threads

__all__ = ["prepare"]


def _label_columns(setting: Any, labels: Any, auc: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    mask = np.zeros(len(labels), dtype=bool)
    if setting.kind != "classification":
        # sequences have no single label to flip: no mislabel-detection variant (-1 = none)
        none = np.full(len(labels), -1)
        return none, none, mask
    noisy, flipped = flip_labels(
        labels, auc["noise_fraction"], setting.num_classes, seed=auc["seed"]
    )
    mask[np.asarray(flipped)] = True
    return np.asarray(labels), np.asarray(noisy), mask


def prepare(spec: Mapping[str, Any], out_dir: str, benchmark: str | None = None) -> None:
    """Load the split, record its identity, and flip labels for mislabel detection.

    Writes ``<out_dir>/noisy.parquet`` (train_index, label, noisy_label, flipped) and
    ``<out_dir>/meta.json`` (the data identity from ``BenchmarkData.meta`` + the spec), both
    stamped with their checksum and provenance (benchmark, spec hash, data fingerprint).
    """
    threads()
    setting, data = load(spec)
    labels = data.train[1]
    label_col, noisy_col, mask = _label_columns(setting, labels, spec["auc"])
    table = pa.table(
        {
            "train_index": pa.array(np.arange(len(labels)), pa.int64()),
            "label": pa.array(label_col, pa.int64()),
            "noisy_label": pa.array(noisy_col, pa.int64()),
            "flipped": pa.array(mask),
        }
    )
    prov = provenance(benchmark, "prepare", spec, data=data_fingerprint(data.meta))
    counts = {"n_train": len(labels), "n_test": len(data.test[1])}
    write_table(Path(out_dir) / "noisy.parquet", table, counts, prov)
    meta_path = Path(out_dir) / "meta.json"
    write_json(meta_path, {"spec": dict(spec), "data": data.meta, **counts, "provenance": prov})
    write_sidecar(meta_path)
