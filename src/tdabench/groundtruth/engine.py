"""Sharded, resumable retraining into a :class:`GroundTruthStore`.

A *shard* is a block of ``shard_size`` consecutive entry indices (LDS subsets or LOO
removals). :func:`run_shard` trains every selected (entry, run) of one shard with a single
``trainer.train(masks, seeds)`` call, evaluates the targets, and writes the shard's Parquet
file (and optional stacked checkpoint) atomically. A rerun skips shards that are complete
and valid, so an interrupted job (killed, preempted) is resumed by simply running it again:
only the missing shards are trained, and the result is bit-identical to an uninterrupted run
because each shard is a pure function of the configuration and its shard id.

The trainer follows the ``Trainer`` protocol (see ``tdabench.groundtruth.trainer``)::

    trainer.fingerprint() -> dict                       # JSON-able, enters the key
    trainer.train(masks: bool (m, n_train), seeds: list[int]) -> {name: (m, ...) tensor}
    trainer.evaluate(stacked, target: str) -> (m, n_test) tensor
    trainer.n_train  (optional; else GroundTruthSpec.n_train)
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from tdabench.errors import (
    ConfigError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
    StoreError,
    TdabenchError,
)
from tdabench.groundtruth.key import (
    GroundTruthSpec,
    canonical_json,
    config_diff,
    describe_diff,
    ground_truth_config,
    ground_truth_key,
)
from tdabench.groundtruth.progress import Progress
from tdabench.groundtruth.reference import MAX_ABS_WEIGHT
from tdabench.groundtruth.store import (
    TARGET_PREFIX,
    GroundTruthStore,
    read_table_checked,
    write_table,
)
from tdabench.groundtruth.subsets import (
    entry_model_seed,
    removal_mask,
    sampling_key,
    subset_indices,
)

__all__ = [
    "VerifyReport",
    "load_full",
    "load_ground_truth",
    "load_runs",
    "merge",
    "missing_shards",
    "open_store",
    "run_full",
    "run_shard",
    "run_shards",
    "verify",
]

logger = logging.getLogger(__name__)


def open_store(
    path: str | os.PathLike,
    spec: GroundTruthSpec,
    trainer: Any,
    data: Mapping[str, Any] | None = None,
) -> GroundTruthStore:
    """Open or create the store for ``spec`` and ``trainer`` (KeyMismatchError on a different key)."""
    return GroundTruthStore.for_spec(path, spec, trainer, data)


def _check_store(store: GroundTruthStore, spec: GroundTruthSpec, trainer: Any) -> int:
    n_train = spec.resolve_n_train(trainer)
    config = ground_truth_config(spec, trainer.fingerprint(), n_train, store.config.get("data"))
    if ground_truth_key(config) != store.key:
        raise KeyMismatchError(
            f"spec/trainer do not match store {str(store.path)!r}; differing config fields: "
            f"{describe_diff(config_diff(store.config, config))}. Use the store's configuration or another directory"
        )
    return n_train


def _rows_of(spec: GroundTruthSpec, entries: Sequence[int]) -> list[tuple[int, int]]:
    return [(int(e), r) for e in entries for r in range(spec.num_runs)]


def missing_shards(
    store: GroundTruthStore, spec: GroundTruthSpec, n_train: int | None = None
) -> list[int]:
    """Shard ids of ``spec`` that are absent, invalid (truncated, corrupted, wrong key),
    incomplete (lack a selected entry) or lack a valid checkpoint when ``keep_checkpoints``.

    Args:
        store: the store.
        spec: what should be there.
        n_train: defaults to ``spec.n_train`` or the store's ``n_train``.
    """
    n = int(
        n_train
        if n_train is not None
        else spec.n_train
        if spec.n_train is not None
        else store.config["n_train"]
    )
    out = []
    for sid in spec.shard_ids(n):
        problem = store.shard_problem(
            sid, _rows_of(spec, spec.shard_entries(sid, n)), checkpoint=spec.keep_checkpoints
        )
        if problem is not None:
            if problem != "absent":
                logger.warning("shard %d of %s needs recomputing: %s", sid, store.path, problem)
            out.append(sid)
    return out


def _validate_stacked(stacked: Any, m: int) -> dict[str, Tensor]:
    if not isinstance(stacked, Mapping) or not stacked:
        raise ShapeError(
            f"trainer.train must return a non-empty dict of stacked tensors, got {type(stacked).__name__}"
        )
    for name, t in stacked.items():
        if not isinstance(t, Tensor):
            raise ShapeError(
                f"trainer.train returned {type(t).__name__} for {name!r}; every value must be a tensor"
            )
        if t.dim() == 0 or t.shape[0] != m:
            raise ShapeError(
                f"trainer.train returned {name!r} with shape {tuple(t.shape)}; the leading dimension must be the "
                f"number of models ({m}): stack the models' state dicts"
            )
    return dict(stacked)


def _nonfinite_rows(stacked: Mapping[str, Tensor], m: int) -> list[int]:
    """Models whose weights are NaN/inf or beyond :data:`~.reference.MAX_ABS_WEIGHT` (diverged)."""
    bad = torch.zeros(m, dtype=torch.bool)
    for t in stacked.values():
        if (t.is_floating_point() or t.is_complex()) and t.numel():
            flat = t.detach().reshape(m, -1)
            bad |= (
                ~torch.isfinite(flat).all(dim=1) | (flat.abs() > MAX_ABS_WEIGHT).any(dim=1)
            ).cpu()
    return bad.nonzero().flatten().tolist()


def _masks(
    cfg: Mapping[str, Any], rows: Sequence[tuple[int, int]], n_train: int
) -> tuple[Tensor, list[int], list[np.ndarray | int]]:
    """``(masks bool (m, n_train), seeds, subsets)`` of ``rows``: LDS subsets or LOO removals."""
    skey = sampling_key(cfg["kind"], int(cfg["seed"]), n_train, cfg.get("subset_ratio"))
    masks, seeds, subsets = [], [], []
    for e, r in rows:
        if cfg["kind"] == "lds":
            idx = subset_indices(skey, e, n_train, float(cfg["subset_ratio"]))
            subsets.append(idx)
            mask = torch.zeros(n_train, dtype=torch.bool)
            mask[torch.from_numpy(idx)] = True
            masks.append(mask)
        else:
            subsets.append(int(e))
            masks.append(removal_mask(e, n_train))
        seeds.append(entry_model_seed(cfg["kind"], skey, e, r))
    return torch.stack(masks), seeds, subsets


def _train_rows(
    store: GroundTruthStore, trainer: Any, rows: Sequence[tuple[int, int]], n_train: int, what: str
) -> tuple[dict[str, Tensor], dict[str, Tensor], list[int], list[np.ndarray | int]]:
    """Train and evaluate ``rows``; returns (stacked, values per target, seeds, subsets)."""
    masks, seeds, subsets = _masks(store.config, rows, n_train)
    stacked, values = _train_masks(store, trainer, masks, seeds, rows, what)
    return stacked, values, seeds, subsets


def _train_masks(
    store: GroundTruthStore,
    trainer: Any,
    masks: Tensor,
    seeds: list[int],
    rows: Sequence[tuple[int, int]],
    what: str,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Train one model per ``masks`` row (bool ``(m, n_train)``) and evaluate every target;
    returns ``(stacked weights, {target: float64 (m, n_test)})``."""
    m = len(rows)
    stacked = _validate_stacked(trainer.train(masks, seeds), m)
    bad = _nonfinite_rows(stacked, m)
    if bad:
        names = ", ".join(f"(entry {rows[i][0]}, run {rows[i][1]})" for i in bad[:10])
        raise NonFiniteError(
            f"{what}: training diverged (NaN/inf or |w| > {MAX_ABS_WEIGHT:g}) for {len(bad)} of {m} "
            f"models: {names}; lower the learning rate or add gradient clipping. Nothing was "
            "written for this shard"
        )
    values: dict[str, Tensor] = {}
    for t in store.config["targets"]:
        values[t] = _target_values(trainer, stacked, t, m, rows, what)
        if values[t].shape[1] != next(iter(values.values())).shape[1]:
            raise ShapeError(
                f"target {t!r} has {values[t].shape[1]} test values but the previous target had "
                f"{next(iter(values.values())).shape[1]}"
            )
    return stacked, values


