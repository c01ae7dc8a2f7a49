"""Test double of the library-backed stages: the pipeline's machinery, tested without training.

``TDABENCH_STAGES=toy_stages`` (with ``tests/pipeline`` on ``PYTHONPATH``, as the pipeline tests'
conftest sets it) makes the ``tdabench`` CLI (and so the Snakefile and dvc.yaml) call these
functions instead of :mod:`tdabench.pipeline.stages`. They have the same signatures, read and
write the same files, and run in milliseconds with numpy only:

* ground truth uses the real launcher and :func:`tdabench.pipeline.stages.run_shards`, with
  :class:`ToyShard` as the shard task (deterministic values from ``(seed, shard)``, atomic write);
* report is the real one.

``TDABENCH_TOY_TRACE=<file>`` appends one line per stage call (``stage benchmark detail``), so
tests can check which jobs ran. ``TDABENCH_TOY_SLEEP=<s>`` makes each shard sleep (to cancel it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdabench.metric import bootstrap_ci
from tdabench.pipeline import stages as _real
from tdabench.pipeline.io import (
    read_json,
    read_scores,
    write_json,
    write_scores,
    write_self_scores,
    write_table,
)

__all__ = [
    "ToyShard",
    "attribute",
    "evaluate",
    "groundtruth",
    "merge",
    "prepare",
    "read_toy_shards",
    "report",
    "toy_shard_path",
    "train",
]

N_TRAIN = 40
N_TEST = 5


def _trace(*words: Any) -> None:
    path = os.environ.get("TDABENCH_TOY_TRACE")
    if path:
        with open(path, "a") as f:
            f.write(" ".join(str(w) for w in words) + "\n")


def _seed(obj: Any) -> int:
    return int(hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:8], 16)


def toy_shard_path(out_dir: str | os.PathLike[str], shard_id: int, stop: int | None = None) -> Path:
    """Path of toy shard ``shard_id`` (``stop`` = one past its last row, when the shard is partial)."""
    suffix = "" if stop is None else f"-{stop:06d}"
    return Path(out_dir) / f"shard-{shard_id:05d}{suffix}.parquet"


@dataclass(frozen=True)
class ToyShard:
    """``ToyShard(out_dir, ...)(shard_id)`` computes and writes one shard of toy "retraining".

    Shard ``i`` holds rows ``[i*rows_per_shard, min((i+1)*rows_per_shard, count))`` of values that
    depend only on ``(seed, row)``, as a real shard depends only on its key and rows. Its file
    name records the rows it holds, so a shard made partial by a smaller ``count`` is recomputed
    when ``count`` grows.

    Args:
        out_dir: directory of the shard files.
        seed: base seed.
        rows_per_shard: rows ("models") per shard.
        count: total rows (``None``: every shard is full).
        n_test: values per row.
        sleep_s: seconds to sleep before writing (so a test can cancel it mid-run).
        fail_dir: if ``<fail_dir>/fail-<i>`` exists, the shard deletes it and raises: it fails
            exactly once, across processes.
    """

    out_dir: str
    seed: int = 0
    rows_per_shard: int = 4
    count: int | None = None
    n_test: int = 3
    sleep_s: float = 0.0
    fail_dir: str | None = None

    def _rows(self, shard_id: int) -> tuple[int, int]:
        start = shard_id * self.rows_per_shard
        stop = start + self.rows_per_shard
        return start, stop if self.count is None else min(stop, self.count)

    def path(self, shard_id: int) -> Path:
        start, stop = self._rows(shard_id)
        partial = stop - start < self.rows_per_shard
        return toy_shard_path(self.out_dir, shard_id, stop if partial else None)

    def __call__(self, shard_id: int) -> Path:
        import numpy as np
        import pyarrow as pa

        if self.fail_dir is not None:
            marker = Path(self.fail_dir) / f"fail-{shard_id}"
            if marker.exists():
                marker.unlink()
                raise RuntimeError(f"toy shard {shard_id}: planned failure")
        if self.sleep_s:
            time.sleep(self.sleep_s)
        start, stop = self._rows(shard_id)
        rows = np.arange(start, stop)
        values = (
            np.stack(
                [
                    np.random.default_rng([self.seed, int(r)]).standard_normal(self.n_test)
                    for r in rows
                ]
            )
            if len(rows)
            else np.zeros((0, self.n_test))
        )
        table = pa.table(
            {
                "row": pa.array(rows, pa.int64()),
                "values": pa.FixedSizeListArray.from_arrays(
                    pa.array(values.ravel(), pa.float64()), self.n_test
                ),
            }
        )
        path = self.path(shard_id)
        write_table(path, table, {"seed": self.seed, "shard": shard_id})
        return path

    def is_complete(self, shard_id: int) -> bool:
        """Whether the shard's file exists (written atomically, so exists == complete)."""
        return self.path(shard_id).exists()


