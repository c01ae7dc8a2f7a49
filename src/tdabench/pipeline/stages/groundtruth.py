"""``tdabench groundtruth``: retrain every missing shard of a store through the launcher."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from tdabench.groundtruth import GroundTruthSpec, missing_shards, open_store, run_shard
from tdabench.groundtruth.trainer import make_trainer
from tdabench.pipeline.io import write_json, write_sidecar
from tdabench.pipeline.launcher import LauncherSettings, launch_shards
from tdabench.pipeline.stages._common import data_fingerprint, device, load, provenance, threads

__all__ = ["GroundTruthShard", "groundtruth", "num_shards", "run_shards"]


def num_shards(count: int, shard_size: int) -> int:
    """Shards covering ``count`` removals/subsets: shard ``i`` holds ``[i*size, (i+1)*size)``."""
    return math.ceil(count / shard_size)


class GroundTruthShard:
    """Picklable shard task: rebuilds setting, data, trainer and store in the worker, runs one shard."""

    def __init__(
        self, spec: Mapping[str, Any], count: int, store_dir: str, device: str = "auto"
    ) -> None:
        self.spec = dict(spec)
        self.count = count
        self.store_dir = store_dir
        self.device = device

    def _gspec(self, n_train: int) -> GroundTruthSpec:
        g = self.spec["spec"]
        common = {
            "seed": self.spec["seed"],
            "shard_size": g["shard_size"],
            "targets": (g["target"],),
            "n_train": n_train,
        }
        if self.spec["kind"] == "lds":
            return GroundTruthSpec(
                kind="lds",
                num_subsets=self.count,
                subset_ratio=g["subset_ratio"],
                num_runs=g["num_runs_per_subset"],
                **common,
            )
        return GroundTruthSpec(
            kind="loo", indices=tuple(range(self.count)), num_runs=g["num_runs"], **common
        )

    def objects(self) -> tuple[GroundTruthSpec, Any, Any, str]:
        """``(ground-truth spec, trainer, store, data fingerprint)`` of this task."""
        setting, data = load(self.spec)
        trainer = make_trainer(setting, data, batched=True, device=device(self.device))
        gspec = self._gspec(trainer.n_train)
        store = open_store(self.store_dir, gspec, trainer, data={"meta": data.meta})
        return gspec, trainer, store, data_fingerprint(data.meta)

    def __call__(self, shard_id: int) -> None:
        threads()
        gspec, trainer, store, _ = self.objects()
        run_shard(store, gspec, trainer, shard_id)


def run_shards(
    fn: Callable[[int], Any],
    count: int,
    shard_size: int,
    is_complete: Callable[[int], bool],
    store_dir: str,
    out: str,
    launcher: Mapping[str, Any] | LauncherSettings | None,
    name: str,
    provenance: Mapping[str, Any],
) -> dict[str, Any]:
    """Launch every incomplete shard, then write ``out`` (complete-<n>.json).

    ``out`` is written only when every shard succeeded (the launcher raises otherwise), so
    Snakemake sees the ground truth as done exactly when it is. It holds what determines the
    content (count, shard size, key, provenance); the run's facts (shards skipped and run, job
    ids, attempts, seconds) go to its sidecar ``<out>.run.json``.
    """
    settings = (
        launcher if isinstance(launcher, LauncherSettings) else LauncherSettings.from_dict(launcher)
    )
    ids = list(range(num_shards(count, shard_size)))
    rep = launch_shards(fn, ids, is_complete, settings=settings, name=name)
    summary = {
        "key": provenance.get("groundtruth_key", ""),
        "count": count,
        "shard_size": shard_size,
        "num_shards": len(ids),
        "store": os.path.relpath(store_dir, Path(out).parent),
        "provenance": dict(provenance),
    }
    facts = {
        "skipped": rep.skipped,
        "ran": rep.completed,
        "attempts": {str(k): v for k, v in rep.attempts.items()},
        "job_ids": rep.job_ids,
        "launcher_kind": settings.kind,
        "seconds": round(rep.seconds, 3),
    }
    write_json(out, summary)
    write_sidecar(out, facts)
    return {**summary, **facts}


def groundtruth(
    spec: Mapping[str, Any],
    count: int,
    store_dir: str,
    out: str,
    launcher: Mapping[str, Any] | None = None,
    device: str = "auto",
    benchmark: str | None = None,
) -> None:
    """Retrain every missing shard of the store through the launcher; write ``out`` when all
    are done (it records the store's place relative to itself, for ``merge``)."""
    task = GroundTruthShard(spec, count, store_dir, device)
    gspec, _trainer, store, fp = task.objects()
    missing = set(missing_shards(store, gspec))

    def is_complete(shard_id: int) -> bool:
        if shard_id in missing:  # re-check: another worker may have finished it meanwhile
            return shard_id not in set(missing_shards(store, gspec))
        return True

    prov = provenance(
        benchmark, "groundtruth", spec, kind=spec["kind"], groundtruth_key=store.key, data=fp
    )
    run_shards(
        task,
        count,
        spec["spec"]["shard_size"],
        is_complete,
        store_dir,
        out,
        launcher,
        name=f"gt-{spec['kind']}",
        provenance=prov,
    )
