"""On-disk store of ground-truth values: Parquet shards, a manifest and safetensors checkpoints.

Layout of a store directory::

    <dir>/manifest.json                         {"format", "key", "config", "created", "tdabench_version"}
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
resolved JSON), ``version``, ``revision`` (``git describe`` or ``"unknown"``), ``created``
(UTC ISO time), ``rows``, ``sha256`` (:func:`table_digest` of the data, independent of the
Parquet encoding), ``kind``, ``shard`` (``"start-stop"``) and, with checkpoints,
``checkpoint_sha256``. Safetensors checkpoints carry ``key``, ``config``, ``rows`` (JSON list
of ``[entry, run]``) and ``tensors_sha256`` in their metadata.

Every file is written under a temporary name in its final directory and ``os.replace``\\ d
into place once complete, so a file under its final name is always whole; every read
re-checks the key, the row count and the checksum, so a truncated or altered file is never
silently used. Nothing is ever unpickled.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import logging
import os
import socket
import struct
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torch import Tensor

from tdabench.errors import ConfigError, KeyMismatchError, StoreError, UnsafeFileError
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

META_PREFIX = "tdabench."
TARGET_PREFIX = "target."


def _version() -> str:
    from tdabench import __version__

    return __version__


@functools.lru_cache(maxsize=1)
def code_revision() -> str:
    """``$TDABENCH_REVISION``, else ``git describe --always --dirty`` of the source tree, else ``"unknown"``."""
    env = os.environ.get("TDABENCH_REVISION")
    if env:
        return env
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--tags"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    rev = out.stdout.strip()
    return rev if out.returncode == 0 and rev else "unknown"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{_host()}.{os.getpid()}.tmp")


def _fsync_replace(tmp: Path, final: Path) -> None:
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary file in the same directory and ``os.replace``."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
        _fsync_replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


def clean_stale_temporaries(directory: Path) -> list[Path]:
    """Remove this host's temporary files whose writing process no longer exists."""
    removed = []
    if not directory.is_dir():
        return removed
    host = _host()
    for p in directory.glob(".*.tmp"):
        parts = p.name.rsplit(".", 3)  # [".<name>", host, pid, "tmp"]
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit():
            continue
        pid = int(parts[2])
        if pid == os.getpid():
            continue
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            p.unlink(missing_ok=True)
            removed.append(p)
        except PermissionError:
            pass
    return removed


# ----------------------------------------------------------------------------- checksums


def _hash_array(h: Any, arr: pa.Array) -> None:
    if arr.null_count:
        raise StoreError("ground-truth tables must not contain nulls; the file was not written by tdabench")
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        h.update(f"fsl{t.list_size}".encode())
        _hash_array(h, arr.flatten())
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        h.update(np.asarray(pc.list_value_length(arr).to_numpy(zero_copy_only=False), dtype=np.int64).tobytes())
        _hash_array(h, arr.flatten())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        vals = arr.to_pylist()
        h.update(np.asarray([len(v.encode()) for v in vals], dtype=np.int64).tobytes())
        h.update("".join(vals).encode())
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)).tobytes())
    else:
        raise StoreError(f"unexpected column type {t} in a ground-truth table")


def _type_desc(t: pa.DataType) -> str:
    """Type name without list field names (Parquet renames ``item`` to ``element``)."""
    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_desc(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_desc(t.value_type)}>"
    return str(t)


def table_digest(table: pa.Table) -> str:
    """sha256 of a table's column names, types and values (independent of the Parquet encoding,
    compression and chunking; metadata is not included)."""
    h = hashlib.sha256()
    h.update(f"rows={table.num_rows};".encode())
    for name in table.column_names:
        col = table.column(name)
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        h.update(f"col={name}:{_type_desc(arr.type)};".encode())
        _hash_array(h, arr)
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ----------------------------------------------------------------------------- parquet