def read_toy_shards(
    out_dir: str | os.PathLike[str], count: int | None = None
) -> dict[int, list[float]]:
    """``{row: values}`` of the toy shards under ``out_dir`` (rows < ``count`` when given)."""
    import pyarrow.parquet as pq

    out: dict[int, list[float]] = {}
    for path in sorted(Path(out_dir).glob("shard-*.parquet")):
        t = pq.read_table(path).to_pydict()
        for r, v in zip(t["row"], t["values"], strict=True):
            if count is None or r < count:
                out[int(r)] = list(v)
    return out


# ---------------------------------------------------------------------------- stand-in stages


def prepare(spec: Mapping[str, Any], out_dir: str, benchmark: str | None = None) -> None:
    import numpy as np
    import pyarrow as pa

    _trace("prepare", spec["setting"])
    rng = np.random.default_rng(_seed(spec))
    labels = rng.integers(0, 10, N_TRAIN)
    flipped = np.zeros(N_TRAIN, bool)
    flipped[
        rng.choice(N_TRAIN, max(1, int(spec["auc"]["noise_fraction"] * N_TRAIN)), replace=False)
    ] = True
    noisy = np.where(flipped, (labels + 1) % 10, labels)
    meta = {"spec": dict(spec), "data": {"source": "toy"}, "n_train": N_TRAIN, "n_test": N_TEST}
    write_table(
        Path(out_dir) / "noisy.parquet",
        pa.table(
            {
                "train_index": np.arange(N_TRAIN),
                "label": labels,
                "noisy_label": noisy,
                "flipped": flipped,
            }
        ),
        meta,
    )
    write_json(Path(out_dir) / "meta.json", meta)


def train(
    spec: Mapping[str, Any],
    data_dir: str,
    out_dir: str,
    device: str = "auto",
    benchmark: str | None = None,
) -> None:
    _trace("train", spec["prepare"]["setting"])
    read_json(Path(data_dir) / "meta.json")
    write_json(
        Path(out_dir) / "manifest.json", {"spec": dict(spec), "files": {"clean": [], "noisy": []}}
    )


def _toy_shard(spec: Mapping[str, Any], count: int, store_dir: str) -> ToyShard:
    return ToyShard(
        str(Path(store_dir) / "shards"),
        seed=_seed(spec) % 2**31,
        rows_per_shard=spec["spec"]["shard_size"],
        count=count,
        n_test=N_TEST,
        sleep_s=float(os.environ.get("TDABENCH_TOY_SLEEP", "0")),
    )


def groundtruth(
    spec: Mapping[str, Any],
    count: int,
    store_dir: str,
    out: str,
    launcher: Mapping[str, Any] | None = None,
    device: str = "auto",
    benchmark: str | None = None,
) -> None:
    _trace("groundtruth", spec["setting"], spec["kind"], count)
    shard = _toy_shard(spec, count, store_dir)
    _real.run_shards(
        shard,
        count,
        spec["spec"]["shard_size"],
        shard.is_complete,
        store_dir,
        out,
        launcher,
        name=f"gt-{spec['kind']}",
        provenance={"groundtruth_key": f"toy-{_seed(spec):08x}", "kind": spec["kind"]},
    )


