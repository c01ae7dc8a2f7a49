"""One home for tdabench's file I/O: atomic writes, checksums, provenance, sidecars, safe paths.

Every file a stage or the ground-truth store writes goes through this module:

* **Atomic writes** (:func:`atomic_path`, :func:`atomic_write_bytes`, :func:`write_json`):
  a temporary name in the final directory (``.<name>.<host>.<pid>.<token>.tmp``), fsync, then
  ``os.replace``. A file under its final name is always whole; a full disk raises
  :class:`~tdabench.errors.DiskFullError` ("disk full at PATH") and leaves no temporary behind.
* **Content checksums of the data part**, independent of the container's encoding:
  :func:`table_digest` (Arrow columns and values), :func:`tensors_digest` (names, dtypes, shapes,
  bytes), :func:`json_digest` (canonical JSON of the body without its ``sha256`` field).
* **Stamps** in each file's own metadata: Parquet key-value metadata ``tdabench.sha256``,
  ``tdabench.rows``, ``tdabench.provenance`` (+ the caller's fields); safetensors metadata
  ``tensors_sha256`` and ``provenance``; JSON fields ``sha256`` and ``provenance``. The provenance
  key is a JSON object (benchmark, spec hash, data fingerprint, ground-truth key, attributor
  arguments: whatever determines the content). Nothing volatile (time, host, revision, timings)
  goes into a stamped file, so a recompute is byte-identical; volatile facts go to a sidecar
  ``<file>.run.json`` (:func:`write_sidecar`), which DVC ignores (``.dvcignore``: ``*.run.json``).
* **Verification** (:func:`verify_output`): re-hash the data, compare with the stamp, compare the
  provenance with what the reader expects; :class:`~tdabench.errors.IntegrityError` /
  :class:`~tdabench.errors.ProvenanceError` name the file, the expected and found value, the fix.
* :func:`code_revision` (the one revision stamp), :func:`mix_seed` (the one seed-mixing
  function) and :func:`safe_join` (manifest names that must stay inside their directory).

Only the standard library and numpy are imported at module load; pyarrow, torch and safetensors
are imported by the functions that need them.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import math
import os
import secrets
import socket
import struct
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tdabench.errors import (
    ConfigError,
    DiskFullError,
    IntegrityError,
    ProvenanceError,
    UnsafeFileError,
    UnsafePathError,
)

__all__ = [
    "META_PREFIX",
    "SIDECAR_SUFFIX",
    "atomic_dir",
    "atomic_path",
    "atomic_write_bytes",
    "canonical_json",
    "clean_stale_temporaries",
    "code_revision",
    "config_diff",
    "describe_diff",
    "json_digest",
    "mix_seed",
    "parquet_metadata",
    "read_json",
    "read_parquet",
    "read_safetensors",
    "read_sidecar",
    "safe_join",
    "safetensors_header",
    "table_digest",
    "tensors_digest",
    "verify_output",
    "write_json",
    "write_parquet",
    "write_safetensors",
    "write_sidecar",
]

PathLike = str | os.PathLike[str]

#: Prefix of tdabench's Parquet key-value metadata.
META_PREFIX = "tdabench."
#: Suffix of the sidecar holding a file's volatile facts (not tracked by DVC).
SIDECAR_SUFFIX = ".run.json"
_SEED_MASK = (1 << 63) - 1
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


# ----------------------------------------------------------------------------- JSON, seeds


def _jsonable(obj: Any, path: str = "") -> Any:
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        f = float(obj)
        if not math.isfinite(f):
            raise ConfigError(
                f"configuration value {path or '<root>'} is {f}; only finite numbers can be keyed"
            )
        return f
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise ConfigError(f"configuration key {k!r} at {path or '<root>'} must be a string")
            out[k] = _jsonable(v, f"{path}.{k}" if path else k)
        return out
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{path}[{i}]") for i, v in enumerate(obj)]
    raise ConfigError(
        f"configuration value at {path or '<root>'} has type {type(obj).__name__}, which is not "
        "JSON-able; fingerprints must be made of strings, numbers, lists and dicts "
        "(hash tensors first)"
    )


def canonical_json(obj: Any) -> str:
    """Canonical JSON: sorted keys, no whitespace, ASCII, finite numbers only.

    Raises:
        ConfigError: a value is not JSON-able or not finite.
    """
    return json.dumps(
        _jsonable(obj), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(obj, Mapping) and obj:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix or "<root>"] = obj


def config_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """Differing fields of two configs as ``(dotted.path, old_value, new_value)``.

    A field missing on one side appears with the value ``"<absent>"``.
    """
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten(old, "", a)
    _flatten(new, "", b)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k, "<absent>"), b.get(k, "<absent>")
        if canonical_json(va) != canonical_json(vb):
            out.append((k, va, vb))
    return out


def _short(v: Any, n: int = 60) -> str:
    text = canonical_json(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= n else text[: n - 3] + "..."


def describe_diff(diff: Sequence[tuple[str, Any, Any]], limit: int = 10) -> str:
    """One-line, human-readable rendering of :func:`config_diff`'s output."""
    parts = [f"{k}: {_short(a)} -> {_short(b)}" for k, a, b in diff[:limit]]
    if len(diff) > limit:
        parts.append(f"... and {len(diff) - limit} more")
    return "; ".join(parts)


