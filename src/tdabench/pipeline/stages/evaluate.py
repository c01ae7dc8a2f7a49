"""``tdabench evaluate``: LDS, LOO correlation and mislabel AUC of one attributor's scores.

Nothing is evaluated from an input that fails verification: the scores, self-scores, noisy labels
and every ground truth are re-hashed against their stamps, their provenance must agree (same
benchmark, same data fingerprint, the scores' method), and their shapes must fit exactly.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from tdabench._io import read_parquet
from tdabench.errors import ConfigError, IntegrityError, NonFiniteError, ShapeError
from tdabench.groundtruth import load_ground_truth
from tdabench.metric import (
    bootstrap_ci,
    lds,
    loo_corr,
    mean_dropna,
    mislabel_detection_auc,
    stored_noise_ceiling,
)
from tdabench.pipeline.io import (
    read_scores,
    read_self_scores,
    read_sidecar,
    write_json,
    write_sidecar,
)
from tdabench.pipeline.stages._common import provenance, read_noisy

__all__ = ["evaluate"]

_NAN_FIX = "set evaluate.allow_nan_scores: true to evaluate the finite test points only"


def _finite_columns(s: np.ndarray, path: str, allow: bool) -> tuple[np.ndarray, int]:
    """Test columns with finite scores only; refuses NaN/inf unless ``allow``."""
    bad = ~np.isfinite(s).all(axis=0)
    if bad.any() and not allow:
        raise NonFiniteError(
            f"{path!r} has NaN/inf scores in {int(bad.sum())} of {s.shape[1]} test columns "
            f"({int((~np.isfinite(s)).sum())} entries); fix the attributor (e.g. raise its "
            f"regularization) and rerun attribute, or {_NAN_FIX}"
        )
    return np.flatnonzero(~bad), int(bad.sum())


def _ci(corr: np.ndarray, ev: Mapping[str, Any]) -> tuple[float, float, float]:
    mean, _count = mean_dropna(corr)
    if ev["bootstrap"] == 0:
        return mean, mean, mean
    lo, hi = bootstrap_ci(corr, ev["bootstrap"], ev["confidence"], ev["seed"])
    return mean, lo, hi


def _ground_truth(
    path: str,
    kind: str,
    target: str,
    expect: Mapping[str, Any],
    shape: tuple[int, int],
    num_test: int | None,
    scores: str,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, str]]:
    """Verified ``(values (S, n_test), index, metadata)`` whose shape fits the scores exactly."""
    fix = f"pass this benchmark's merged {kind} ground truth (or rerun merge)"
    _, meta = read_parquet(path, {**expect, "kind": kind}, fix=fix)
    values, index = load_ground_truth(path, target)
    n_train, n_test = shape
    want = num_test or values.shape[-1]
    if n_test != want or values.shape[-1] < n_test:
        raise ShapeError(
            f"{scores!r} has {n_test} test columns, but {path!r} holds {values.shape[-1]} test "
            f"points and data.num_test is {num_test}: expected {want} columns; rerun attribute "
            "for this configuration"
        )
    if len(index) and int(index.max()) >= n_train:
        raise ShapeError(
            f"{path!r} indexes training point {int(index.max())}, but {scores!r} has "
            f"{n_train} rows; {fix}"
        )
    return values[..., :n_test], index, meta


def _correlation(
    kind: str, s: np.ndarray, values: torch.Tensor, index: torch.Tensor, cols: np.ndarray
) -> np.ndarray:
    fn = lds if kind == "lds" else loo_corr
    c = torch.as_tensor(cols)
    corr, _p = fn(torch.as_tensor(s[:, cols]), (values[:, c], index))
    return np.asarray(corr, dtype=np.float64)


def _lds_ceiling(path: str, target: str) -> dict[str, Any]:
    try:  # needs num_runs_per_subset >= 2
        nc = stored_noise_ceiling(path, target)
    except ConfigError:
        return {"noise_ceiling": None}
    return {
        "noise_ceiling": float(np.nanmean(np.asarray(nc.ceiling))),
        "run_corr": float(np.nanmean(np.asarray(nc.run_corr))),
        "num_runs": int(nc.num_runs),
    }


def _auc(
    self_scores: str, noisy: str, expect: Mapping[str, Any], n_train: int, allow_nan: bool
) -> tuple[dict[str, Any], dict[str, Any]]:
    fix = "delete it and rerun the attribute stage"
    s, _meta = read_self_scores(self_scores, expect)
    if len(s) != n_train:
        raise IntegrityError(f"{self_scores!r} has {len(s)} self-scores, expected {n_train}; {fix}")
    table = read_noisy(noisy, expect.get("benchmark"), expect.get("data"), n_train)
    flipped = table.column("flipped").to_numpy(zero_copy_only=False).astype(bool)
    keep = np.isfinite(s)
    if not keep.all() and not allow_nan:
        raise NonFiniteError(
            f"{self_scores!r} has {int((~keep).sum())} NaN/inf self-scores; fix the attributor "
            f"and rerun attribute, or {_NAN_FIX}"
        )
    # a mislabelled point has unusually high self-influence: rank by self-score
    auc, (fpr, tpr, _thr) = mislabel_detection_auc(
        torch.as_tensor(s[keep]), torch.as_tensor(np.flatnonzero(flipped[keep]))
    )
    entry = {"value": float(auc), "num_flipped": int(flipped[keep].sum())}
    if not keep.all():
        entry["nan_self_scores"] = int((~keep).sum())
    return entry, {"fpr": [float(x) for x in fpr], "tpr": [float(x) for x in tpr]}


def _loo_scatter(
    s: np.ndarray,
    values: torch.Tensor,
    index: torch.Tensor,
    cols: np.ndarray,
    gt_meta: Mapping[str, str],
    target: str,
) -> dict[str, Any]:
    """The report's LOO scatter of one test point ``j``: the scores of the removed samples, the
    LOO models' ``target`` (loss), and the full model's (mean over runs, as the LOO values are)
    from the merged file's verified ``full_model`` stamp, with its checksums; the report plots
    LOO loss minus full loss. Without the stamp (a store from before it), ``full_loss`` is absent.
    """
    j = int(cols[0]) if len(cols) else 0
    out: dict[str, Any] = {
        "score": s[index.numpy(), j].tolist(),
        "loo_loss": values[:, j].tolist(),
        "test_index": j,
        "first_removed": int(index[0]),
    }
    if "full_model" in gt_meta:
        full = json.loads(gt_meta["full_model"])
        per_run = np.asarray(full["values"][target], dtype=np.float64)  # (runs, n_test)
        out["full_loss"] = float(per_run[:, j].mean())
        out["full_model"] = {k: full[k] for k in ("seeds", "sha256", "checkpoint_sha256")}
    return out


# Spelled out: stage signatures (spec, paths) are alike by design; the CLI calls each by position.
def evaluate(
    spec: Mapping[str, Any],
    benchmark: str,
    scores: str,
    self_scores: str,
    groundtruth: Mapping[str, str],
    noisy: str,
    out: str,
    curves_out: str,
) -> None:
    """LDS (bootstrap CI + noise ceiling), LOO correlation and mislabel AUC of one method.

    Raises:
        IntegrityError / ProvenanceError: an input is altered, reordered, truncated or belongs
            to another benchmark, data set, method or ground truth (naming the file and the fix).
        ShapeError: the scores do not fit the ground truth exactly.
        NonFiniteError: NaN/inf scores, unless ``evaluate.allow_nan_scores``.
    """
    ev = spec["evaluate"]
    allow_nan = bool(ev.get("allow_nan_scores", False))
    s, meta = read_scores(scores, {"benchmark": benchmark, "method": spec["method"]})
    data = meta["provenance"].get("data")
    expect = {"benchmark": benchmark, "data": data}
    cols, nan_cols = _finite_columns(s, scores, allow_nan)
    result: dict[str, Any] = {"benchmark": benchmark, "method": spec["method"]}
    curves: dict[str, Any] = {}
    keys = {}
    for kind in (k for k in ("lds", "loo") if k in spec["metrics"]):
        target = spec["targets"][kind]
        values, index, gt_meta = _ground_truth(
            groundtruth[kind], kind, target, expect, s.shape, spec.get("num_test"), scores
        )
        keys[kind] = gt_meta["key"]
        corr = _correlation(kind, s, values, index, cols)
        mean, lo, hi = _ci(corr, ev)
        entry = {"value": mean, "ci_low": lo, "ci_high": hi, "n_test": len(cols)}
        if nan_cols:
            entry["nan_test_points"] = nan_cols
        if kind == "lds":
            entry.update(_lds_ceiling(groundtruth[kind], target))
        elif len(index):
            curves["loo_scatter"] = _loo_scatter(s, values, index, cols, gt_meta, target)
        result[kind] = entry
    if "auc" in spec["metrics"]:
        sm = {**expect, "method": spec["method"]}
        result["auc"], curves["roc"] = _auc(self_scores, noisy, sm, s.shape[0], allow_nan)
    prov = provenance(
        benchmark, "evaluate", spec, data=data, groundtruth_keys=keys, scores=meta.get("sha256")
    )
    write_json(curves_out, {**curves, "provenance": prov})
    write_json(out, {**result, "provenance": prov})
    write_sidecar(out, {"attribution_seconds": read_sidecar(scores).get("seconds")})