def merge(spec: Mapping[str, Any], complete: str, out: str, benchmark: str | None = None) -> None:
    import numpy as np
    import pyarrow as pa

    c = read_json(complete)
    _trace("merge", spec["setting"], spec["kind"], c["count"])
    store = Path(complete).parent / c["store"]
    rows = read_toy_shards(store / "shards", c["count"])
    if sorted(rows) != list(range(c["count"])):
        from tdabench.errors import StoreError

        raise StoreError(f"toy store {c['store']} misses rows; rerun the groundtruth stage")
    values = np.array([rows[i] for i in range(c["count"])])
    write_table(
        out,
        pa.table(
            {
                "row": pa.array(np.arange(c["count"]), pa.int64()),
                "values": pa.FixedSizeListArray.from_arrays(
                    pa.array(values.ravel(), pa.float64()), N_TEST
                ),
            }
        ),
        {"key": c["key"], "count": c["count"]},
    )


def attribute(
    spec: Mapping[str, Any],
    data_dir: str,
    models_dir: str,
    out: str,
    out_self: str,
    metrics: list[str] | None = None,
    device: str = "auto",
    benchmark: str | None = None,
) -> None:
    import numpy as np

    _trace("attribute", spec["train"]["prepare"]["setting"], spec["method"])
    read_json(Path(models_dir) / "manifest.json")
    rng = np.random.default_rng(_seed(spec))
    t0 = time.perf_counter()
    scores = rng.standard_normal((N_TRAIN, N_TEST))
    self_scores = (
        rng.standard_normal(N_TRAIN) if metrics is None or "auc" in metrics else np.zeros(0)
    )
    meta = {
        "spec": dict(spec),
        "method": spec["attributor"]["method"],
        "seconds": time.perf_counter() - t0,
    }
    write_scores(out, scores, meta)
    write_self_scores(out_self, self_scores, meta)


def evaluate(
    spec: Mapping[str, Any],
    benchmark: str,
    scores: str,
    self_scores: str,
    groundtruth: Mapping[str, str],
    noisy: str,
    out: str,
    curves_out: str,
) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    _trace("evaluate", benchmark, spec["method"])
    s = read_scores(scores)[0]
    ev = spec["evaluate"]
    result: dict[str, Any] = {
        "benchmark": benchmark,
        "method": spec["method"],
        "attribution_seconds": 0.0,
    }
    for kind in ("lds", "loo"):
        if kind in spec["metrics"]:
            v = np.array(pq.read_table(groundtruth[kind]).column("values").to_pylist())
            k = min(len(v), len(s))  # toy: pair the first k rows of scores and ground truth
            corr = [np.corrcoef(s[:k, j], v[:k, j])[0, 1] for j in range(N_TEST)]
            mean = float(np.nanmean(corr))
            lo, hi = bootstrap_ci(corr, ev["bootstrap"], ev["confidence"], ev["seed"])
            result[kind] = {"value": mean, "ci_low": lo, "ci_high": hi, "n_test": N_TEST}
            if kind == "lds":
                result[kind]["noise_ceiling"] = 0.9
    curves: dict[str, Any] = {}
    if "auc" in spec["metrics"]:
        flipped = pq.read_table(noisy).column("flipped").to_numpy()
        ss = pq.read_table(self_scores).column("score").to_numpy()
        order = np.argsort(-ss)
        tpr = np.concatenate([[0], np.cumsum(flipped[order]) / flipped.sum()])
        fpr = np.concatenate([[0], np.cumsum(~flipped[order]) / (~flipped).sum()])
        result["auc"] = {"value": float(np.trapezoid(tpr, fpr)), "num_flipped": int(flipped.sum())}
        curves["roc"] = {"fpr": fpr.tolist(), "tpr": tpr.tolist()}
    write_json(curves_out, curves)
    write_json(out, result)


def report(*args: Any, **kwargs: Any) -> None:
    _trace("report")
    _real.report(*args, **kwargs)