def mix_seed(*parts: Any, scheme: str = "text") -> int:
    """A seed in ``[0, 2**63)`` that is a pure function of ``parts`` (platform independent).

    The two schemes are frozen encodings: changing either would change every stored seed.

    Args:
        *parts: strings and ints naming the use (e.g. ``key, "model", i, r``).
        scheme: ``"text"`` -- sha256 of ``"tdabench\\x1f" + "\\x1f".join(str(p))``, first 8
            bytes big-endian, top bit cleared (subset and model seeds of the ground truth);
            ``"json"`` -- sha256 of ``json.dumps(parts, sort_keys=True)``, first 8 bytes
            little-endian, shifted right by one (the trainers' stream and dropout seeds).
    """
    if scheme == "text":
        digest = hashlib.sha256("\x1f".join(["tdabench", *(str(p) for p in parts)]).encode())
        return int.from_bytes(digest.digest()[:8], "big") & _SEED_MASK
    if scheme == "json":
        digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
        return int.from_bytes(digest.digest()[:8], "little") >> 1
    raise ConfigError(f"unknown seed scheme {scheme!r}; use 'text' or 'json'")


@functools.lru_cache(maxsize=1)
def code_revision() -> str:
    """The one revision stamp: ``$TDABENCH_REVISION``, else ``git describe --always --dirty
    --tags`` of the source tree, else ``"unknown"``. Goes into sidecars only (volatile)."""
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


def _version() -> str:
    from tdabench import __version__

    return __version__


# ----------------------------------------------------------------------------- atomic writes


def _host() -> str:
    return socket.gethostname().replace(".", "_") or "host"


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{_host()}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def _disk_full(exc: OSError, path: Path) -> DiskFullError:
    return DiskFullError(
        f"disk full at {str(path)!r} ({os.strerror(exc.errno or errno.ENOSPC)}); free space or "
        "set results_dir to a larger file system, then rerun (nothing partial was kept)"
    )


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write ``tmp``; on success it is fsynced and renamed to ``p``.

    The temporary file lives in the same directory (same file system, so ``os.replace`` is
    atomic); on an exception it is removed and ``p`` is left untouched.

    Raises:
        DiskFullError: the disk (or quota, or file-size limit) is full; never worth a retry.
    """
    final = Path(path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc, final) from exc
        raise
    tmp = _tmp_name(final)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc, final) from exc
        raise
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(path: PathLike) -> Iterator[Path]:
    """``with atomic_dir(d) as tmp:`` fill the directory ``tmp``; on success it replaces ``d``.

    A directory output (e.g. the trained models) is therefore either the previous complete one
    or the new complete one, never a partial mix, whether the stage runs under Snakemake or by
    hand. On an exception the temporary directory is removed and ``d`` is left untouched.

    Raises:
        DiskFullError: the disk (or quota) is full.
    """
    import shutil

    final = Path(path)
    tmp = _tmp_name(final)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        _swap_dir(tmp, final)
    except OSError as exc:
        if exc.errno in _DISK_FULL:
            raise _disk_full(exc, final) from exc
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _swap_dir(tmp: Path, final: Path) -> None:
    """Put the directory ``tmp`` in place of ``final``; concurrent writers of the same complete
    output may race, so a vanished or reappearing ``final`` is retried (the last one wins)."""
    import shutil

    for _ in range(10):
        old = _tmp_name(final)
        with contextlib.suppress(FileNotFoundError):
            os.replace(final, old)  # move any previous (complete) version aside
        try:
            os.replace(tmp, final)
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            continue  # another writer put its version in place meanwhile: move it aside again
        finally:
            shutil.rmtree(old, ignore_errors=True)
        return
    raise OSError(errno.EBUSY, f"could not replace {final} (other writers kept replacing it)")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        fh.write(data)


def clean_stale_temporaries(directory: PathLike) -> list[Path]:
    """Remove this host's temporary files in ``directory`` whose writer no longer runs."""
    removed: list[Path] = []
    d = Path(directory)
    if not d.is_dir():
        return removed
    host = _host()
    for p in d.glob(".*.tmp"):
        parts = p.name.rsplit(".", 4)  # [".<name>", host, pid, token, "tmp"]
        if len(parts) != 5 or parts[1] != host or not parts[2].isdigit():
            parts = p.name.rsplit(".", 3)  # older writers: [".<name>", host, pid, "tmp"]
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


