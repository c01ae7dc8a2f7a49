"""Toy shards: a stand-in for retraining that exercises the launcher and the workflow quickly.

A toy shard ``i`` writes ``<out_dir>/shard-<i>.parquet`` (temporary name, then ``os.replace``)
holding ``rows_per_shard`` rows of deterministic pseudo-random "target values" derived only from
``(seed, i)``, exactly like a real retraining shard depends only on its key and shard id. It can
sleep (so a test can cancel it while it runs) and fail once on purpose (to test retries).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["ToyShard", "read_toy_shards", "toy_shard_path"]


def toy_shard_path(out_dir: str | os.PathLike[str], shard_id: int) -> Path:
    """Path of toy shard ``shard_id`` under ``out_dir``."""
    return Path(out_dir) / f"shard-{shard_id:05d}.parquet"


@dataclass(frozen=True)
class ToyShard:
    """``ToyShard(out_dir, ...)(shard_id)`` computes and writes one shard.

    Args:
        out_dir: directory of the shard files.
        seed: base seed; shard ``i`` uses ``seed * 1_000_003 + i``.
        rows_per_shard: rows ("models") per shard.
        n_test: values per row.
        sleep_s: seconds to sleep before writing (to be cancellable mid-run).
        fail_dir: if ``<fail_dir>/fail-<i>`` exists, the shard deletes it and raises: it fails
            exactly once, across processes.
    """

    out_dir: str
    seed: int = 0
    rows_per_shard: int = 4
    n_test: int = 3
    sleep_s: float = 0.0
    fail_dir: str | None = None

    def __call__(self, shard_id: int) -> Path:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq

        if self.fail_dir is not None:
            marker = Path(self.fail_dir) / f"fail-{shard_id}"
            if marker.exists():
                marker.unlink()
                raise RuntimeError(f"toy shard {shard_id}: planned failure")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        rng = np.random.default_rng(self.seed * 1_000_003 + shard_id)
        rows = np.arange(shard_id * self.rows_per_shard, (shard_id + 1) * self.rows_per_shard)
        values = rng.standard_normal((self.rows_per_shard, self.n_test))
        table = pa.table(
            {
                "row": pa.array(rows, pa.int64()),
                "values": pa.FixedSizeListArray.from_arrays(
                    pa.array(values.ravel(), pa.float64()), self.n_test
                ),
            }
        )
        path = toy_shard_path(self.out_dir, shard_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    def is_complete(self, shard_id: int) -> bool:
        """Whether shard ``shard_id``'s file exists (written atomically, so exists == complete)."""
        return toy_shard_path(self.out_dir, shard_id).exists()


def read_toy_shards(out_dir: str | os.PathLike[str]) -> dict[int, list[list[float]]]:
    """``{row: values}`` of every toy shard under ``out_dir`` (for comparing runs)."""
    import pyarrow.parquet as pq

    out: dict[int, list[list[float]]] = {}
    for path in sorted(Path(out_dir).glob("shard-*.parquet")):
        t = pq.read_table(path).to_pydict()
        for r, v in zip(t["row"], t["values"]):
            out[int(r)] = list(v)
    return out
