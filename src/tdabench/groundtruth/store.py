"""On-disk store of ground-truth values: Parquet shards, a manifest and safetensors checkpoints.

Layout of a store directory::

    <dir>/manifest.json                         {"format", "key", "config", "tdabench_version"}
    <dir>/shards/<kind>-<start>-<stop>.parquet  one file per complete shard (entries start..stop-1)
    <dir>/checkpoints/<kind>-<start>-<stop>.safetensors   optional stacked weights of a shard
    <dir>/<kind>.parquet                        written by merge(): all shards in one table

Parquet schema (one row per (entry, run), sorted by entry then run):

    entry   int64     LDS: subset index; LOO: the removed training index
    run     int32     0 .. num_runs - 1
    seed    int64     seed of that model (derive_seed(sampling_key, "model", entry, run))
    subset  list<int32>   LDS only: sorted training indices of the subset
    removed int64     LOO only: the removed training index (== entry)
    status  string    "ok" (failed shards are never written)
    target.<name>  fixed_size_list<float64>[n_test]   one column per target

Key-value metadata on every Parquet file (``tdabench.`` prefix): ``key``, ``config`` (full
resolved JSON), ``version``, ``rows``, ``sha256`` (:func:`table_digest` of the data, independent
of the Parquet encoding), ``kind``, ``shard`` (``"start-stop"``) and, with checkpoints,
``checkpoint_sha256``. Safetensors checkpoints carry ``key``, ``config``, ``rows`` (JSON list
of ``[entry, run]``), ``version`` and ``tensors_sha256`` in their metadata. Nothing volatile
(creation time, host, code revision) is stored, so a recompute is byte-identical (files written
by :mod:`tdabench._io`).

Every file is written under a temporary name in its final directory and ``os.replace``\\ d
into place once complete, so a file under its final name is always whole; every read
re-checks the key, the row count and the checksum, so a truncated or altered file is never
silently used. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
from torch import Tensor

from tdabench import _io
from tdabench.errors import (
    ConfigError,
    IntegrityError,
    KeyMismatchError,
    StoreError,
    UnsafeFileError,
)
from tdabench.groundtruth.key import (
    STORE_FORMAT,
    canonical_json,
    config_diff,
    describe_diff,
    ground_truth_key,
)

__all__ = [
    "GroundTruthStore",
    "atomic_write_bytes",
    "code_revision",
    "read_safetensors_checked",
    "read_table_checked",
    "table_digest",
    "tensors_digest",
    "write_table",
]

logger = logging.getLogger(__name__)

META_PREFIX = _io.META_PREFIX
TARGET_PREFIX = "target."

# The store's file primitives are those of tdabench._io (one home for atomic writes, checksums
# and provenance); the names below are kept for the modules and notebooks that import them here.
atomic_write_bytes = _io.atomic_write_bytes
clean_stale_temporaries = _io.clean_stale_temporaries
code_revision = _io.code_revision
table_digest = _io.table_digest
tensors_digest = _io.tensors_digest
table_metadata = _io.parquet_metadata


def write_table(path: str | os.PathLike, table: pa.Table, metadata: Mapping[str, str]) -> str:
    """Write ``table`` atomically, stamped with ``metadata`` (``key``, ``config``, ...), ``rows``
    and ``sha256``; returns the data checksum (see :func:`tdabench._io.write_parquet`)."""
    return _io.write_parquet(path, table, metadata)


def read_table_checked(
    path: str | os.PathLike, key: str | None = None
) -> tuple[pa.Table, dict[str, str]]:
    """Read and verify a Parquet file written by :func:`write_table` (row count, checksum and,
    when given, the ground-truth ``key``).

    Raises:
        StoreError: naming the file and what is wrong (IntegrityError, KeyMismatchError).
    """
    table, meta = _io.read_parquet(path, key=key, fix="delete it and recompute")
    if "key" not in meta:
        raise StoreError(
            f"{str(path)!r} has no tdabench.key metadata; it is not a ground-truth file: "
            "delete it and recompute"
        )
    return table, meta


def _safetensors_header(path: Path, error_cls: type[Exception]) -> tuple[dict[str, Any], int]:
    return _io.safetensors_header(path, error_cls)


def read_safetensors_checked(
    path: str | os.PathLike,
    key: str | None = None,
    error_cls: type[Exception] = StoreError,
    verify: bool = True,
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file after checking it is one (never unpickles); see
    :func:`tdabench._io.read_safetensors`. Returns ``(tensors, metadata)``."""
    return _io.read_safetensors(path, key=key, error_cls=error_cls, verify=verify)