def _hash_array(h: Any, arr: Any) -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    if arr.null_count:
        raise IntegrityError("tdabench tables hold no nulls; the file was altered: recompute it")
    t = arr.type
    if pa.types.is_fixed_size_list(t):
        h.update(f"fsl{t.list_size}".encode())
        _hash_array(h, arr.flatten())
    elif pa.types.is_list(t) or pa.types.is_large_list(t):
        lengths = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
        h.update(np.asarray(lengths, dtype=np.int64).tobytes())
        _hash_array(h, arr.flatten())
    elif pa.types.is_string(t) or pa.types.is_large_string(t):
        vals = arr.to_pylist()
        h.update(np.asarray([len(v.encode()) for v in vals], dtype=np.int64).tobytes())
        h.update("".join(vals).encode())
    elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t):
        h.update(np.ascontiguousarray(arr.to_numpy(zero_copy_only=False)).tobytes())
    else:
        raise IntegrityError(f"unexpected column type {t} in a tdabench table; recompute the file")


def _type_desc(t: Any) -> str:
    """Type name without list field names (Parquet renames ``item`` to ``element``)."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(t):
        return f"fixed_size_list<{_type_desc(t.value_type)}>[{t.list_size}]"
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        return f"list<{_type_desc(t.value_type)}>"
    return str(t)


def table_digest(table: Any) -> str:
    """sha256 of a ``pyarrow.Table``'s row count, column names, types and values (independent of
    the Parquet encoding, compression and chunking; metadata is not included)."""
    import pyarrow as pa

    h = hashlib.sha256()
    h.update(f"rows={table.num_rows};".encode())
    for name in table.column_names:
        col = table.column(name)
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        h.update(f"col={name}:{_type_desc(arr.type)};".encode())
        _hash_array(h, arr)
    return h.hexdigest()


def tensors_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 of the names, dtypes, shapes and bytes of a state dict (sorted by name)."""
    import torch

    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _meta_digest(meta: Mapping[str, str]) -> str:
    """sha256 of a file's stamp fields (all but the checksums themselves), so that a damaged
    metadata value (provenance, config) is found like damaged data."""
    rest = {k: v for k, v in meta.items() if k not in ("sha256", "tensors_sha256", "meta_sha256")}
    return hashlib.sha256(json.dumps(rest, sort_keys=True).encode()).hexdigest()


def _check_meta(path: Path, meta: Mapping[str, str], fix: str) -> None:
    if "meta_sha256" in meta and _meta_digest(meta) != meta["meta_sha256"]:
        raise IntegrityError(
            f"{str(path)!r} fails its metadata checksum (its stamps were altered or corrupted); "
            + (fix or "delete it and rerun the stage that writes it")
        )