def write_table(path: str | os.PathLike, table: pa.Table, metadata: Mapping[str, str]) -> str:
    """Write ``table`` atomically with provenance metadata; returns the data checksum.

    ``metadata`` must contain ``key`` and ``config``; ``version``, ``revision``,
    ``created``, ``rows`` and ``sha256`` are added.
    """
    digest = table_digest(table)
    meta = {
        "version": _version(),
        "revision": code_revision(),
        "created": _now(),
        **{k: str(v) for k, v in metadata.items()},
        "rows": str(table.num_rows),
        "sha256": digest,
    }
    table = table.replace_schema_metadata({f"{META_PREFIX}{k}": v for k, v in meta.items()})
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(final)
    try:
        pq.write_table(table, tmp, compression="zstd")
        _fsync_replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


def table_metadata(table_or_schema: pa.Table | pa.Schema) -> dict[str, str]:
    """The ``tdabench.*`` key-value metadata of a table or schema, without the prefix."""
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    raw = schema.metadata or {}
    out = {}
    for k, v in raw.items():
        ks = k.decode("utf-8", "replace")
        if ks.startswith(META_PREFIX):
            out[ks[len(META_PREFIX) :]] = v.decode("utf-8", "replace")
    return out


def read_table_checked(path: str | os.PathLike, key: str | None = None) -> tuple[pa.Table, dict[str, str]]:
    """Read a Parquet file written by :func:`write_table` and verify it.

    Checks that it parses, carries tdabench metadata, has the recorded row count and data
    checksum and (when ``key`` is given) the expected ground-truth key.

    Raises:
        StoreError: naming the file and what is wrong. (KeyMismatchError for a wrong key.)
    """
    p = Path(path)
    try:
        table = pq.read_table(p)
    except Exception as exc:
        raise StoreError(f"cannot read {str(p)!r} ({type(exc).__name__}: {exc}); it is truncated or corrupted: delete it and recompute") from exc
    meta = table_metadata(table)
    for field in ("key", "rows", "sha256"):
        if field not in meta:
            raise StoreError(f"{str(p)!r} has no tdabench.{field} metadata; it was not written by tdabench (or was altered): delete it and recompute")
    if key is not None and meta["key"] != key:
        raise KeyMismatchError(
            f"{str(p)!r} holds ground truth with key {meta['key'][:12]}..., expected {key[:12]}...; "
            "files of different configurations are never mixed: move it out of this store"
        )
    if str(table.num_rows) != meta["rows"]:
        raise StoreError(f"{str(p)!r} has {table.num_rows} rows but its metadata records {meta['rows']}; delete it and recompute")
    digest = table_digest(table)
    if digest != meta["sha256"]:
        raise StoreError(f"{str(p)!r} fails its checksum (data altered or corrupted); delete it and recompute")
    return table.replace_schema_metadata(None), meta


# ----------------------------------------------------------------------------- safetensors