def _target_values(
    trainer: Any,
    stacked: Mapping[str, Tensor],
    t: str,
    m: int,
    rows: Sequence[tuple[int, int]],
    what: str,
) -> Tensor:
    """``trainer.evaluate(stacked, t)`` checked: float64 ``(m, n_test)``, finite, non-empty."""
    v = trainer.evaluate(stacked, t)
    if not isinstance(v, Tensor) or v.dim() != 2 or v.shape[0] != m:
        shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
        raise ShapeError(
            f"trainer.evaluate(..., {t!r}) returned {shape}; expected (num_models={m}, n_test)"
        )
    if v.shape[1] == 0:
        raise ShapeError(
            f"trainer.evaluate(..., {t!r}) returned no test values; the test set is empty"
        )
    v = v.detach().to("cpu", torch.float64)
    badv = (~torch.isfinite(v).all(dim=1)).nonzero().flatten().tolist()
    if badv:
        names = ", ".join(f"(entry {rows[i][0]}, run {rows[i][1]})" for i in badv[:10])
        raise NonFiniteError(
            f"{what}: target {t!r} is NaN/inf for {len(badv)} models: {names}; nothing was written for this shard"
        )
    return v


def _build_table(
    kind: str,
    rows: Sequence[tuple[int, int]],
    seeds: Sequence[int],
    subsets: Sequence[Any],
    values: Mapping[str, Tensor],
) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "entry": pa.array([e for e, _ in rows], type=pa.int64()),
        "run": pa.array([r for _, r in rows], type=pa.int32()),
        "seed": pa.array(list(seeds), type=pa.int64()),
    }
    if kind == "lds":
        cols["subset"] = pa.array(
            [np.asarray(s, dtype=np.int32) for s in subsets], type=pa.list_(pa.int32())
        )
    else:
        cols["removed"] = pa.array(list(subsets), type=pa.int64())
    cols["status"] = pa.array(["ok"] * len(rows), type=pa.string())
    for t, v in values.items():
        n_test = v.shape[1]
        flat = pa.array(v.numpy().reshape(-1), type=pa.float64())
        cols[f"{TARGET_PREFIX}{t}"] = pa.FixedSizeListArray.from_arrays(flat, n_test)
    return pa.table(cols)