def json_digest(body: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``body`` without its ``sha256`` field."""
    rest = {k: v for k, v in body.items() if k != "sha256"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"), allow_nan=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- JSON files


def write_json(
    path: PathLike, obj: Mapping[str, Any] | Any, *, checksum: bool = True
) -> str | None:
    """Write ``obj`` as indented, key-sorted JSON atomically; returns its checksum.

    With ``checksum`` (and a dict ``obj``) a ``sha256`` field (:func:`json_digest`) is added,
    which :func:`verify_output` checks.
    """
    digest = None
    if checksum and isinstance(obj, Mapping):
        digest = json_digest(obj)
        obj = {**obj, "sha256": digest}
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    atomic_write_bytes(path, text.encode())
    return digest


def read_json(path: PathLike, *, what: str = "file", fix: str = "") -> Any:
    """Parse a JSON file; a missing or garbled one raises a typed error naming it.

    Raises:
        IntegrityError: the file is missing, unreadable or not JSON.
    """
    p = Path(path)
    try:
        return json.loads(p.read_text())
    except FileNotFoundError as exc:
        raise IntegrityError(
            f"{what} {str(p)!r} does not exist; "
            + (fix or "run the stage that writes it (or fix the path)")
        ) from exc
    except (OSError, ValueError) as exc:
        raise IntegrityError(
            f"{what} {str(p)!r} is not readable JSON ({exc}); "
            + (fix or "delete it and rerun the stage that writes it")
        ) from exc


def write_sidecar(path: PathLike, facts: Mapping[str, Any] | None = None) -> Path:
    """Write ``<path>.run.json``: the volatile facts of how ``path`` was made.

    Holds ``created`` (UTC), ``host``, ``code_revision``, ``tdabench_version`` and ``facts``
    (timings, job ids). DVC ignores these files, so the tracked output stays byte-reproducible.
    """
    side = Path(f"{path}{SIDECAR_SUFFIX}")
    doc = {
        "file": Path(path).name,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": socket.gethostname(),
        "code_revision": code_revision(),
        "tdabench_version": _version(),
        **dict(facts or {}),
    }
    write_json(side, doc, checksum=False)
    return side


def read_sidecar(path: PathLike) -> dict[str, Any]:
    """The sidecar facts of ``path`` (``{}`` when there is none or it is unreadable)."""
    try:
        return dict(json.loads(Path(f"{path}{SIDECAR_SUFFIX}").read_text()))
    except (OSError, ValueError, TypeError):
        return {}


# ----------------------------------------------------------------------------- provenance


def check_provenance(
    path: PathLike, found: Mapping[str, Any], expect: Mapping[str, Any] | None, fix: str = ""
) -> None:
    """Compare the provenance ``found`` in ``path`` with the fields the reader ``expect``\\ s.

    Raises:
        ProvenanceError: naming the file, the first differing field, both values and the fix.
    """
    for k, want in (expect or {}).items():
        have = found.get(k)
        if have == want or (have is not None and str(have) == str(want)):
            continue
        raise ProvenanceError(
            f"{str(path)!r} was made for {k} = {have!r}, expected {want!r}; "
            + (fix or "it belongs to another configuration: rerun the stage that writes it")
        )


def _provenance_of(meta: Mapping[str, str], path: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    if "provenance" in meta:
        try:
            found = dict(json.loads(meta["provenance"]))
        except (ValueError, TypeError) as exc:
            raise IntegrityError(
                f"{str(path)!r} has unreadable provenance metadata ({exc}); delete it and rerun "
                "the stage that writes it"
            ) from exc
    if "key" in meta:
        found.setdefault("groundtruth_key", meta["key"])
    return found


# ----------------------------------------------------------------------------- Parquet


# pipeline.io.write_table re-spells this signature (a documented wrapper; owned there).
def write_parquet(
    path: PathLike,
    table: Any,
    meta: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Write a ``pyarrow.Table`` atomically, stamped; returns its data checksum.

    Metadata (prefix ``tdabench.``): the caller's ``meta`` (strings as they are, other values
    as JSON), ``provenance`` (JSON), ``version``, ``rows`` and ``sha256`` (:func:`table_digest`).
    Nothing volatile: put timings and dates in :func:`write_sidecar`.
    """
    import pyarrow.parquet as pq

    digest = table_digest(table)
    stamps = {
        "version": _version(),
        **{
            k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
            for k, v in (meta or {}).items()
        },
        "rows": str(table.num_rows),
        "sha256": digest,
    }
    if provenance is not None:
        stamps["provenance"] = json.dumps(dict(provenance), sort_keys=True, default=str)
    stamps["meta_sha256"] = _meta_digest(stamps)
    table = table.replace_schema_metadata({f"{META_PREFIX}{k}": v for k, v in stamps.items()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")
    return digest


def parquet_metadata(table_or_schema: Any) -> dict[str, str]:
    """The ``tdabench.*`` key-value metadata of a table or schema, without the prefix."""
    schema = getattr(table_or_schema, "schema", table_or_schema)
    out = {}
    for k, v in (schema.metadata or {}).items():
        ks = k.decode("utf-8", "replace")
        if ks.startswith(META_PREFIX):
            out[ks[len(META_PREFIX) :]] = v.decode("utf-8", "replace")
    return out


def read_parquet(
    path: PathLike,
    expect: Mapping[str, Any] | None = None,
    *,
    key: str | None = None,
    fix: str = "",
) -> tuple[Any, dict[str, str]]:
    """Read a Parquet file written by :func:`write_parquet` and verify it.

    Checks that it parses, carries tdabench stamps, has the stamped row count and checksum, the
    ground-truth ``key`` (when given) and the ``expect``\\ ed provenance fields.

    Returns:
        ``(table without metadata, tdabench metadata)``.

    Raises:
        IntegrityError: unreadable, truncated, unstamped or altered (names the file and the fix).
        KeyMismatchError: another ground-truth key. ProvenanceError: other provenance.
    """
    import pyarrow.parquet as pq

    from tdabench.errors import KeyMismatchError

    p = Path(path)
    redo = fix or "delete it and rerun the stage that writes it"
    try:
        table = pq.read_table(p)
    except FileNotFoundError as exc:
        raise IntegrityError(f"{str(p)!r} does not exist; {redo}") from exc
    except Exception as exc:
        raise IntegrityError(
            f"cannot read {str(p)!r} ({type(exc).__name__}: {exc}); it is truncated or "
            f"corrupted: {redo}"
        ) from exc
    meta = parquet_metadata(table)
    for field in ("rows", "sha256"):
        if field not in meta:
            raise IntegrityError(
                f"{str(p)!r} has no tdabench.{field} stamp; it was not written by tdabench (or "
                f"was altered): {redo}"
            )
    if key is not None and meta.get("key") != key:
        raise KeyMismatchError(
            f"{str(p)!r} holds ground truth with key {str(meta.get('key'))[:12]}..., expected "
            f"{key[:12]}...; files of different configurations are never mixed: move it away"
        )
    _check_meta(p, meta, redo)
    if str(table.num_rows) != meta["rows"]:
        raise IntegrityError(
            f"{str(p)!r} has {table.num_rows} rows but its stamp records {meta['rows']}; {redo}"
        )
    found = table_digest(table)
    if found != meta["sha256"]:
        raise IntegrityError(
            f"{str(p)!r} fails its checksum: expected sha256 {meta['sha256'][:16]}..., found "
            f"{found[:16]}... (data altered or corrupted); {redo}"
        )
    check_provenance(p, _provenance_of(meta, p), expect, fix)
    return table.replace_schema_metadata(None), meta


# ----------------------------------------------------------------------------- safetensors


def _not_safetensors(path: Path, head: bytes) -> UnsafeFileError:
    kind = (
        "a pickle"
        if head[:1] == b"\x80"
        else "a torch.save zip archive"
        if head[:2] == b"PK"
        else "not a safetensors file"
    )
    return UnsafeFileError(
        f"{str(path)!r} is {kind}; tdabench only loads safetensors and never unpickles files, "
        "so it is refused. Delete it and recompute the checkpoint (or convert trusted weights "
        "with safetensors.torch.save_file)"
    )


def safetensors_header(
    path: PathLike, error_cls: type[Exception] = IntegrityError
) -> tuple[dict[str, Any], int]:
    """Parse and sanity-check a safetensors header without loading tensors.

    Returns:
        ``(header, file_size)``.

    Raises:
        UnsafeFileError: not safetensors (a pickle, a ``torch.save`` zip); never opened further.
        error_cls: missing, truncated, padded or a corrupted header.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            first = fh.read(1) if 0 < n <= size - 8 else b""
            blob = first + fh.read(n - 1) if first == b"{" else b""
    except OSError as exc:
        raise error_cls(f"cannot read {str(p)!r}: {exc}; rerun the stage that writes it") from exc
    if first != b"{":
        raise _not_safetensors(p, head)
    try:
        header = json.loads(blob.decode("utf-8"))
        end = max(
            (int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"),
            default=0,
        )
    except Exception as exc:
        raise error_cls(
            f"{str(p)!r} has a corrupted safetensors header ({exc}); delete it and recompute"
        ) from exc
    if size != 8 + n + end:
        raise error_cls(
            f"{str(p)!r} is truncated or padded ({size} bytes, header says {8 + n + end}); "
            "delete it and recompute"
        )
    return header, size


def write_safetensors(
    path: PathLike,
    tensors: Mapping[str, Any],
    metadata: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> str:
    """Save ``tensors`` atomically with ``metadata``, ``provenance`` and ``tensors_sha256``.

    Returns:
        The tensors' checksum (:func:`tensors_digest`).
    """
    from safetensors.torch import save

    # clone: unshare tied weights (safetensors refuses shared storage)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    digest = tensors_digest(tensors)
    meta = {
        k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
        for k, v in (metadata or {}).items()
    }
    meta.update(tensors_sha256=digest, version=_version())
    if provenance is not None:
        meta["provenance"] = json.dumps(dict(provenance), sort_keys=True, default=str)
    meta["meta_sha256"] = _meta_digest(meta)
    atomic_write_bytes(path, _canonical_safetensors(save(tensors, metadata=meta)))
    return digest


def _canonical_safetensors(blob: bytes) -> bytes:
    """The same file with its header's keys sorted: safetensors writes its metadata map in a
    per-process random order, which would make identical weights differ byte-wise."""
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + n])
    text = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # cannot happen (same keys and values), but never corrupt a file
        return blob
    return blob[:8] + text + b" " * (n - len(text)) + blob[8 + n :]


def read_safetensors(
    path: PathLike,
    expect: Mapping[str, Any] | None = None,
    *,
    key: str | None = None,
    error_cls: type[Exception] = IntegrityError,
    verify: bool = True,
    require_checksum: bool = False,
) -> tuple[dict[str, Any], dict[str, str]]:
    """Load a safetensors file after checking it is one (never unpickles), and verify it.

    Args:
        path: the file.
        expect: provenance fields it must carry.
        key: expected ground-truth ``key`` metadata, if any.
        error_cls: error type for corrupted or truncated files.
        verify: recompute ``tensors_sha256`` and compare.
        require_checksum: a file without ``tensors_sha256`` is an error.

    Returns:
        ``(tensors, metadata)``.
    """
    from safetensors.torch import load_file

    from tdabench.errors import KeyMismatchError

    p = Path(path)
    header, _ = safetensors_header(p, error_cls)
    meta = dict(header.get("__metadata__") or {})
    if key is not None and meta.get("key") != key:
        raise KeyMismatchError(
            f"{str(p)!r} holds weights for key {str(meta.get('key'))[:12]}..., expected "
            f"{key[:12]}...; move it out of this store"
        )
    _check_meta(p, meta, "delete it and recompute")
    if require_checksum and "tensors_sha256" not in meta:
        raise error_cls(
            f"{str(p)!r} has no tensors_sha256 stamp; it was not written by tdabench: "
            "delete it and rerun the stage that writes it"
        )
    try:
        tensors = load_file(str(p))
    except Exception as exc:
        raise error_cls(f"cannot read {str(p)!r} ({exc}); delete it and recompute") from exc
    if verify and "tensors_sha256" in meta:
        found = tensors_digest(tensors)
        if found != meta["tensors_sha256"]:
            raise error_cls(
                f"{str(p)!r} fails its checksum: expected sha256 {meta['tensors_sha256'][:16]}..., "
                f"found {found[:16]}... (weights altered or corrupted); delete it and recompute"
            )
    check_provenance(p, _provenance_of(meta, p), expect)
    return tensors, meta


# ----------------------------------------------------------------------------- safe paths


def safe_join(base: PathLike, name: Any, what: str = "manifest entry") -> Path:
    """``base / name`` for a file name read from a manifest or an index, kept inside ``base``.

    Raises:
        UnsafePathError: ``name`` is not a non-empty relative path, contains ``..``, or resolves
            (through symlinks) outside ``base``.
    """
    root = Path(base)
    bad = (
        not isinstance(name, str)
        or not name
        or "\x00" in name
        or "\\" in name
        or os.path.isabs(name)
        or ".." in Path(name).parts
    )
    if bad:
        raise UnsafePathError(
            f"{what} {name!r} under {str(root)!r} is not a plain relative path inside that "
            "directory (absolute paths and '..' are refused); the manifest/index was altered: "
            "restore it or rerun the stage that writes it"
        )
    full = root / name
    real_root = root.resolve()
    real = full.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(
            f"{what} {name!r} under {str(root)!r} resolves to {str(real)!r}, outside that "
            "directory (a symlink escapes it); remove the link or rerun the stage that writes it"
        )
    return full


# ----------------------------------------------------------------------------- verification


def read_json_checked(
    path: PathLike, expect: Mapping[str, Any] | None = None, *, what: str = "file", fix: str = ""
) -> dict[str, Any]:
    """Read a JSON file written by :func:`write_json` and verify its ``sha256`` and provenance.

    A ground-truth store manifest (``format``, ``key``, ``config``) is verified by re-hashing
    its config instead.

    Raises:
        IntegrityError: missing, garbled, unstamped or altered. ProvenanceError: other provenance.
    """
    p = Path(path)
    redo = fix or "delete it and rerun the stage that writes it"
    body = read_json(p, what=what, fix=fix)
    if not isinstance(body, dict):
        raise IntegrityError(f"{what} {str(p)!r} is not a JSON object; {redo}")
    if "sha256" in body:
        found = json_digest(body)
        if found != body["sha256"]:
            raise IntegrityError(
                f"{what} {str(p)!r} fails its checksum: expected sha256 {str(body['sha256'])[:16]}"
                f"..., found {found[:16]}... (edited or corrupted); {redo}"
            )
        provenance = dict(body.get("provenance") or {})
    elif {"format", "key", "config"} <= body.keys():
        # a store's key is the sha256 of its config's canonical JSON (groundtruth.key)
        if hashlib.sha256(canonical_json(body["config"]).encode()).hexdigest() != body["key"]:
            raise IntegrityError(
                f"store manifest {str(p)!r} was altered: its key is not the hash of its config; "
                "restore it or delete the store"
            )
        provenance = {"groundtruth_key": body["key"]}
    else:
        raise IntegrityError(f"{what} {str(p)!r} has no sha256 stamp; {redo}")
    check_provenance(p, provenance, expect, fix)
    return body


#: Files a directory verification skips: volatile sidecars, temporaries, logs, rendered views.
_UNSTAMPED = (SIDECAR_SUFFIX, ".tmp", ".log", ".png", ".md", ".html", ".csv", ".txt", ".lock")


def verify_output(path: PathLike, expect: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Verify a stage output (or every stamped file under a directory) before it is used.

    ``.parquet`` (table checksum), ``.safetensors`` (tensors checksum; unstamped files are
    refused), ``.json`` (body checksum) -- each with its provenance compared to ``expect``.

    Returns:
        ``{file: provenance}`` of every file verified.

    Raises:
        IntegrityError: a file is missing, truncated, altered or unstamped.
        ProvenanceError: a file was made for another configuration.
        UnsafeFileError: a checkpoint is not safetensors (never unpickled).
    """
    p = Path(path)
    if p.is_dir():
        out: dict[str, Any] = {}
        for f in sorted(q for q in p.rglob("*") if q.is_file()):
            if f.name.endswith(_UNSTAMPED) or f.name.startswith("."):
                continue
            out.update(verify_output(f, expect))
        return out
    if not p.exists():
        raise IntegrityError(f"{str(p)!r} does not exist; rerun the stage that writes it")
    if p.suffix == ".parquet":
        meta = read_parquet(p)[1]
    elif p.suffix == ".safetensors":
        meta = read_safetensors(p, require_checksum=True)[1]
    elif p.suffix == ".json":
        body = read_json_checked(p)
        meta = {"provenance": json.dumps(body["provenance"])} if "provenance" in body else {}
        meta.update({"key": body["key"]} if "key" in body else {})
    else:
        raise IntegrityError(
            f"{str(p)!r} is not a stamped tdabench output (.parquet, .safetensors or .json); "
            "pass the stage's output files or directories"
        )
    found = _provenance_of(meta, p)
    if "provenance" not in meta and expect:  # a store's own file: keyed by its ground-truth key
        expect = {k: v for k, v in expect.items() if k == "groundtruth_key"}
    check_provenance(p, found, expect)
    return {str(p): found}
