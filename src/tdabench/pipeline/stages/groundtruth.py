"""``tdabench groundtruth``: retrain every missing shard of a store through the launcher."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tdabench.groundtruth import GroundTruthSpec, missing_shards, open_store, run_shard
from tdabench.groundtruth.engine import run_full
from tdabench.groundtruth.progress import Progress
from tdabench.groundtruth.trainer import make_trainer
from tdabench.pipeline.io import write_json, write_sidecar
from tdabench.pipeline.launcher import LauncherSettings, launch_shards
from tdabench.pipeline.logs import worker_logging
from tdabench.pipeline.stages._common import data_fingerprint, device, load, provenance, threads

__all__ = ["FULL", "GroundTruthShard", "groundtruth", "num_shards", "run_shards", "worker_logs"]

#: Task id of LOO's full model(s) (:func:`tdabench.groundtruth.engine.run_full`), launched with
#: the shards so it runs where they run (a SLURM node, not the submit host).
FULL = -1

logger = logging.getLogger(__name__)


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
        worker_logging()  # a submitit worker's story goes to its *_log.err, named in the rule log
        gspec, trainer, store, _ = self.objects()
        if shard_id == FULL:
            run_full(store, gspec, trainer)
        else:
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
    extra: Sequence[int] = (),
) -> dict[str, Any]:
    """Launch every incomplete shard, then write ``out`` (complete-<n>.json).

    ``out`` is written only when every shard succeeded (the launcher raises otherwise), so
    Snakemake sees the ground truth as done exactly when it is; ``extra`` task ids (e.g.
    :data:`FULL`) are launched with the shards. ``out`` holds what determines the
    content (count, shard size, key, provenance); the run's facts (shards skipped and run, job
    ids, attempts, seconds) go to its sidecar ``<out>.run.json``.
    """
    settings = (
        launcher if isinstance(launcher, LauncherSettings) else LauncherSettings.from_dict(launcher)
    )
    ids = list(range(num_shards(count, shard_size)))
    rep = launch_shards(fn, [*extra, *ids], is_complete, settings=settings, name=name)
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


def worker_logs(folder: str | os.PathLike[str], job_ids: list[str]) -> list[str]:
    """The stdout/stderr files submitit wrote for ``job_ids`` under the launcher's ``folder``."""
    root = Path(folder)
    return sorted(
        str(p)
        for j in job_ids
        for p in root.glob(f"{j}*/{j}*_log.*")
        if p.suffix in (".out", ".err")
    )


def groundtruth(
    spec: Mapping[str, Any],
    count: int,
    store_dir: str,
    out: str,
    launcher: Mapping[str, Any] | LauncherSettings | None = None,
    device: str = "auto",
    benchmark: str | None = None,
) -> None:
    """Retrain every missing shard of the store through the launcher; write ``out`` when all
    are done (it records the store's place relative to itself, for ``merge``).

    The log tells the whole story: the parameters and ground-truth key, how many shards are
    missing, progress as they complete (a bar on a terminal, lines otherwise), the worker log
    files of every submitted job, and a "done" line with counts and time.
    """
    task = GroundTruthShard(spec, count, store_dir, device)
    gspec, _trainer, store, fp = task.objects()
    extra = [FULL] if spec["kind"] == "loo" else []  # the LOO effect's reference

    def incomplete() -> set[int]:
        return set(missing_shards(store, gspec)) | {
            i for i in extra if store.full_problem() is not None
        }

    missing = incomplete()
    name = f"gt-{spec['kind']}"
    n = num_shards(count, spec["spec"]["shard_size"])
    logger.info(
        "%s of %s: %d %s, %d shards of %d in %s (key %s); to train: %d shard(s)%s",
        name, benchmark, count, "subsets" if spec["kind"] == "lds" else "removals", n,
        spec["spec"]["shard_size"], store_dir, store.key[:16], len(missing - {FULL}),
        " and the full model" if FULL in missing else "",
    )  # fmt: skip
    progress = Progress(len(missing), f"{name} shards", logger, terminal=False)
    counted: set[int] = set()

    def is_complete(shard_id: int) -> bool:
        if shard_id in missing:  # re-check: another worker may have finished it meanwhile
            done = shard_id not in incomplete()
            if done and shard_id not in counted:
                counted.add(shard_id)
                progress.update()
            return done
        return True

    prov = provenance(
        benchmark, "groundtruth", spec, kind=spec["kind"], groundtruth_key=store.key, data=fp
    )
    size = spec["spec"]["shard_size"]
    if not isinstance(launcher, LauncherSettings):
        launcher = LauncherSettings.from_dict(launcher)
    res = run_shards(task, count, size, is_complete, store_dir, out, launcher, name, prov, extra)
    for path in worker_logs(launcher.folder, res["job_ids"]):
        logger.info("%s: worker log %s", name, path)
    logger.info(
        "%s done: %d shards complete (%d trained, %d already complete) in %.1f s; wrote %s",
        name, res["num_shards"], len(res["ran"]), len(res["skipped"]), res["seconds"], out,
    )  # fmt: skip