def run_shard(
    store: GroundTruthStore,
    spec: GroundTruthSpec,
    trainer: Any,
    shard_id: int,
    *,
    force: bool = False,
) -> Path:
    """Compute one shard unless it is already complete and valid.

    Args:
        store: the store (its key must match ``spec`` and ``trainer``).
        spec: the ground-truth spec.
        trainer: a Trainer.
        shard_id: which shard (see :meth:`GroundTruthSpec.shard_bounds`).
        force: recompute even if complete.

    Returns:
        Path of the shard's Parquet file.

    Raises:
        KeyMismatchError: spec/trainer do not match the store.
        ConfigError: the shard holds no selected entry.
        NonFiniteError: a model's weights or targets are NaN/inf (the shard is not written).
        ShapeError: the trainer returned wrongly shaped output.
    """
    n_train = _check_store(store, spec, trainer)
    entries = spec.shard_entries(shard_id, n_train)
    if not entries:
        raise ConfigError(
            f"shard {shard_id} holds no selected entry (shards: {spec.shard_ids(n_train)}); check shard_id"
        )
    rows = _rows_of(spec, entries)
    if not force and store.shard_problem(shard_id, rows, checkpoint=spec.keep_checkpoints) is None:
        logger.info("shard %d of %s is complete; skipping", shard_id, store.path)
        return store.shard_path(shard_id)
    store.clean_temporaries()
    what = f"shard {shard_id} ({store.shard_name(shard_id)})"
    t0 = time.perf_counter()
    logger.info("%s of %s: training %d models", what, store.path, len(rows))
    stacked, values, seeds, subsets = _train_rows(store, trainer, rows, n_train, what)
    table = _build_table(store.kind, rows, seeds, subsets, values)
    path = store.write_shard(shard_id, table, stacked if spec.keep_checkpoints else None, rows)
    logger.info("%s done: %d rows in %.1f s -> %s", what, len(rows), time.perf_counter() - t0, path)
    return path