def write_safetensors(
    path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]
) -> str:
    """Save ``tensors`` atomically with metadata plus ``tensors_sha256``; returns that digest."""
    return _io.write_safetensors(path, tensors, metadata)


# ----------------------------------------------------------------------------- the store


class GroundTruthStore:
    """A directory of ground-truth shards for one ground-truth key.

    Args:
        path: store directory (created if needed).
        key: the ground-truth key the caller expects (:func:`ground_truth_key`).
            ``None`` opens an existing store read-only-style, trusting its manifest.
        config: the resolved configuration (:func:`ground_truth_config`); required when
            creating a store, and used to name the differing fields on a mismatch.

    Raises:
        KeyMismatchError: the directory holds a different key; the message lists the
            differing configuration fields.
        StoreError: the manifest is unreadable, or ``key`` does not hash ``config``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        key: str | None = None,
        config: Mapping[str, Any] | None = None,
    ):
        self.path = Path(path)
        # LOO's full model(s): one row per run, trained on every sample with the runs' seeds
        self.full_path = self.path / "full.parquet"
        self.full_checkpoint_path = self.path / "checkpoints" / "full.safetensors"
        manifest = self.path / "manifest.json"
        if config is not None:
            config = json.loads(canonical_json(config))
            computed = ground_truth_key(config)
            if key is None:
                key = computed
            elif computed != key:
                raise StoreError(
                    f"key {key[:12]}... is not the hash of the given config ({computed[:12]}...); pass the config the key was made from"
                )
        if manifest.exists():
            stored = self._read_manifest(manifest)
            if key is not None and stored["key"] != key:
                diff = config_diff(stored["config"], config) if config is not None else []
                fields = (
                    describe_diff(diff)
                    if diff
                    else "(no config given to compare; pass config= to see the fields)"
                )
                raise KeyMismatchError(
                    f"store {str(self.path)!r} holds ground truth with key {stored['key'][:12]}... but was opened with key "
                    f"{key[:12]}...; differing config fields: {fields}. Use another directory for the new configuration, "
                    "or restore the old configuration to reuse this one"
                )
            self.key: str = stored["key"]
            self.config: dict[str, Any] = stored["config"]
        else:
            if key is None:
                raise StoreError(
                    f"{str(self.path)!r} is not a ground-truth store (no manifest.json); create it with a key and config"
                )
            if config is None:
                raise ConfigError(
                    "creating a store needs its config (ground_truth_config(...)) as well as its key"
                )
            self.key, self.config = key, dict(config)
            doc = {
                "format": STORE_FORMAT,
                "key": key,
                "config": self.config,
                "tdabench_version": _io._version(),
            }
            atomic_write_bytes(
                manifest, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
            )

    @staticmethod
    def _read_manifest(manifest: Path) -> dict[str, Any]:
        try:
            doc = json.loads(manifest.read_text())
            key, config = doc["key"], doc["config"]
        except Exception as exc:
            raise StoreError(
                f"{str(manifest)!r} is unreadable ({exc}); restore it or delete the store directory"
            ) from exc
        if ground_truth_key(config) != key:
            raise StoreError(
                f"{str(manifest)!r} was altered: its key is not the hash of its config; restore it or delete the store"
            )
        return {"key": key, "config": config}

    @classmethod
    def for_spec(
        cls, path: str | os.PathLike, spec: Any, trainer: Any, data: Mapping[str, Any] | None = None
    ) -> GroundTruthStore:
        """Open (or create) the store for ``spec`` trained by ``trainer``."""
        from tdabench.groundtruth.key import ground_truth_config

        n_train = spec.resolve_n_train(trainer)
        config = ground_truth_config(spec, trainer.fingerprint(), n_train, data)
        return cls(path, ground_truth_key(config), config)

    # -- naming ---------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return str(self.config["kind"])

    @property
    def shard_size(self) -> int:
        return int(self.config["shard_size"])

    @property
    def num_runs(self) -> int:
        return int(self.config["num_runs"])

    @property
    def targets(self) -> list[str]:
        return list(self.config["targets"])

    @property
    def shards_dir(self) -> Path:
        return self.path / "shards"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def merged_path(self) -> Path:
        return self.path / f"{self.kind}.parquet"

    def shard_name(self, shard_id: int) -> str:
        start, stop = shard_id * self.shard_size, (shard_id + 1) * self.shard_size
        return f"{self.kind}-{start:07d}-{stop:07d}"

    def shard_path(self, shard_id: int) -> Path:
        return self.shards_dir / f"{self.shard_name(shard_id)}.parquet"

    def checkpoint_path(self, shard_id: int) -> Path:
        return self.checkpoints_dir / f"{self.shard_name(shard_id)}.safetensors"

    def shard_files(self) -> list[tuple[int, Path]]:
        """``(shard_id, path)`` of every shard file under its final name, by shard id."""
        out = []
        for p in self.shards_dir.glob(f"{self.kind}-*-*.parquet"):
            _io.safe_join(self.shards_dir, p.name, "shard file")  # no symlink out of the store
            parts = p.stem.split("-")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                start, stop = int(parts[1]), int(parts[2])
                if stop - start == self.shard_size and start % self.shard_size == 0:
                    out.append((start // self.shard_size, p))
        return sorted(out)

    def clean_temporaries(self) -> list[Path]:
        """Remove this host's temporary files left by writers that no longer run (e.g. killed jobs)."""
        return (
            clean_stale_temporaries(self.shards_dir)
            + clean_stale_temporaries(self.checkpoints_dir)
            + clean_stale_temporaries(self.path)
        )

    # -- shards and the full model (LOO) ----------------------------------------------------
    def _read(self, name: str, p: Path, what: str, fix: str) -> tuple[pa.Table, dict[str, str]]:
        if not p.exists():
            raise StoreError(f"{what} ({p.name}) is missing from {str(self.path)!r}; {fix}")
        _io.safe_join(p.parent, p.name, "shard file")  # no symlink out of the store
        table, meta = read_table_checked(p, self.key)
        if meta.get("shard") != name:
            raise StoreError(
                f"{str(p)!r} records shard {meta.get('shard')!r}, not {name!r}; delete it and recompute"
            )
        return table, meta

    def read_shard(self, shard_id: int) -> tuple[pa.Table, dict[str, str]]:
        """The verified table and metadata of a shard (StoreError if absent or invalid)."""
        name, p = self.shard_name(shard_id), self.shard_path(shard_id)
        return self._read(name, p, f"shard {shard_id}", f"run run_shard(..., {shard_id})")

    def read_full(self) -> tuple[pa.Table, dict[str, str]]:
        """The verified table of LOO's full model(s) (StoreError if absent or invalid)."""
        return self._read("full", self.full_path, "the full model", "run run_full(...)")

    def _problem(
        self, name: str, p: Path, c: Path, rows: Sequence[tuple[int, int]] | None, checkpoint: bool
    ) -> str | None:
        if not p.exists():
            return "absent"
        try:
            table, meta = self._read(name, p, name, "recompute it")
        except StoreError as exc:
            return f"invalid: {exc}"
        if rows is not None:
            have = set(
                zip(table.column("entry").to_pylist(), table.column("run").to_pylist(), strict=True)
            )
            lacking = [r for r in rows if tuple(r) not in have]
            if lacking:
                return f"incomplete: lacks {len(lacking)} of {len(rows)} (entry, run) rows"
        if checkpoint:
            if not c.exists():
                return "checkpoint absent"
            try:
                _, cmeta = read_safetensors_checked(c, self.key, IntegrityError)
            except (StoreError, UnsafeFileError) as exc:
                return f"checkpoint invalid: {exc}"
            if cmeta.get("tensors_sha256") != meta.get("checkpoint_sha256"):
                return "checkpoint does not belong to this shard table"
        return None

    def shard_problem(
        self, shard_id: int, rows: Sequence[tuple[int, int]] | None = None, checkpoint: bool = False
    ) -> str | None:
        """``None`` if the shard is complete and valid, else a short reason.

        Args:
            shard_id: the shard.
            rows: ``(entry, run)`` pairs that must be present (``None``: no check).
            checkpoint: also require a valid checkpoint: header, size, the digest link to the
                table, and the weights re-hashed, so a damaged checkpoint is recomputed on resume.
        """
        name, p = self.shard_name(shard_id), self.shard_path(shard_id)
        return self._problem(name, p, self.checkpoint_path(shard_id), rows, checkpoint)

    def full_problem(self) -> str | None:
        """``None`` if LOO's full-model table (every run) and its checkpoint are valid."""
        rows = [(-1, r) for r in range(self.num_runs)]
        return self._problem("full", self.full_path, self.full_checkpoint_path, rows, True)

    def _write(
        self,
        name: str,
        path: Path,
        ckpt: Path,
        table: pa.Table,
        stacked: Mapping[str, Tensor] | None,
        rows: Sequence[tuple[int, int]] | None,
    ) -> Path:
        meta = {"key": self.key, "config": canonical_json(self.config), "kind": self.kind}
        meta["shard"] = name
        if stacked is not None:
            cmeta = {**meta, "rows": json.dumps([list(r) for r in rows or []])}
            del cmeta["kind"]
            meta["checkpoint_sha256"] = write_safetensors(ckpt, stacked, cmeta)
        write_table(path, table, meta)
        return path

    def write_shard(
        self,
        shard_id: int,
        table: pa.Table,
        stacked: Mapping[str, Tensor] | None = None,
        rows: Sequence[tuple[int, int]] | None = None,
    ) -> Path:
        """Write a shard (its checkpoint first, when given; the Parquet file last marks completion)."""
        name, path = self.shard_name(shard_id), self.shard_path(shard_id)
        return self._write(name, path, self.checkpoint_path(shard_id), table, stacked, rows)

    def write_full(
        self, table: pa.Table, stacked: Mapping[str, Tensor], rows: Sequence[tuple[int, int]]
    ) -> Path:
        """Write LOO's full model(s): checkpoint first, then the table (marks completion)."""
        return self._write("full", self.full_path, self.full_checkpoint_path, table, stacked, rows)

    def load_checkpoint(self, shard_id: int) -> tuple[dict[str, Tensor], list[tuple[int, int]]]:
        """Stacked weights of a shard and the ``(entry, run)`` of each leading index.

        Raises:
            UnsafeFileError: the file is not safetensors (e.g. a pickle); it is not opened.
            StoreError: missing, truncated, altered, or not matching the shard's table.
        """
        c = self.checkpoint_path(shard_id)
        if not c.exists():
            raise StoreError(
                f"no checkpoint for shard {shard_id} in {str(self.path)!r}; run it with keep_checkpoints=True"
            )
        tensors, meta = read_safetensors_checked(c, self.key, IntegrityError)
        _, tmeta = self.read_shard(shard_id)
        if tmeta.get("checkpoint_sha256") != meta.get("tensors_sha256"):
            raise StoreError(
                f"{str(c)!r} does not match shard {shard_id}'s table; delete both and recompute the shard"
            )
        rows = [tuple(r) for r in json.loads(meta.get("rows", "[]"))]
        return tensors, rows  # type: ignore[return-value]
