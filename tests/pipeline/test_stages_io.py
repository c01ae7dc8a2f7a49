"""Generic stage helpers: Parquet round trips, atomic writes, shard counts."""

from __future__ import annotations

import numpy as np
import pytest

from tdabench.errors import ShapeError
from tdabench.pipeline.io import atomic_path, read_parquet_meta, read_scores, write_scores
from tdabench.pipeline.stages import num_shards


def test_scores_round_trip_and_metadata(tmp_path):
    s = np.arange(12, dtype=np.float32).reshape(4, 3)
    write_scores(tmp_path / "s.parquet", s, {"method": "X"})
    got, meta = read_scores(tmp_path / "s.parquet")
    np.testing.assert_array_equal(got, s)
    assert read_parquet_meta(tmp_path / "s.parquet") == {"method": "X", "n_train": 4, "n_test": 3}
    assert meta["n_test"] == 3
    with pytest.raises(ShapeError, match=r"\(n_train, n_test\)"):
        write_scores(tmp_path / "bad.parquet", s[0], {})
    assert not (tmp_path / "bad.parquet").exists()


def test_atomic_path_keeps_old_file_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert target.read_text() == "old" and list(tmp_path.iterdir()) == [target]


def test_num_shards():
    assert [num_shards(n, 10) for n in (1, 10, 11, 50, 60)] == [1, 1, 2, 5, 6]
