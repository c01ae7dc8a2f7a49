"""Notebook-level retraining for LOO and LDS ground truth (dattri-compatible call shapes).

``retrain_loo`` / ``retrain_lds`` call a user ``train_func(dataloader, seed=..., **kwargs)``
once per model and save each model's state dict as safetensors (never a pickle) together
with its metadata, one file per model, as soon as it is trained. Rerunning the same call
skips the models already saved, so an interrupted loop resumes where it stopped; many jobs
can each produce a slice (``start_id``) of one global, reproducible set of subsets.

Directory layout::

    <path>/manifest.json     {"format", "kind", "seed", "n_train", "subset_ratio",
                              "num_runs_per_subset", "sampling_key", "train_func", "train_kwargs"}
    <path>/models/<kind>-<index:07d>-run<r>.safetensors
        metadata: "index", "run", "seed", "subset" (LDS, JSON list of sorted training
        indices) or "removed" (LOO), "sampling_key", "tensors_sha256"

dattri's layout, written beside it (``dattri_layout=True``, the default) so that dattri's
users and its ``calculate_lds_ground_truth`` read the same directory::

    <path>/metadata.yml      LDS: {"mode": "lds", "data_length", "train_func", "num_subsets",
                              "subset_ratio", "num_runs_per_subset", "subset_dir_map": {i: "<path>/i"}}
                             LOO: {"mode": "loo", "data_length", "train_func", "indices",
                              "map_index_dir": {i: "<path>/index_i"}}
    <path>/<i>/indices.txt           LDS subset i, one training index per line (sorted)
    <path>/<i>/model_weights_<r>.pt  its run-r state dict
    <path>/index_<i>/model_weights.pt  LOO model without sample i: a state dict (dattri saves
                                     the whole pickled module there; we never pickle objects)

The ``.pt`` files are tensor-only torch files (``torch.load(..., weights_only=True)`` reads
them); they duplicate the safetensors models, so pass ``dattri_layout=False`` to save the disk.
``metadata.yml`` is rewritten after every model from what is complete on disk, so it stays
valid through interruptions and slices: ``subset_dir_map`` lists every complete subset and
``num_subsets`` counts the complete ones ``0, 1, ...`` without a gap (dattri's reader walks
``range(num_subsets)``).

Determinism: LDS subset ``i`` is ``subset_indices(sampling_key("lds", seed, n_train,
subset_ratio), i, n_train, subset_ratio)`` -- a pure function of (seed, i, n_train, ratio),
identical to the subsets of a :mod:`tdabench.groundtruth` store with the same seed -- and the
model seed of (index ``i``, run ``r``) is ``entry_model_seed(kind, sampling_key, i, r)`` (shared by the LOO models of a run). Before each
call of ``train_func`` the global torch RNG is seeded with that model seed, and the seed is
passed as ``seed=``. The dataloader handed to ``train_func`` holds the subset (or the
training set without the removed sample) with the original batch size, collate function and
``drop_last``; if the original loader shuffles, the subset loader shuffles with a generator
seeded by the model seed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, Subset

from tdabench._io import safe_join
from tdabench.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    KeyMismatchError,
    NonFiniteError,
    ShapeError,
    StoreError,
    UnsafeFileError,
)
from tdabench.groundtruth.key import canonical_json, config_diff, describe_diff
from tdabench.groundtruth.store import (
    _safetensors_header,
    atomic_write_bytes,
    read_safetensors_checked,
    write_safetensors,
)
from tdabench.groundtruth.subsets import entry_model_seed, sampling_key, subset_indices, subset_size

__all__ = ["RETRAIN_FORMAT", "list_retrained", "load_retrained_state", "retrain_lds", "retrain_loo"]

logger = logging.getLogger(__name__)

RETRAIN_FORMAT = "tdabench-retrain/1"
_MODEL_RE = re.compile(r"^(loo|lds)-(\d{7,})-run(\d+)\.safetensors$")


def _n_train(dataloader: Any) -> int:
    ds = getattr(dataloader, "dataset", None)
    if ds is None:
        raise DataError(
            "dataloader must be a torch DataLoader with a .dataset (it is subset per retrained model)"
        )
    try:
        n = len(ds)
    except TypeError as exc:
        raise DataError("the dataloader's dataset has no len(); use a map-style dataset") from exc
    if n < 2:
        raise DataError(f"the training set has {n} samples; retraining needs at least 2")
    return n


def _jsonable_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sorted(kwargs.items()):
        try:
            out[k] = json.loads(canonical_json(v))
        except Exception:
            out[k] = f"<{type(v).__module__}.{type(v).__qualname__}>"
    return out


def _func_name(f: Callable[..., Any]) -> str:
    return f"{getattr(f, '__module__', '?')}.{getattr(f, '__qualname__', type(f).__qualname__)}"


def _open_dir(path: str | os.PathLike, manifest: dict[str, Any]) -> Path:
    root = Path(path)
    mpath = root / "manifest.json"
    if mpath.exists():
        try:
            old = json.loads(mpath.read_text())
        except Exception as exc:
            raise StoreError(
                f"{str(mpath)!r} is unreadable ({exc}); restore it or use a new directory"
            ) from exc
        diff = config_diff({k: v for k, v in old.items() if k != "created"}, manifest)
        if diff:
            raise KeyMismatchError(
                f"{str(root)!r} already holds models of another configuration; differing fields: {describe_diff(diff)}. "
                "Use another directory, or call with the original arguments to resume"
            )
    else:
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(mpath, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
    (root / "models").mkdir(exist_ok=True)
    return root


def _model_path(root: Path, kind: str, index: int, run: int) -> Path:
    return root / "models" / f"{kind}-{index:07d}-run{run}.safetensors"


def _saved_ok(p: Path) -> dict[str, Any] | None:
    """Header of a complete, valid model file; None (and a warning) if it must be redone."""
    if not p.exists():
        return None
    try:
        header, _ = _safetensors_header(p, CheckpointError)
        return header
    except (CheckpointError, UnsafeFileError) as exc:
        logger.warning("retraining %s: %s", p.name, exc)
        return None


def _shapes(header_or_state: Mapping[str, Any]) -> dict[str, list[int]]:
    out = {}
    for k, v in header_or_state.items():
        if k == "__metadata__":
            continue
        out[k] = list(v.shape) if isinstance(v, Tensor) else list(v["shape"])
    return out


def _reference_shapes(root: Path) -> dict[str, list[int]] | None:
    for p in sorted((root / "models").glob("*.safetensors")):
        header = _saved_ok(p)
        if header is not None:
            return _shapes(header)
    return None


def _subset_loader(dataloader: DataLoader, indices: np.ndarray, seed: int) -> DataLoader:
    shuffle = isinstance(getattr(dataloader, "sampler", None), RandomSampler)
    if dataloader.batch_size is None:
        raise ConfigError(
            "the dataloader must use batch_size= (not a custom batch_sampler) so it can be subset"
        )
    return DataLoader(
        Subset(dataloader.dataset, indices.tolist()),
        batch_size=dataloader.batch_size,
        shuffle=shuffle,
        generator=torch.Generator().manual_seed(seed) if shuffle else None,
        collate_fn=dataloader.collate_fn,
        drop_last=dataloader.drop_last,
        num_workers=dataloader.num_workers,
    )


@dataclass
class _Job:
    """One :func:`retrain_loo` / :func:`retrain_lds` call: what every model of it shares."""

    train_func: Callable[..., Any]
    dataloader: DataLoader
    path: str | os.PathLike
    manifest: dict[str, Any]
    kwargs: Mapping[str, Any]
    dattri_layout: bool
    root: Path = field(init=False)
    ref: dict[str, list[int]] | None = field(init=False)  # shapes of the models saved so far

    def __post_init__(self) -> None:
        self.root = _open_dir(self.path, self.manifest)
        self.ref = _reference_shapes(self.root)

    @contextlib.contextmanager
    def dattri_metadata(self) -> Iterator[None]:
        """Rewrite dattri's ``metadata.yml`` on the way out, also after an interruption (it
        lists what is complete)."""
        try:
            yield
        finally:
            if self.dattri_layout:
                _write_dattri_metadata(self.path, self.manifest, self.train_func)

    def model(
        self, index: int, run: int, keep: Callable[[], np.ndarray], meta: dict[str, str]
    ) -> None:
        """Train and save model ``(index, run)`` on the training indices ``keep()`` unless it
        is saved already; then export dattri's copy of it."""
        kind = self.manifest["kind"]
        if _saved_ok(_model_path(self.root, kind, index, run)) is None:
            self.ref = self._train_and_save(index, run, keep(), meta)
        if self.dattri_layout:
            _export_dattri_model(self.root, kind, index, run)

    def _train_and_save(
        self, index: int, run: int, keep: np.ndarray, meta: dict[str, str]
    ) -> dict[str, list[int]]:
        kind = self.manifest["kind"]
        seed = entry_model_seed(kind, self.manifest["sampling_key"], index, run)
        torch.manual_seed(seed)
        loader = _subset_loader(self.dataloader, keep, seed)
        state = _state_of(self.train_func(loader, seed=seed, **self.kwargs))
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise NonFiniteError(
                f"{kind} model {index} run {run}: NaN/inf in {bad[:5]} after training; lower the learning rate. "
                "Models already saved are kept; nothing was saved for this one"
            )
        shapes = _shapes(state)
        if self.ref is not None and shapes != self.ref:
            diff = describe_diff(config_diff(self.ref, shapes))
            raise ShapeError(
                f"train_func returned a model of a different shape for {kind} index {index} ({diff}) than the models "
                "already saved; every retrained model must have the same architecture"
            )
        write_safetensors(
            _model_path(self.root, kind, index, run),
            state,
            {**meta, "run": str(run), "seed": str(seed)},
        )
        return shapes