def _safetensors_header(path: Path, error_cls: type[Exception]) -> tuple[dict[str, Any], int]:
    """Parse and sanity-check a safetensors header without loading tensors.

    Returns ``(header, file_size)``. Raises :class:`UnsafeFileError` for files that are
    not safetensors (pickles, ``torch.save`` zips) and ``error_cls`` for truncated ones.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            first = fh.read(1) if 0 < n <= size - 8 else b""
            blob = first + fh.read(n - 1) if first == b"{" else b""
    except OSError as exc:
        raise error_cls(f"cannot read {str(path)!r}: {exc}") from exc
    if first != b"{":
        kind = "a pickle" if head[:1] == b"\x80" else "a torch.save zip archive" if head[:2] == b"PK" else "not a safetensors file"
        raise UnsafeFileError(
            f"{str(path)!r} is {kind}; tdabench only loads safetensors and never unpickles files, "
            "so it is refused. Delete it and recompute the checkpoint (or convert trusted weights with safetensors.torch.save_file)"
        )
    try:
        header = json.loads(blob.decode("utf-8"))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except Exception as exc:
        raise error_cls(f"{str(path)!r} has a corrupted safetensors header ({exc}); delete it and recompute") from exc
    if size != 8 + n + end:
        raise error_cls(f"{str(path)!r} is truncated or padded ({size} bytes, header says {8 + n + end}); delete it and recompute")
    return header, size


def read_safetensors_checked(
    path: str | os.PathLike, key: str | None = None, error_cls: type[Exception] = StoreError, verify: bool = True
) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Load a safetensors file after checking it is one (never unpickles).

    Args:
        path: file to read.
        key: expected ``key`` metadata, if any.
        error_cls: error type for corrupted/truncated files.
        verify: recompute ``tensors_sha256`` (when present) and compare.

    Returns:
        ``(tensors, metadata)``.
    """
    from safetensors.torch import load_file

    p = Path(path)
    header, _ = _safetensors_header(p, error_cls)
    meta = dict(header.get("__metadata__") or {})
    if key is not None and meta.get("key") != key:
        raise KeyMismatchError(
            f"{str(p)!r} holds weights for key {str(meta.get('key'))[:12]}..., expected {key[:12]}...; move it out of this store"
        )
    try:
        tensors = load_file(str(p))
    except Exception as exc:
        raise error_cls(f"cannot read {str(p)!r} ({exc}); delete it and recompute") from exc
    if verify and "tensors_sha256" in meta and tensors_digest(tensors) != meta["tensors_sha256"]:
        raise error_cls(f"{str(p)!r} fails its checksum (weights altered or corrupted); delete it and recompute")
    return tensors, meta


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """Save ``tensors`` atomically with metadata plus ``tensors_sha256``; returns that digest."""
    from safetensors.torch import save_file

    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}  # clone: unshare tied weights
    digest = tensors_digest(tensors)
    meta = {**{k: str(v) for k, v in metadata.items()}, "tensors_sha256": digest, "created": _now(), "version": _version()}
    tmp = _tmp_name(final)
    try:
        save_file(tensors, str(tmp), metadata=meta)
        _fsync_replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()
    return digest


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

    def __init__(self, path: str | os.PathLike, key: str | None = None, config: Mapping[str, Any] | None = None):
        self.path = Path(path)
        manifest = self.path / "manifest.json"
        if config is not None:
            config = json.loads(canonical_json(config))
            computed = ground_truth_key(config)
            if key is None:
                key = computed
            elif computed != key:
                raise StoreError(f"key {key[:12]}... is not the hash of the given config ({computed[:12]}...); pass the config the key was made from")
        if manifest.exists():
            stored = self._read_manifest(manifest)
            if key is not None and stored["key"] != key:
                diff = config_diff(stored["config"], config) if config is not None else []
                fields = describe_diff(diff) if diff else "(no config given to compare; pass config= to see the fields)"
                raise KeyMismatchError(
                    f"store {str(self.path)!r} holds ground truth with key {stored['key'][:12]}... but was opened with key "
                    f"{key[:12]}...; differing config fields: {fields}. Use another directory for the new configuration, "
                    "or restore the old configuration to reuse this one"
                )
            self.key: str = stored["key"]
            self.config: dict[str, Any] = stored["config"]
        else:
            if key is None:
                raise StoreError(f"{str(self.path)!r} is not a ground-truth store (no manifest.json); create it with a key and config")
            if config is None:
                raise ConfigError("creating a store needs its config (ground_truth_config(...)) as well as its key")
            self.key, self.config = key, dict(config)
            doc = {"format": STORE_FORMAT, "key": key, "config": self.config, "created": _now(), "tdabench_version": _version()}
            atomic_write_bytes(manifest, (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode())

    @staticmethod
    def _read_manifest(manifest: Path) -> dict[str, Any]:
        try:
            doc = json.loads(manifest.read_text())
            key, config = doc["key"], doc["config"]
        except Exception as exc:
            raise StoreError(f"{str(manifest)!r} is unreadable ({exc}); restore it or delete the store directory") from exc
        if ground_truth_key(config) != key:
            raise StoreError(f"{str(manifest)!r} was altered: its key is not the hash of its config; restore it or delete the store")
        return {"key": key, "config": config}

    @classmethod
    def for_spec(cls, path: str | os.PathLike, spec: Any, trainer: Any, data: Mapping[str, Any] | None = None) -> GroundTruthStore:
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
            parts = p.stem.split("-")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                start, stop = int(parts[1]), int(parts[2])
                if stop - start == self.shard_size and start % self.shard_size == 0:
                    out.append((start // self.shard_size, p))
        return sorted(out)

    def clean_temporaries(self) -> list[Path]:
        """Remove this host's temporary files left by writers that no longer run (e.g. killed jobs)."""
        return clean_stale_temporaries(self.shards_dir) + clean_stale_temporaries(self.checkpoints_dir) + clean_stale_temporaries(self.path)

    # -- shards ---------------------------------------------------------------------------
    def read_shard(self, shard_id: int) -> tuple[pa.Table, dict[str, str]]:
        """The verified table and metadata of a shard (StoreError if absent or invalid)."""
        p = self.shard_path(shard_id)
        if not p.exists():
            raise StoreError(f"shard {shard_id} ({p.name}) is missing from {str(self.path)!r}; run run_shard(..., {shard_id})")
        table, meta = read_table_checked(p, self.key)
        if meta.get("shard") != self.shard_name(shard_id):
            raise StoreError(f"{str(p)!r} records shard {meta.get('shard')!r}, not {self.shard_name(shard_id)!r}; delete it and recompute")
        return table, meta

    def shard_problem(self, shard_id: int, rows: Sequence[tuple[int, int]] | None = None, checkpoint: bool = False) -> str | None:
        """``None`` if the shard is complete and valid, else a short reason.

        Args:
            shard_id: the shard.
            rows: ``(entry, run)`` pairs that must be present (``None``: no check).
            checkpoint: also require a valid checkpoint (header, size and digest link are
                checked; the weights are only re-hashed by :meth:`load_checkpoint`).
        """
        p = self.shard_path(shard_id)
        if not p.exists():
            return "absent"
        try:
            table, meta = self.read_shard(shard_id)
        except StoreError as exc:
            return f"invalid: {exc}"
        if rows is not None:
            have = set(zip(table.column("entry").to_pylist(), table.column("run").to_pylist(), strict=True))
            lacking = [r for r in rows if tuple(r) not in have]
            if lacking:
                return f"incomplete: lacks {len(lacking)} of {len(rows)} (entry, run) rows"
        if checkpoint:
            c = self.checkpoint_path(shard_id)
            if not c.exists():
                return "checkpoint absent"
            try:
                header, _ = _safetensors_header(c, StoreError)
            except (StoreError, UnsafeFileError) as exc:
                return f"checkpoint invalid: {exc}"
            cmeta = header.get("__metadata__") or {}
            if cmeta.get("key") != self.key or cmeta.get("tensors_sha256") != meta.get("checkpoint_sha256"):
                return "checkpoint does not belong to this shard table"
        return None

    def write_shard(
        self,
        shard_id: int,
        table: pa.Table,
        stacked: Mapping[str, Tensor] | None = None,
        rows: Sequence[tuple[int, int]] | None = None,
    ) -> Path:
        """Write a shard (its checkpoint first, when given; the Parquet file last marks completion)."""
        name = self.shard_name(shard_id)
        meta = {"key": self.key, "config": canonical_json(self.config), "kind": self.kind, "shard": name}
        if stacked is not None:
            cmeta = {"key": self.key, "config": canonical_json(self.config), "shard": name, "rows": json.dumps([list(r) for r in rows or []])}
            meta["checkpoint_sha256"] = write_safetensors(self.checkpoint_path(shard_id), stacked, cmeta)
        write_table(self.shard_path(shard_id), table, meta)
        return self.shard_path(shard_id)

    def load_checkpoint(self, shard_id: int) -> tuple[dict[str, Tensor], list[tuple[int, int]]]:
        """Stacked weights of a shard and the ``(entry, run)`` of each leading index.

        Raises:
            UnsafeFileError: the file is not safetensors (e.g. a pickle); it is not opened.
            StoreError: missing, truncated, altered, or not matching the shard's table.
        """
        c = self.checkpoint_path(shard_id)
        if not c.exists():
            raise StoreError(f"no checkpoint for shard {shard_id} in {str(self.path)!r}; run it with keep_checkpoints=True")
        tensors, meta = read_safetensors_checked(c, self.key, StoreError)
        _, tmeta = self.read_shard(shard_id)
        if tmeta.get("checkpoint_sha256") != meta.get("tensors_sha256"):
            raise StoreError(f"{str(c)!r} does not match shard {shard_id}'s table; delete both and recompute the shard")
        rows = [tuple(r) for r in json.loads(meta.get("rows", "[]"))]
        return tensors, rows  # type: ignore[return-value]
