"""What every stage shares: the device, the setting and data, and the provenance keys.

Provenance keys (written into each output by :mod:`tdabench._io`, checked by each consumer):

* ``benchmark`` -- the benchmark name (``--benchmark``);
* ``stage`` and ``spec_hash`` -- the producing stage and :func:`~tdabench.pipeline.config.spec_hash`
  of its spec;
* ``data`` -- :func:`data_fingerprint` of the split the stage loaded (``BenchmarkData.meta``);
* stage-specific keys: ``groundtruth_key`` and ``kind`` (merged ground truth), ``models`` (the
  models' manifest checksum), ``method``, ``attributor`` (resolved arguments), ``n_test``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from tdabench._io import read_json_checked, read_parquet
from tdabench.benchmark import get_setting
from tdabench.errors import ConfigError, DataError, IntegrityError
from tdabench.pipeline.config import spec_hash

__all__ = [
    "check_data",
    "data_fingerprint",
    "device",
    "load",
    "provenance",
    "read_noisy",
    "setting",
    "threads",
]

_DEVICES = ("auto", "cpu", "cuda", "mps")


def threads() -> None:
    """One BLAS thread per small job unless the caller chose otherwise."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def device(requested: str | None) -> str:
    """Resolve ``--device``: ``auto`` (CUDA when present), ``cpu``, ``cuda``, ``cuda:N``, ``mps``.

    Raises:
        ConfigError: an unknown device, or CUDA requested where there is none.
    """
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    base, _, index = str(requested).partition(":")
    if base not in _DEVICES or (index and not index.isdigit()):
        raise ConfigError(
            f"--device {requested!r} is not a device tdabench runs on; use auto, cpu, cuda, "
            "cuda:N or mps"
        )
    if base == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {requested}: no CUDA device is visible; use --device cpu")
    return str(requested)


def data_fingerprint(meta: Mapping[str, Any]) -> str:
    """sha256 of a split's identity record (``BenchmarkData.meta``, canonical JSON)."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def provenance(
    benchmark: str | None, stage: str, spec: Mapping[str, Any], **extra: Any
) -> dict[str, Any]:
    """The provenance key of one stage output (see the module docstring)."""
    out: dict[str, Any] = {"stage": stage, "spec_hash": spec_hash(spec), **extra}
    if benchmark is not None:
        out["benchmark"] = benchmark
    return out


def setting(spec: Mapping[str, Any]) -> Any:
    """The :class:`~tdabench.benchmark.BenchmarkSetting` of a stage spec (recipe applied)."""
    core = spec.get("prepare", spec)  # train/attribute specs nest the prepare spec
    return get_setting(core["setting"], **core["overrides"], **(spec.get("recipe") or {}))


def load(spec: Mapping[str, Any]) -> tuple[Any, Any]:
    """``(setting, data)`` of a stage spec."""
    core = spec.get("prepare", spec)
    s = setting(spec)
    return s, s.load(data_root=core["data_root"], seed=core["data"]["seed"])


def _expect(benchmark: str | None, **fields: Any) -> dict[str, Any]:
    return {**fields, **({"benchmark": benchmark} if benchmark is not None else {})}


def check_data(
    prepare_spec: Mapping[str, Any], data: Any, data_dir: str, benchmark: str | None = None
) -> str:
    """Verify ``<data_dir>/meta.json`` (checksum, benchmark, prepare spec) and that the data
    loaded now is the data ``prepare`` recorded; returns the data fingerprint.

    Raises:
        IntegrityError / ProvenanceError: the record is altered or from another configuration.
        DataError: the data files changed since ``prepare``.
    """
    fp = data_fingerprint(data.meta)
    meta_path = Path(data_dir) / "meta.json"
    read_json_checked(
        meta_path,
        _expect(benchmark, spec_hash=spec_hash(prepare_spec)),
        what="prepare record",
        fix="rerun the prepare stage for this configuration",
    )
    recorded = read_json_checked(meta_path)["provenance"].get("data")
    if recorded != fp:
        raise DataError(
            f"the data loaded now (fingerprint {fp[:12]}...) differs from {str(meta_path)!r} "
            f"({str(recorded)[:12]}...): its files changed; delete {data_dir} to re-run prepare, "
            "or restore the original data files."
        )
    return fp


def read_noisy(
    path: str | os.PathLike[str], benchmark: str | None, data: str | None, n_train: int | None
) -> Any:
    """The verified ``noisy.parquet`` table (checksum, benchmark, data fingerprint, length).

    Raises:
        IntegrityError / ProvenanceError: edited, truncated, or from another benchmark/split.
    """
    fix = "delete it and rerun the prepare stage"
    expect = _expect(benchmark, **({"data": data} if data is not None else {}))
    table, _ = read_parquet(path, expect, fix=fix)
    if n_train is not None and table.num_rows != n_train:
        raise IntegrityError(
            f"{str(path)!r} has {table.num_rows} rows, expected n_train = {n_train}; {fix}"
        )
    return table