def _state_of(out: Any) -> dict[str, Tensor]:
    """The state dict of what ``train_func`` returned (a module or a state dict)."""
    if isinstance(out, nn.Module):
        state = out.state_dict()
    elif isinstance(out, Mapping):
        state = dict(out)
    else:
        raise ConfigError(
            f"train_func must return an nn.Module (or a state dict), got {type(out).__name__}"
        )
    if not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise ConfigError("train_func returned a model without tensors in its state dict")
    return state


# ------------------------------------------------------------------ dattri's layout
def _dattri_weights(root: Path, kind: str, index: int, run: int) -> Path:
    if kind == "lds":
        return root / str(index) / f"model_weights_{run}.pt"
    return root / f"index_{index}" / "model_weights.pt"


def _export_dattri_model(root: Path, kind: str, index: int, run: int) -> None:
    """Write the tensor-only ``.pt`` copy of a saved model if it is missing."""
    target = _dattri_weights(root, kind, index, run)
    if target.exists():
        return
    state = load_retrained_state(_model_path(root, kind, index, run), verify=False)
    buf = io.BytesIO()
    torch.save({k: v.contiguous() for k, v in state.items()}, buf)
    atomic_write_bytes(target, buf.getvalue())


def _export_dattri_indices(root: Path, index: int, subset: np.ndarray) -> None:
    target = root / str(index) / "indices.txt"
    if not target.exists():
        atomic_write_bytes(target, "\n".join(str(int(i)) for i in subset).encode())


