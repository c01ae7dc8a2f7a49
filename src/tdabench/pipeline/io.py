"""Atomic file writing and the on-disk formats shared by the stages (Parquet + JSON, no pickle).

Scores on disk (``scores.parquet``): one row per training sample, columns ``train_index`` (int64)
and ``scores`` (fixed-size list of float32, one entry per test sample) -- the ``(n_train, n_test)``
orientation of the in-memory tensor. Self-scores (``self.parquet``): ``train_index``, ``score``.
Every Parquet file carries key-value metadata ``tdabench`` = JSON (spec, versions, timings).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = [
    "atomic_path",
    "read_json",
    "read_parquet_meta",
    "read_scores",
    "write_json",
    "write_scores",
    "write_self_scores",
    "write_table",
]

META_KEY = b"tdabench"


class atomic_path:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on success it is renamed to ``p``.

    The temporary file lives in the same directory (same file system, so ``os.replace`` is atomic);
    on an exception it is removed and ``p`` is left untouched.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __enter__(self) -> Path:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        os.close(fd)
        self.tmp = Path(name)
        return self.tmp

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, key-sorted JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    return json.loads(Path(path).read_text())


def write_table(
    path: str | os.PathLike[str], table: Any, meta: Mapping[str, Any] | None = None
) -> None:
    """Write a ``pyarrow.Table`` to Parquet atomically, with ``meta`` as JSON key-value metadata."""
    import pyarrow.parquet as pq

    if meta is not None:
        existing = dict(table.schema.metadata or {})
        existing[META_KEY] = json.dumps(meta, sort_keys=True, default=str).encode()
        table = table.replace_schema_metadata(existing)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    import pyarrow.parquet as pq

    md = pq.read_schema(path).metadata or {}
    return json.loads(md[META_KEY]) if META_KEY in md else {}


def write_scores(path: str | os.PathLike[str], scores: Any, meta: Mapping[str, Any]) -> None:
    """Write a ``(n_train, n_test)`` score matrix (tensor or array) as wide Parquet."""
    import numpy as np
    import pyarrow as pa

    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float32)
    if s.ndim != 2:
        from tdabench.errors import ShapeError

        raise ShapeError(
            f"scores must be (n_train, n_test), got shape {s.shape}; pass the full matrix."
        )
    n_train, n_test = s.shape
    table = pa.table(
        {
            "train_index": pa.array(np.arange(n_train), pa.int64()),
            "scores": pa.FixedSizeListArray.from_arrays(pa.array(s.ravel(), pa.float32()), n_test),
        }
    )
    write_table(path, table, {**meta, "n_train": n_train, "n_test": n_test})


def write_self_scores(path: str | os.PathLike[str], scores: Any, meta: Mapping[str, Any]) -> None:
    """Write ``(n_train,)`` self-influence scores (may be empty when AUC is not evaluated)."""
    import numpy as np
    import pyarrow as pa

    s = np.asarray(scores.detach().cpu() if hasattr(scores, "detach") else scores, dtype=np.float32)
    table = pa.table(
        {
            "train_index": pa.array(np.arange(len(s)), pa.int64()),
            "score": pa.array(s.ravel(), pa.float32()),
        }
    )
    write_table(path, table, dict(meta))


def read_scores(path: str | os.PathLike[str]) -> Any:
    """Read ``scores.parquet`` back into a ``(n_train, n_test)`` float32 numpy array."""
    import numpy as np
    import pyarrow.parquet as pq

    t = pq.read_table(path)
    col = t.column("scores").combine_chunks()
    n_test = col.type.list_size
    return np.asarray(col.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(
        -1, n_test
    )