def run_full(
    store: GroundTruthStore, spec: GroundTruthSpec, trainer: Any, *, force: bool = False
) -> Path:
    """Train LOO's full model(s) unless valid: one per run, on every training sample, with the
    seed that run's LOO models share (so a LOO model differs from it only by the removed
    sample), evaluated on every target. Writes ``<store>/full.parquet`` (one row per run, entry
    ``-1``) and its stacked weights ``<store>/checkpoints/full.safetensors``.

    The LOO *effect* of removing sample i is then ``load_runs(...)`` minus :func:`load_full`.
    It is exactly paired for models without random ops in training. With dropout, the batched
    trainer's masks depend on the grouping of models (see :mod:`~tdabench.groundtruth.trainer`),
    so the full model, trained in its own call, differs from each LOO model by that noise too
    (on the demo MLP about as much as the removal itself): as the LOO values themselves do.

    Raises:
        ConfigError: an LDS store (LDS subsets have no full model).
        NonFiniteError / ShapeError: as :func:`run_shard`.
    """
    n_train = _check_store(store, spec, trainer)
    if store.kind != "loo":
        raise ConfigError(f"store {str(store.path)!r} is {store.kind}: only LOO has a full model")
    if not force and store.full_problem() is None:
        logger.info("full model of %s is complete; skipping", store.path)
        return store.full_path
    rows = [(-1, r) for r in range(store.num_runs)]
    cfg = store.config
    skey = sampling_key("loo", int(cfg["seed"]), n_train)
    seeds = [entry_model_seed("loo", skey, 0, r) for _, r in rows]  # the runs' shared LOO seeds
    masks = torch.ones(len(rows), n_train, dtype=torch.bool)
    t0 = time.perf_counter()
    logger.info("full model of %s: training %d run(s)", store.path, len(rows))
    stacked, values = _train_masks(store, trainer, masks, seeds, rows, "full model")
    table = _build_table("loo", rows, seeds, [-1] * len(rows), values)
    path = store.write_full(table, stacked, rows)
    logger.info("full model done in %.1f s -> %s", time.perf_counter() - t0, path)
    return path


def load_full(path: str | os.PathLike | GroundTruthStore, target: str) -> Tensor:
    """The full model's ``target`` values of a LOO store (or store directory): float64
    ``(num_runs, n_test)``, verified (key, checksum, every run present)."""
    store = path if isinstance(path, GroundTruthStore) else GroundTruthStore(path)
    problem = store.full_problem()
    if problem is not None:
        raise StoreError(f"the full model of {str(store.path)!r} is {problem}; run run_full")
    table, _ = store.read_full()
    col = f"{TARGET_PREFIX}{target}"
    if col not in table.column_names:
        raise ConfigError(f"target {target!r} is not in this ground truth; it has {store.targets}")
    order = np.argsort(table.column("run").to_numpy())
    arr = table.column(col).combine_chunks()
    values = arr.flatten().to_numpy().reshape(table.num_rows, arr.type.list_size)[order]
    return torch.from_numpy(values.copy())


def _full_meta(store: GroundTruthStore) -> dict[str, str]:
    """The merged file's ``full_model`` stamp: every target's full-model values per run, the
    run seeds and the checksums of the full table and its checkpoint (LOO stores that have it)."""
    if store.kind != "loo" or not store.full_path.exists():
        return {}
    table, meta = store.read_full()
    values = {t: load_full(store, t).tolist() for t in store.targets}
    doc = {
        "values": values,
        "seeds": table.column("seed").to_pylist(),
        "sha256": meta["sha256"],
        "checkpoint_sha256": meta.get("checkpoint_sha256"),
    }
    return {"full_model": canonical_json(doc)}