def _complete_dattri(root: Path, kind: str, runs: int) -> list[int]:
    """Indices whose every run is saved (safetensors) and exported (``.pt``), sorted."""
    _, models = list_retrained(root)
    by_index: dict[int, set[int]] = {}
    for index, run, _ in models:
        by_index.setdefault(index, set()).add(run)
    done = []
    for index, have in sorted(by_index.items()):
        if not all(
            r in have and _dattri_weights(root, kind, index, r).exists() for r in range(runs)
        ):
            continue
        if kind == "lds" and not (root / str(index) / "indices.txt").exists():
            continue
        done.append(index)
    return done


def _write_dattri_metadata(
    path: str | os.PathLike, manifest: Mapping[str, Any], train_func: Callable[..., Any]
) -> None:
    """(Re)write ``<path>/metadata.yml`` in dattri's format from what is complete on disk."""
    root, kind = Path(path), manifest["kind"]
    runs = int(manifest["num_runs_per_subset"])
    done = _complete_dattri(root, kind, runs)
    name = getattr(train_func, "__name__", type(train_func).__name__)
    if kind == "lds":
        prefix = 0
        while prefix < len(done) and done[prefix] == prefix:
            prefix += 1
        meta: dict[str, Any] = {
            "mode": "lds",
            "data_length": int(manifest["n_train"]),
            "train_func": name,
            "num_subsets": prefix,
            "subset_ratio": float(manifest["subset_ratio"]),
            "num_runs_per_subset": runs,
            "subset_dir_map": {i: str(Path(path) / str(i)) for i in done},
        }
    else:
        meta = {
            "mode": "loo",
            "data_length": int(manifest["n_train"]),
            "train_func": name,
            "indices": done,
            "map_index_dir": {i: str(Path(path) / f"index_{i}") for i in done},
        }
    atomic_write_bytes(root / "metadata.yml", yaml.safe_dump(meta, sort_keys=False).encode())


