"""``tdabench merge``: one verified, stamped Parquet file of a complete ground-truth store."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdabench._io import read_json_checked, read_parquet, safe_join
from tdabench.errors import IntegrityError
from tdabench.groundtruth import merge as merge_store
from tdabench.pipeline.io import write_sidecar, write_table
from tdabench.pipeline.stages._common import provenance
from tdabench.pipeline.stages.groundtruth import GroundTruthShard

__all__ = ["merge"]


def merge(spec: Mapping[str, Any], complete: str, out: str, benchmark: str | None = None) -> None:
    """Merge the store's shards into one Parquet file at ``out``.

    Every shard is verified (key, rows, checksum); the merged table is written with the
    store's stamps plus the provenance (benchmark, kind, ground-truth key, data fingerprint).

    Raises:
        IntegrityError / ProvenanceError: ``complete`` is altered or from another configuration.
        StoreError: a shard is missing or invalid.
    """
    expect = {"kind": spec["kind"], **({"benchmark": benchmark} if benchmark else {})}
    fix = "rerun the groundtruth stage"
    summary = read_json_checked(complete, expect, what="completion record", fix=fix)
    # the store is the completion record's directory (``store`` is recorded relative to it)
    store_dir = safe_join(
        Path(complete).parent, summary.get("store", "."), "completion record store"
    )
    task = GroundTruthShard(spec, int(summary["count"]), str(store_dir))
    gspec, _trainer, store, fp = task.objects()
    if summary["provenance"].get("groundtruth_key") != store.key:
        raise IntegrityError(
            f"{complete!r} records ground-truth key {summary['provenance'].get('groundtruth_key')}"
            f", but the store for this spec has {store.key}; {fix}"
        )
    table, meta = read_parquet(merge_store(store, gspec), key=store.key)
    prov = provenance(
        benchmark, "merge", spec, kind=spec["kind"], groundtruth_key=store.key, data=fp
    )
    fields = ("key", "config", "kind", "shard", "shards", "full_model")  # full: LOO's reference
    keep = {k: v for k, v in meta.items() if k in fields}
    write_table(out, table, keep, prov)
    write_sidecar(out)
