"""The on-disk formats of the stage outputs (Parquet + JSON + safetensors, no pickle).

Scores on disk (``scores.parquet``): one row per training sample, columns ``train_index`` (int64,
``0 .. n_train - 1`` in order) and ``scores`` (fixed-size list of float32, one entry per test
sample) -- the ``(n_train, n_test)`` orientation of the in-memory tensor. Self-scores
(``self.parquet``): ``train_index``, ``score``.

Every file is written and verified by :mod:`tdabench._io`: atomically, stamped with the checksum
of its data and its provenance key (``tdabench.provenance``); the caller's other metadata sits
in ``tdabench.<field>`` (JSON values). Volatile facts (timings, dates) go to the sidecar
``<file>.run.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from tdabench._io import (
    atomic_path,
    parquet_metadata,
    read_json,
    read_json_checked,
    read_parquet,
    read_sidecar,
    write_json,
    write_parquet,
    write_sidecar,
)
from tdabench.errors import IntegrityError, ShapeError

__all__ = [
    "atomic_path",
    "read_json",
    "read_json_checked",
    "read_parquet_meta",
    "read_scores",
    "read_self_scores",
    "read_sidecar",
    "write_json",
    "write_scores",
    "write_self_scores",
    "write_sidecar",
    "write_table",
]

PathLike = str | os.PathLike[str]


#: A ``pyarrow.Table`` written atomically, stamped (the stage outputs' name for
#: :func:`tdabench._io.write_parquet`).
write_table = write_parquet


def _decode(meta: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in meta.items():
        try:
            out[k] = json.loads(v)
        except ValueError:
            out[k] = v
    return out


def read_parquet_meta(path: PathLike) -> dict[str, Any]:
    """The tdabench metadata of a Parquet file (JSON values decoded), without verification."""
    import pyarrow.parquet as pq

    meta = _decode(parquet_metadata(pq.read_schema(path)))
    for k in ("version", "rows", "sha256", "meta_sha256", "provenance"):
        meta.pop(k, None)
    return meta


def _as_numpy(scores: Any) -> Any:
    import numpy as np

    return np.asarray(
        scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float32
    )


def _write_by_train_index(
    path: PathLike,
    column: str,
    values: Any,
    meta: Mapping[str, Any],
    provenance: Mapping[str, Any] | None,
) -> str:
    """A table of ``train_index`` (0 .. n - 1) and ``column``: float32 scalars for a ``(n,)``
    array, fixed-size lists of float32 for an ``(n, k)`` one."""
    import numpy as np
    import pyarrow as pa

    flat = pa.array(values.ravel(), pa.float32())
    col = flat if values.ndim == 1 else pa.FixedSizeListArray.from_arrays(flat, values.shape[1])
    index = pa.array(np.arange(values.shape[0]), pa.int64())
    return write_table(path, pa.table({"train_index": index, column: col}), meta, provenance)


def write_scores(
    path: PathLike,
    scores: Any,
    meta: Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Write a ``(n_train, n_test)`` score matrix (tensor or array) as wide, stamped Parquet."""
    s = _as_numpy(scores)
    if s.ndim != 2:
        raise ShapeError(
            f"scores must be (n_train, n_test), got shape {s.shape}; pass the full matrix."
        )
    n_train, n_test = s.shape
    return _write_by_train_index(
        path, "scores", s, {**meta, "n_train": n_train, "n_test": n_test}, provenance
    )


# Spelled out: the public writers share their signature; the work is in _write_by_train_index.
def write_self_scores(
    path: PathLike,
    scores: Any,
    meta: Mapping[str, Any],
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Write ``(n_train,)`` self-influence scores (may be empty when AUC is not evaluated)."""
    return _write_by_train_index(path, "score", _as_numpy(scores).ravel(), dict(meta), provenance)


def _check_index(path: PathLike, table: Any) -> None:
    import numpy as np

    idx = table.column("train_index").to_numpy()
    if not np.array_equal(idx, np.arange(len(idx))):
        raise IntegrityError(
            f"{str(path)!r}: train_index is not 0..{len(idx) - 1} in order (rows were reordered "
            "or dropped); delete it and rerun the attribute stage"
        )


def read_scores(
    path: PathLike, expect: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Read and verify ``scores.parquet``.

    Returns:
        ``(scores, meta)``: a ``(n_train, n_test)`` float32 numpy array and the decoded
        metadata (``provenance`` included).

    Raises:
        IntegrityError: truncated, altered, reordered rows, or a shape unlike its stamp.
        ProvenanceError: made for another benchmark, data or attributor.
    """
    import numpy as np

    fix = "delete it and rerun the attribute stage"
    table, raw = read_parquet(path, expect, fix=fix)
    meta = _decode(raw)
    if "scores" not in table.column_names or "train_index" not in table.column_names:
        raise IntegrityError(f"{str(path)!r} has no train_index/scores columns; {fix}")
    _check_index(path, table)
    col = table.column("scores").combine_chunks()
    n_test = col.type.list_size
    s = np.array(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32)
    s = s.reshape(-1, n_test)
    if (s.shape[0], s.shape[1]) != (meta.get("n_train"), meta.get("n_test")):
        raise IntegrityError(
            f"{str(path)!r} holds a {s.shape} matrix but its stamp records "
            f"({meta.get('n_train')}, {meta.get('n_test')}); {fix}"
        )
    return s, meta


def read_self_scores(
    path: PathLike, expect: Mapping[str, Any] | None = None
) -> tuple[Any, dict[str, Any]]:
    """Read and verify ``self.parquet``; returns ``((n_train,) float32 array, meta)``."""
    import numpy as np

    fix = "delete it and rerun the attribute stage"
    table, raw = read_parquet(path, expect, fix=fix)
    if "score" not in table.column_names or "train_index" not in table.column_names:
        raise IntegrityError(f"{str(path)!r} has no train_index/score columns; {fix}")
    _check_index(path, table)
    s = np.array(table.column("score").to_numpy(), dtype=np.float32)
    return s, _decode(raw)