# ------------------------------------------------------------------ argument checks
def _loo_indices(indices: Sequence[int] | None, n: int) -> list[int]:
    if indices is None:
        return list(range(n))
    idx = [int(i) for i in np.asarray(list(indices), dtype=np.int64).reshape(-1)]
    if not idx:
        raise ConfigError(
            "indices is empty; pass None to leave out every sample, or at least one index"
        )
    if len(set(idx)) != len(idx):
        raise ConfigError("indices contain duplicates; list each left-out sample once")
    if min(idx) < 0 or max(idx) >= n:
        raise ConfigError(f"indices must lie in [0, {n}), got range [{min(idx)}, {max(idx)}]")
    return idx


def _check_seed(seed: Any) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ConfigError(f"seed must be an int, got {seed!r}")


#: the least value of each count argument of retrain_lds
_LEAST_COUNTS = {"num_subsets": 1, "num_runs_per_subset": 1, "start_id": 0, "total_num_subsets": 0}


def _check_lds_counts(
    num_subsets: Any, num_runs_per_subset: Any, start_id: Any, total_num_subsets: Any
) -> None:
    values = (num_subsets, num_runs_per_subset, start_id, total_num_subsets)
    for (name, lo), v in zip(_LEAST_COUNTS.items(), values, strict=True):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
            raise ConfigError(f"{name} must be an int >= {lo}, got {v!r}")
    if total_num_subsets and start_id + num_subsets > total_num_subsets:
        raise ConfigError(
            f"start_id {start_id} + num_subsets {num_subsets} exceeds total_num_subsets {total_num_subsets}; "
            "each job must produce a slice of the global set"
        )


def _manifest(
    kind: str,
    seed: int,
    n: int,
    ratio: float | None,
    runs: int,
    skey: str,
    train_func: Callable[..., Any],
    kwargs: Mapping[str, Any],
) -> dict[str, Any]:
    return {
        "format": RETRAIN_FORMAT,
        "kind": kind,
        "seed": int(seed),
        "n_train": n,
        "subset_ratio": ratio,
        "num_runs_per_subset": runs,
        "sampling_key": skey,
        "train_func": _func_name(train_func),
        "train_kwargs": _jsonable_kwargs(kwargs),
    }


def retrain_loo(
    train_func: Callable[..., Any],
    dataloader: DataLoader,
    path: str | os.PathLike,
    indices: Sequence[int] | None = None,
    seed: int = 0,
    dattri_layout: bool = True,
    **kwargs: Any,
) -> None:
    """Retrain one model per removed training sample and save each (resumable).

    Args:
        train_func: ``train_func(dataloader, seed=int, **kwargs) -> nn.Module`` trains a
            model on the given loader.
        dataloader: loader of the full training set (its ``dataset`` is subset).
        path: output directory (see the module docstring for its layout).
        indices: training indices to leave out (default: all).
        seed: base seed; model seeds derive from ``(seed, index)``.
        dattri_layout: also write dattri's ``metadata.yml`` and ``index_<i>/model_weights.pt``
            (state dicts; see the module docstring).
        **kwargs: passed to ``train_func`` and recorded in the manifest.

    Raises:
        ConfigError: empty, duplicated or out-of-range ``indices``.
        KeyMismatchError: ``path`` holds models of another configuration.
        ShapeError / NonFiniteError: a model of another architecture / with NaN weights.
    """
    n = _n_train(dataloader)
    idx = _loo_indices(indices, n)
    _check_seed(seed)
    skey = sampling_key("loo", int(seed), n)
    manifest = _manifest("loo", seed, n, None, 1, skey, train_func, kwargs)
    job = _Job(train_func, dataloader, path, manifest, kwargs, dattri_layout)
    everything = np.arange(n)
    with job.dattri_metadata():
        for i in idx:
            meta = _model_meta("loo", i, skey, removed=str(i))
            job.model(i, 0, functools.partial(_without, everything, i), meta)


