"""Ground truth from models saved by :mod:`tdabench.model_util.retrain` (dattri-style API)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tdabench.errors import CheckpointError, ConfigError, ShapeError, StoreError
from tdabench.groundtruth.store import read_safetensors_checked
from tdabench.groundtruth.subsets import subset_indices

__all__ = ["calculate_lds_ground_truth", "calculate_loo_ground_truth"]


def _evaluate(
    target_func: Callable[[str, Any], Tensor],
    path: os.PathLike,
    test_dataloader: Any,
    n_test: int | None,
) -> Tensor:
    # Verify the file (safetensors header, checksum) before handing it to user code.
    read_safetensors_checked(path, error_cls=CheckpointError, verify=True)
    v = target_func(str(path), test_dataloader)
    v = torch.as_tensor(v).detach().to("cpu", torch.float64).reshape(-1)
    if n_test is not None and v.numel() != n_test:
        raise ShapeError(
            f"target_func returned {v.numel()} values for {path}, but {n_test} for the previous model; it must return (n_test,)"
        )
    return v


def _retrained(retrain_dir: str | os.PathLike, kind: str) -> tuple[dict[str, Any], list[Any]]:
    """``(manifest, models)`` of a ``retrain_<kind>`` directory, checked to hold ``kind`` models."""
    from tdabench.model_util.retrain import list_retrained

    manifest, models = list_retrained(retrain_dir)
    if manifest.get("kind") != kind:
        other = {"loo": "lds", "lds": "loo"}[kind]
        raise ConfigError(
            f"{str(retrain_dir)!r} holds {manifest.get('kind')!r} models; use calculate_{other}_ground_truth for it"
        )
    if not models:
        raise StoreError(f"{str(retrain_dir)!r} holds no models; run retrain_{kind} first")
    return manifest, models


def _runs_by_subset(models: list[Any], runs: int) -> dict[int, list[Any]]:
    """``{subset index: [(run, path), ...]}``; every subset must have runs ``0..runs-1``."""
    by_index: dict[int, list[Any]] = {}
    for index, run, path in models:
        by_index.setdefault(index, []).append((run, path))
    incomplete = [
        i for i, lst in by_index.items() if sorted(r for r, _ in lst) != list(range(runs))
    ]
    if incomplete:
        raise StoreError(
            f"subsets {sorted(incomplete)[:10]} lack some of their {runs} runs; rerun retrain_lds with the same arguments to finish them"
        )
    return by_index


def _check_subset(path: os.PathLike, index: int, expected: np.ndarray) -> None:
    """The model at ``path`` records ``expected`` (int64 ``(subset_size,)``) as its subset."""
    _, meta = read_safetensors_checked(path, error_cls=CheckpointError, verify=False)
    if not np.array_equal(np.asarray(json.loads(meta.get("subset", "[]"))), expected):
        raise StoreError(
            f"{path} records a subset that differs from subset {index} of this directory's seed; the directory is mixed up"
        )


def calculate_loo_ground_truth(
    target_func: Callable[[str, Any], Tensor], retrain_dir: str | os.PathLike, test_dataloader: Any
) -> tuple[Tensor, Tensor]:
    """LOO ground truth from a :func:`~tdabench.model_util.retrain.retrain_loo` directory.

    Args:
        target_func: ``target_func(ckpt_path: str, test_dataloader) -> Tensor (n_test,)``,
            e.g. the per-sample test loss of the model whose safetensors state dict is at
            ``ckpt_path`` (load it with :func:`tdabench.model_util.retrain.load_retrained_state`).
            Unlike dattri, the checkpoint is passed as a path for LOO too (models are stored
            as safetensors state dicts, not pickled modules).
        retrain_dir: the directory ``retrain_loo`` wrote.
        test_dataloader: passed through to ``target_func``.

    Returns:
        ``(gt, removed_idx)``: ``gt`` float64 ``(n_removed, n_test)`` holds the raw target
        (no sign change: with the loss, a good attribution correlates positively);
        ``removed_idx`` int64 ``(n_removed,)``, sorted. This is what :func:`loo_corr` takes.
    """
    _, models = _retrained(retrain_dir, "loo")
    values, idx, n_test = [], [], None
    for index, _, path in models:
        v = _evaluate(target_func, path, test_dataloader, n_test)
        n_test = v.numel()
        values.append(v)
        idx.append(index)
    return torch.stack(values), torch.tensor(idx, dtype=torch.int64)


def calculate_lds_ground_truth(
    target_func: Callable[[str, Any], Tensor],
    retrain_dir: str | os.PathLike,
    test_dataloader: Any,
    negate: bool = True,
    return_runs: bool = False,
) -> tuple[Tensor, Tensor]:
    """LDS ground truth from a :func:`~tdabench.model_util.retrain.retrain_lds` directory.

    Args:
        target_func: ``target_func(ckpt_path: str, test_dataloader) -> Tensor (n_test,)``,
            by default a lower-is-better quantity such as the per-sample test loss.
        retrain_dir: the directory ``retrain_lds`` wrote.
        test_dataloader: passed through to ``target_func``.
        negate: return ``-target`` (default, as dattri: the loss becomes a
            higher-is-better target). Pass ``False`` when ``target_func`` already returns a
            higher-is-better value such as the margin.
        return_runs: return every run, ``(n_subsets, num_runs, n_test)``, instead of the
            mean (for :func:`tdabench.metric.noise_ceiling`).

    Returns:
        ``(gt_values, subset_indices)``: ``gt_values`` float64 ``(n_subsets, n_test)``, the
        (negated) target averaged over the runs of each subset; ``subset_indices`` int64
        ``(n_subsets, subset_size)`` training indices of each subset, sorted by subset index.
        This is what :func:`lds` takes.

    Raises:
        StoreError: a subset lacks some of its runs, or a model's recorded subset does not
            match its derivation from the seed (a mixed-up directory).
    """
    manifest, models = _retrained(retrain_dir, "lds")
    runs = int(manifest["num_runs_per_subset"])
    n_train, ratio = int(manifest["n_train"]), float(manifest["subset_ratio"])
    skey = manifest["sampling_key"]
    by_index = _runs_by_subset(models, runs)
    gt, subsets, n_test = [], [], None
    for index in sorted(by_index):
        expected = subset_indices(skey, index, n_train, ratio)
        vals = []
        for _, path in sorted(by_index[index]):
            _check_subset(path, index, expected)
            v = _evaluate(target_func, path, test_dataloader, n_test)
            n_test = v.numel()
            vals.append(v)
        per_run = torch.stack(vals)
        per_run = -per_run if negate else per_run
        gt.append(per_run if return_runs else per_run.mean(dim=0))
        subsets.append(torch.from_numpy(expected))
    return torch.stack(gt), torch.stack(subsets)