def run_shards(
    store: GroundTruthStore,
    spec: GroundTruthSpec,
    trainer: Any,
    shard_ids: Sequence[int] | None = None,
    *,
    raise_on_error: bool = True,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run several shards (default: all missing ones), continuing past failing shards.

    Args:
        store, spec, trainer: as :func:`run_shard`.
        shard_ids: the shards to run (default: all of ``spec``; complete ones are skipped).
        raise_on_error: raise after all were attempted if any failed.
        progress: a tqdm bar (``True``), log lines every 10% / 30 s (``False``), or a bar on a
            terminal and lines otherwise (``None``, :class:`~tdabench.groundtruth.progress.Progress`).

    Returns:
        ``{"done": [ids], "skipped": [ids], "failed": {id: message}}``.

    Raises:
        StoreError: after all shards were attempted, if any failed and ``raise_on_error``.
    """
    n_train = _check_store(store, spec, trainer)
    store.clean_temporaries()
    todo = list(shard_ids) if shard_ids is not None else spec.shard_ids(n_train)
    missing = set(missing_shards(store, spec, n_train))
    report: dict[str, Any] = {"done": [], "skipped": [], "failed": {}}
    with Progress(len(todo), "shards", logger, terminal=progress) as bar:
        for sid in bar.wrap(todo):
            if sid not in missing:
                report["skipped"].append(sid)
                continue
            try:
                run_shard(store, spec, trainer, sid, force=True)
                report["done"].append(sid)
            except TdabenchError as exc:
                logger.error("shard %d failed: %s", sid, exc)
                report["failed"][sid] = f"{type(exc).__name__}: {exc}"
    if report["failed"] and raise_on_error:
        lines = "; ".join(f"shard {k}: {v}" for k, v in report["failed"].items())
        raise StoreError(
            f"{len(report['failed'])} shard(s) failed (the others were written): {lines}"
        )
    return report


def merge(store: GroundTruthStore, spec: GroundTruthSpec | None = None) -> Path:
    """Concatenate every shard into ``<store>/<kind>.parquet`` (sorted by entry, run).

    Each shard is verified (key, row count, checksum); an invalid shard is reported, never
    skipped. With ``spec``, every selected entry must be present.

    Raises:
        StoreError: an invalid shard, duplicated rows, inconsistent ``n_test``, or (with
            ``spec``) missing shards -- the message names them.
    """
    files = store.shard_files()
    if not files:
        raise StoreError(f"store {str(store.path)!r} has no shards to merge; run the shards first")
    tables, problems = [], []
    for sid, _ in files:
        try:
            tables.append(store.read_shard(sid)[0])
        except StoreError as exc:
            problems.append(f"shard {sid}: {exc}")
    if problems:
        raise StoreError(
            f"merge refused: {len(problems)} invalid shard(s): " + " | ".join(problems)
        )
    if spec is not None:
        n_train = int(store.config["n_train"])
        miss = missing_shards(store, spec, n_train)
        if miss:
            raise StoreError(
                f"merge refused: shards {miss} are missing or incomplete; run them first (run_shards)"
            )
    try:
        table = pa.concat_tables(tables)
    except pa.ArrowInvalid as exc:
        raise StoreError(
            f"shards of {str(store.path)!r} disagree in schema (e.g. n_test) ({exc}); recompute the odd shard"
        ) from exc
    order = np.lexsort((table.column("run").to_numpy(), table.column("entry").to_numpy()))
    table = table.take(pa.array(order))
    pairs = np.stack([table.column("entry").to_numpy(), table.column("run").to_numpy()], axis=1)
    if len(pairs) > 1 and np.any(np.all(pairs[1:] == pairs[:-1], axis=1)):
        raise StoreError(
            "merge refused: the same (entry, run) appears in two shards; delete the stray shard file"
        )
    meta = {
        "key": store.key,
        "config": canonical_json(store.config),
        "kind": store.kind,
        "shard": "merged",
        "shards": ",".join(p.name for _, p in files),
        **_full_meta(store),
    }
    write_table(store.merged_path, table, meta)
    return store.merged_path


def _read_any(path: str | os.PathLike | GroundTruthStore) -> tuple[pa.Table, dict[str, Any]]:
    """Read a merged file, or every shard of a store directory; verified."""
    if isinstance(path, GroundTruthStore):
        store = path
    else:
        p = Path(path)
        if p.is_file():
            table, meta = read_table_checked(p)
            try:
                return table, json.loads(meta["config"])
            except ValueError as exc:
                raise StoreError(
                    f"{str(p)!r} has corrupted config metadata ({exc}); recompute it"
                ) from exc
        store = GroundTruthStore(p)
    tables = [store.read_shard(sid)[0] for sid, _ in store.shard_files()]
    if not tables:
        raise StoreError(f"store {str(store.path)!r} has no shards; run the shards first")
    table = pa.concat_tables(tables)
    order = np.lexsort((table.column("run").to_numpy(), table.column("entry").to_numpy()))
    return table.take(pa.array(order)), store.config


def load_runs(
    path: str | os.PathLike | GroundTruthStore, target: str
) -> tuple[Tensor, Tensor, Tensor]:
    """All runs of a ground truth.

    Args:
        path: a merged Parquet file, a store directory or a :class:`GroundTruthStore`.
        target: target name (one of the store's ``targets``).

    Returns:
        ``(values, entries, subsets)``: ``values`` float64 ``(S, R, n_test)``; ``entries``
        int64 ``(S,)``; ``subsets`` int64 ``(S, subset_size)`` (LDS) or the removed indices
        ``(S,)`` (LOO).

    Raises:
        StoreError: an entry lacks some run, or a file is invalid.
        ConfigError: unknown target.
    """
    table, config = _read_any(path)
    col = f"{TARGET_PREFIX}{target}"
    if col not in table.column_names:
        raise ConfigError(
            f"target {target!r} is not in this ground truth; it has {list(config['targets'])}"
        )
    entries = table.column("entry").to_numpy()
    runs = table.column("run").to_numpy()
    r = int(config["num_runs"])
    uniq, first = np.unique(entries, return_index=True)
    if len(entries) != len(uniq) * r or not np.array_equal(runs, np.tile(np.arange(r), len(uniq))):
        raise StoreError(
            f"ground truth rows are not complete (entry, run) blocks of {r} runs; recompute the incomplete shards"
        )
    arr = table.column(col).combine_chunks()
    n_test = arr.type.list_size
    values = arr.flatten().to_numpy().reshape(len(uniq), r, n_test)
    if config["kind"] == "lds":
        sub = table.column("subset").combine_chunks().take(pa.array(first))
        k = len(sub[0]) if len(sub) else 0
        subsets = torch.from_numpy(sub.flatten().to_numpy().astype(np.int64).reshape(len(uniq), k))
    else:
        subsets = torch.from_numpy(table.column("removed").to_numpy()[first].astype(np.int64))
    return torch.from_numpy(values.copy()), torch.from_numpy(uniq.astype(np.int64)), subsets


def load_ground_truth(
    path: str | os.PathLike | GroundTruthStore, target: str
) -> tuple[Tensor, Tensor]:
    """Ground truth in the form :func:`tdabench.metric.lds` / :func:`~tdabench.metric.loo_corr` take.

    Returns:
        ``(values, subsets)``: ``values`` float64 ``(S, n_test)``, the mean over runs;
        ``subsets`` the ``(S, subset_size)`` training indices (LDS) or the ``(S,)`` removed
        indices (LOO). Targets are stored as evaluated (no sign flip): use a higher-is-better
        target (``margin``, ``neg_loss``) for LDS and ``loss`` for LOO.
    """
    values, _, subsets = load_runs(path, target)
    return values.mean(dim=1), subsets


@dataclass
class VerifyReport:
    """Outcome of :func:`verify`.

    Attributes:
        checked: ``(entry, run)`` rows retrained.
        differing: one dict per differing (row, target): ``entry``, ``run``, ``target``,
            ``max_abs_diff``, ``bitwise_equal``; plus rows whose stored subset or seed does
            not match its derivation (``target`` = ``"subset"``/``"seed"``).
        rtol, atol: tolerance used (0, 0 = bitwise).
        max_abs_diff: largest difference seen over all checked values.
    """

    checked: list[tuple[int, int]]
    differing: list[dict[str, Any]] = field(default_factory=list)
    rtol: float = 0.0
    atol: float = 0.0
    max_abs_diff: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.differing


def _verify_groups(
    chosen: list[tuple[int, int, int, int]],
    shard_tables: Mapping[int, pa.Table],
    whole_shards: bool,
) -> list[tuple[list[tuple[int, int]], list[tuple[int, int, int, int]]]]:
    """``(rows trained together, chosen members among them)``: whole shards, or the rows alone."""
    if not whole_shards:
        return [([(e, r) for _, _, e, r in chosen], chosen)]
    groups = []
    for sid in sorted({c[0] for c in chosen}):
        t = shard_tables[sid]
        rows = list(zip(t.column("entry").to_pylist(), t.column("run").to_pylist(), strict=True))
        groups.append((rows, [c for c in chosen if c[0] == sid]))
    return groups


def _difference(e: int, r: int, target: str, diff: float, bitwise: bool) -> dict[str, Any]:
    """One :attr:`VerifyReport.differing` record."""
    return {"entry": e, "run": r, "target": target, "max_abs_diff": diff, "bitwise_equal": bitwise}


def _compare_rows(
    store: GroundTruthStore,
    trainer: Any,
    rows: list[tuple[int, int]],
    members: list[tuple[int, int, int, int]],
    shard_tables: Mapping[int, pa.Table],
    n_train: int,
    report: VerifyReport,
) -> None:
    """Retrain ``rows`` together and record in ``report`` every member that differs."""
    rtol, atol = report.rtol, report.atol
    _, values, seeds, subsets = _train_rows(store, trainer, rows, n_train, "verify")
    pos = {row: i for i, row in enumerate(rows)}
    for sid, i, e, r in members:
        j = pos[(e, r)]
        t = shard_tables[sid]
        if int(t.column("seed")[i].as_py()) != seeds[j]:
            report.differing.append(_difference(e, r, "seed", float("nan"), False))
        stored_sub = (
            t.column("subset")[i].as_py() if store.kind == "lds" else t.column("removed")[i].as_py()
        )
        if not np.array_equal(np.asarray(stored_sub), np.asarray(subsets[j])):
            report.differing.append(_difference(e, r, "subset", float("nan"), False))
        for name, v in values.items():
            stored = torch.tensor(
                t.column(f"{TARGET_PREFIX}{name}")[i].as_py(), dtype=torch.float64
            )
            diff = float((stored - v[j]).abs().max())
            report.max_abs_diff = max(report.max_abs_diff, diff)
            bitwise = bool(torch.equal(stored, v[j]))
            close = bitwise or bool(torch.isclose(v[j], stored, rtol=rtol, atol=atol).all())
            if not close:
                report.differing.append(_difference(e, r, name, diff, bitwise))


# Spelled out: a public signature (keyword-only tolerances), alike in shape to other public ones.
def verify(
    store: GroundTruthStore,
    trainer: Any,
    k: int = 5,
    seed: int = 0,
    *,
    rtol: float = 0.0,
    atol: float = 0.0,
    whole_shards: bool = True,
) -> VerifyReport:
    """Retrain ``k`` randomly chosen stored (entry, run) rows and compare with the store.

    The rows are drawn without replacement with ``numpy.random.Generator(PCG64(seed))``
    from all valid shards. The stored subset and seed of each row are also checked against
    their derivation from the key. With ``whole_shards=True`` (default) every shard
    containing a drawn row is retrained as a whole -- the same models trained together in one
    call as originally -- which reproduces batched (vmap) trainers bit for bit, since their
    floating-point results may depend on the batch composition. With ``False`` only the
    drawn rows are retrained, together in one call: cheaper, and exact for trainers whose
    models do not interact numerically (e.g. a sequential loop).

    Args:
        store: the store to check.
        trainer: a trainer whose fingerprint matches the store's.
        k: rows to retrain.
        seed: choice of rows.
        rtol, atol: tolerance (``torch.isclose``); ``0, 0`` requires bitwise equality
            (expected for CPU runs on the same hardware and software).
        whole_shards: retrain whole shards (see above).

    Returns:
        :class:`VerifyReport`.
    """
    if k < 1:
        raise ConfigError(f"k must be >= 1, got {k}")
    n_train = int(store.config["n_train"])
    fp_config = dict(store.config, trainer=trainer.fingerprint())
    if ground_truth_key(fp_config) != store.key:
        raise KeyMismatchError(
            f"the trainer does not match store {str(store.path)!r}: {describe_diff(config_diff(store.config, fp_config))}"
        )
    shard_tables = {sid: store.read_shard(sid)[0] for sid, _ in store.shard_files()}
    if not shard_tables:
        raise StoreError(f"store {str(store.path)!r} has no shards to verify")
    all_rows = [
        (sid, i, int(e), int(r))
        for sid, t in shard_tables.items()
        for i, (e, r) in enumerate(
            zip(t.column("entry").to_pylist(), t.column("run").to_pylist(), strict=True)
        )
    ]
    rng = np.random.Generator(np.random.PCG64(seed))
    pick = sorted(rng.choice(len(all_rows), size=min(k, len(all_rows)), replace=False).tolist())
    chosen = [all_rows[i] for i in pick]
    report = VerifyReport(checked=[(e, r) for _, _, e, r in chosen], rtol=rtol, atol=atol)
    for rows, members in _verify_groups(chosen, shard_tables, whole_shards):
        _compare_rows(store, trainer, rows, members, shard_tables, n_train, report)
    return report