# Spelled out: dattri's retrain_lds signature (same names, defaults and positional order)
def retrain_lds(
    train_func: Callable[..., Any],
    dataloader: DataLoader,
    path: str | os.PathLike,
    num_subsets: int = 100,
    subset_ratio: float = 0.5,
    num_runs_per_subset: int = 1,
    start_id: int = 0,
    total_num_subsets: int = 0,
    seed: int = 0,
    dattri_layout: bool = True,
    **kwargs: Any,
) -> None:
    """Retrain models on random subsets for the LDS ground truth and save each (resumable).

    Args:
        train_func: ``train_func(dataloader, seed=int, **kwargs) -> nn.Module``.
        dataloader: loader of the full training set.
        path: output directory (see the module docstring).
        num_subsets: number of subsets this call produces: indices
            ``start_id .. start_id + num_subsets - 1``.
        subset_ratio: fraction of the training set per subset, in (0, 1).
        num_runs_per_subset: independent models per subset (``>= 2`` gives a noise ceiling).
        start_id: first subset index of this call (for splitting one set across jobs).
        total_num_subsets: size of the global set (``0``: no limit). When ``> 0``,
            ``start_id + num_subsets`` must not exceed it.
        seed: base seed; subset ``i`` depends only on ``(seed, i, n_train, subset_ratio)``.
        dattri_layout: also write dattri's ``metadata.yml``, ``<i>/indices.txt`` and
            ``<i>/model_weights_<r>.pt`` (see the module docstring).
        **kwargs: passed to ``train_func`` and recorded in the manifest.
    """
    n = _n_train(dataloader)
    _check_lds_counts(num_subsets, num_runs_per_subset, start_id, total_num_subsets)
    _check_seed(seed)
    subset_size(n, subset_ratio)  # validates the ratio
    skey = sampling_key("lds", int(seed), n, float(subset_ratio))
    manifest = _manifest(
        "lds", seed, n, float(subset_ratio), int(num_runs_per_subset), skey, train_func, kwargs
    )
    job = _Job(train_func, dataloader, path, manifest, kwargs, dattri_layout)
    with job.dattri_metadata():
        for i in range(int(start_id), int(start_id) + int(num_subsets)):
            sub = subset_indices(skey, i, n, float(subset_ratio))
            meta = _model_meta("lds", i, skey, subset=json.dumps(sub.tolist()))
            for r in range(int(num_runs_per_subset)):
                job.model(i, r, lambda sub=sub: sub, meta)
            if dattri_layout:
                _export_dattri_indices(job.root, i, sub)


def _without(everything: np.ndarray, i: int) -> np.ndarray:
    return everything[everything != i]


def _model_meta(kind: str, index: int, skey: str, **what: str) -> dict[str, str]:
    """A saved model's metadata: format, kind, index, ``what`` (its subset or removed
    sample) and the sampling key (the run and seed are added when it is saved)."""
    return {
        "format": RETRAIN_FORMAT,
        "kind": kind,
        "index": str(index),
        **what,
        "sampling_key": skey,
    }


def load_retrained_state(ckpt_path: str | os.PathLike, verify: bool = True) -> dict[str, Tensor]:
    """Load a model saved by :func:`retrain_loo`/:func:`retrain_lds` (safetensors only).

    Use it inside a ``target_func(ckpt_path, dataloader)``:
    ``model.load_state_dict(load_retrained_state(ckpt_path))``.

    Args:
        ckpt_path: a ``models/<kind>-<index>-run<r>.safetensors`` file.
        verify: check the tensors against the ``tensors_sha256`` of the metadata.

    Returns:
        The state dict ``{name: tensor}`` with the shapes the model had.

    Raises:
        UnsafeFileError: not a safetensors file (e.g. a pickle); it is never unpickled.
        CheckpointError: truncated or altered.
    """
    return read_safetensors_checked(ckpt_path, error_cls=CheckpointError, verify=verify)[0]


def list_retrained(
    retrain_dir: str | os.PathLike,
) -> tuple[dict[str, Any], list[tuple[int, int, Path]]]:
    """What a retraining directory holds.

    Args:
        retrain_dir: the ``path`` of :func:`retrain_loo` / :func:`retrain_lds`.

    Returns:
        ``(manifest, models)``: the manifest dict and the ``(index, run, path)`` of every saved
        model, sorted.

    Raises:
        StoreError: no readable ``manifest.json``.
    """
    root = Path(retrain_dir)
    mpath = root / "manifest.json"
    if not mpath.exists():
        raise StoreError(
            f"{str(root)!r} has no manifest.json; it was not written by retrain_loo/retrain_lds"
        )
    try:
        manifest = json.loads(mpath.read_text())
    except Exception as exc:
        raise StoreError(f"{str(mpath)!r} is unreadable ({exc})") from exc
    models = []
    for p in (root / "models").glob("*.safetensors"):
        m = _MODEL_RE.match(p.name)
        if m and m.group(1) == manifest.get("kind"):
            safe_join(root / "models", p.name, "retrained model")  # no symlink out of the folder
            models.append((int(m.group(2)), int(m.group(3)), p))
    return manifest, sorted(models)
