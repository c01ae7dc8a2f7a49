"""Evaluation metrics for training-data attribution scores.

Every score matrix has shape ``(n_train, n_test)``; a high score means the training
sample *helps* the test sample (removing it would raise the test loss).

Definitions (all per test point ``j``; callers average over test points, dropping NaN):

* **LDS** (linear datamodeling score): for ``S`` random training subsets,
  ``pred[s, j] = sum_{i in subset s} score[i, j]``; the LDS of test point ``j`` is the
  Spearman rank correlation over ``s`` between ``pred[:, j]`` and the ground-truth target
  ``gt_values[:, j]`` of a model retrained on subset ``s`` (a higher-is-better target such as
  the margin or minus the loss).
* **LOO correlation**: Pearson correlation over the removed training samples ``r`` between
  ``score[r, j]`` and ``gt[r, j]``, the test loss of the model trained *without* ``r``.
  (Subtracting the full model's loss is a constant shift per ``j`` and changes nothing.)
* **Mislabel-detection AUC**: ROC AUC of ranking the training samples by self-influence
  (higher = more suspicious) against the set of flipped labels, with ties counted as half
  (the Mann-Whitney definition used by ``sklearn.metrics.roc_auc_score``).

p-values are two-sided and use the Student-t distribution with ``S - 2`` degrees of
freedom for the (rank) correlation coefficient, the same as ``scipy.stats.spearmanr`` and
``scipy.stats.pearsonr``. A test point whose prediction or target is constant over the
subsets has an undefined correlation: its ``corr`` and ``pval`` are NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import Tensor

from tdabench.errors import ConfigError, DataError, ShapeError

__all__ = [
    "NoiseCeiling",
    "bootstrap_ci",
    "lds",
    "loo_corr",
    "mean_dropna",
    "mislabel_detection_auc",
    "noise_ceiling",
    "pearson_columns",
    "spearman_columns",
    "summarize",
]

ArrayLike = Tensor | np.ndarray | Sequence[Any]


def _np(x: ArrayLike, what: str, dtype: Any = np.float64) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    try:
        return np.asarray(x, dtype=dtype)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} cannot be converted to a {np.dtype(dtype).name} array ({exc}); pass a tensor") from exc


def _rank_columns(a: np.ndarray) -> np.ndarray:
    """Average ranks (ties share the mean rank) of each column of ``a`` (S, n)."""
    return stats.rankdata(a, axis=0, method="average")


def pearson_columns(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise Pearson correlation and two-sided p-value.

    Args:
        x: ``(S, n)`` array.
        y: ``(S, n)`` array.

    Returns:
        ``(r, p)``, each ``(n,)``; NaN where a column of ``x`` or ``y`` is constant or
        ``S < 3`` (p) / ``S < 2`` (r).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ShapeError(f"pearson_columns needs two (S, n) arrays of the same shape, got {x.shape} and {y.shape}")
    s = x.shape[0]
    xc = x - x.mean(axis=0, keepdims=True)
    yc = y - y.mean(axis=0, keepdims=True)
    # Normalise first (as scipy does) so that the products cannot overflow or underflow.
    nx = np.linalg.norm(xc, axis=0)
    ny = np.linalg.norm(yc, axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.sum((xc / nx) * (yc / ny), axis=0)
    # A constant column has no defined correlation (as in scipy).
    const = np.all(x == x[:1], axis=0) | np.all(y == y[:1], axis=0) if s else np.ones(x.shape[1], bool)
    r = np.where(const | (s < 2), np.nan, np.clip(r, -1.0, 1.0))
    p = _corr_pvalue(r, s)
    return r, p


def _corr_pvalue(r: np.ndarray, s: int) -> np.ndarray:
    """Two-sided p-value of correlation ``r`` from ``s`` pairs (t test, ``s - 2`` dof)."""
    if s < 3:
        return np.full_like(r, np.nan)
    dof = s - 2
    with np.errstate(divide="ignore", invalid="ignore"):
        t = r * np.sqrt(dof / ((1.0 - r) * (1.0 + r)))
    p = 2.0 * stats.t.sf(np.abs(t), dof)
    p = np.where(np.abs(r) >= 1.0, 0.0, p)
    return np.where(np.isnan(r), np.nan, p)


def spearman_columns(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Column-wise Spearman rank correlation (average ranks for ties) and p-value.

    Args:
        x: ``(S, n)`` array.
        y: ``(S, n)`` array.

    Returns:
        ``(rho, p)``, each ``(n,)``; NaN for constant columns.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 2:
        raise ShapeError(f"spearman_columns needs two (S, n) arrays of the same shape, got {x.shape} and {y.shape}")
    if x.shape[0] == 0:
        return np.full(x.shape[1], np.nan), np.full(x.shape[1], np.nan)
    return pearson_columns(_rank_columns(x), _rank_columns(y))


def _score_matrix(score: ArrayLike) -> np.ndarray:
    s = _np(score, "score")
    if s.ndim != 2:
        raise ShapeError(f"score must have shape (n_train, n_test), got {tuple(s.shape)}; attribute() returns this shape")
    return s


def _as_torch(a: np.ndarray) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64))


def _subset_masks(subsets: ArrayLike, n_train: int, num_subsets: int) -> np.ndarray:
    """Turn ``(S, k)`` index lists or a ``(S, n_train)`` bool mask into a float mask."""
    if (isinstance(subsets, Tensor) and subsets.dtype == torch.bool) or (isinstance(subsets, np.ndarray) and subsets.dtype == np.bool_):
        m = _np(subsets, "subset mask", dtype=np.bool_)
        if m.shape != (num_subsets, n_train):
            raise ShapeError(
                f"a boolean subset mask must have shape (S, n_train) = ({num_subsets}, {n_train}), got {tuple(m.shape)}"
            )
        return m.astype(np.float64)
    idx = _np(subsets, "subset indices", dtype=np.int64)
    if idx.ndim != 2 or idx.shape[0] != num_subsets:
        raise ShapeError(
            f"subset indices must have shape (S, subset_size) with S = {num_subsets} (rows of gt_values), "
            f"got {tuple(idx.shape)}"
        )
    if idx.size and (idx.min() < 0 or idx.max() >= n_train):
        raise ConfigError(
            f"subset indices must lie in [0, {n_train}) (n_train of the score), got range "
            f"[{idx.min()}, {idx.max()}]; the score and the ground truth must use the same training set"
        )
    m = np.zeros((num_subsets, n_train), dtype=np.float64)
    np.put_along_axis(m, idx, 1.0, axis=1)
    if idx.shape[1] and not np.all(m.sum(axis=1) == idx.shape[1]):
        raise ConfigError("subset indices contain duplicates within a subset; each subset must list distinct samples")
    return m


def lds(score: ArrayLike, ground_truth: tuple[ArrayLike, ArrayLike]) -> tuple[Tensor, Tensor]:
    """Linear datamodeling score, per test point.

    Args:
        score: ``(n_train, n_test)`` attribution scores.
        ground_truth: ``(gt_values, subsets)`` where ``gt_values`` is ``(S, n_test)``, the
            higher-is-better target of the model retrained on subset ``s`` for each test
            sample (averaged over runs), and ``subsets`` is either ``(S, subset_size)``
            integer training indices or an ``(S, n_train)`` boolean mask.

    Returns:
        ``(corr, pval)``, each a float64 tensor of shape ``(n_test,)``: the Spearman rank
        correlation over the ``S`` subsets between ``sum_{i in s} score[i, j]`` and
        ``gt_values[s, j]``, and its two-sided p-value. NaN where undefined.

    Example:
        >>> import torch
        >>> score = torch.tensor([[1.0], [2.0], [3.0]])
        >>> gt = torch.tensor([[3.0], [4.0], [5.0]])
        >>> idx = torch.tensor([[0, 1], [0, 2], [1, 2]])
        >>> corr, _ = lds(score, (gt, idx))
        >>> round(float(corr[0]), 6)
        1.0
    """
    if not isinstance(ground_truth, (tuple, list)) or len(ground_truth) != 2:
        raise ConfigError("ground_truth must be a pair (gt_values[S, n_test], subset_indices[S, k]); see calculate_lds_ground_truth")
    s = _score_matrix(score)
    gt = _np(ground_truth[0], "gt_values")
    if gt.ndim != 2 or gt.shape[1] != s.shape[1]:
        raise ShapeError(f"gt_values must have shape (S, n_test={s.shape[1]}), got {tuple(gt.shape)}")
    if gt.shape[0] < 2:
        raise DataError(f"LDS needs at least 2 subsets, got {gt.shape[0]}; retrain more subsets")
    masks = _subset_masks(ground_truth[1], s.shape[0], gt.shape[0])
    pred = masks @ s  # (S, n_test)
    rho, p = spearman_columns(pred, gt)
    return _as_torch(rho), _as_torch(p)


def loo_corr(score: ArrayLike, ground_truth: ArrayLike | tuple[ArrayLike, ArrayLike]) -> tuple[Tensor, Tensor]:
    """Leave-one-out correlation, per test point.

    Args:
        score: ``(n_train, n_test)`` attribution scores.
        ground_truth: either ``(gt, removed_idx)`` with ``gt`` of shape
            ``(n_removed, n_test)`` -- the test loss (or another lower-is-better target) of
            the model trained without ``removed_idx[r]`` -- and ``removed_idx`` of shape
            ``(n_removed,)``; or a plain ``(n_train, n_test)`` tensor meaning
            ``removed_idx = arange(n_train)``.

    Returns:
        ``(corr, pval)``, each ``(n_test,)`` float64: the Pearson correlation over ``r``
        of ``score[removed_idx[r], j]`` and ``gt[r, j]`` and its two-sided p-value.
        A good method has positive correlation (removing a helpful sample raises the loss).
    """
    s = _score_matrix(score)
    if isinstance(ground_truth, (tuple, list)):
        if len(ground_truth) != 2:
            raise ConfigError("ground_truth must be (gt[n_removed, n_test], removed_idx[n_removed]) or a (n_train, n_test) tensor")
        gt = _np(ground_truth[0], "gt")
        idx = _np(ground_truth[1], "removed_idx", dtype=np.int64).reshape(-1)
    else:
        gt = _np(ground_truth, "gt")
        idx = np.arange(gt.shape[0] if gt.ndim else 0)
        if gt.ndim == 2 and gt.shape[0] != s.shape[0]:
            raise ShapeError(
                f"a plain LOO ground truth must have one row per training sample ({s.shape[0]}), got {gt.shape[0]}; "
                "pass (gt, removed_idx) for a subset of removals"
            )
    if gt.ndim != 2 or gt.shape[1] != s.shape[1]:
        raise ShapeError(f"LOO ground truth must have shape (n_removed, n_test={s.shape[1]}), got {tuple(gt.shape)}")
    if idx.shape[0] != gt.shape[0]:
        raise ShapeError(f"removed_idx has {idx.shape[0]} entries but gt has {gt.shape[0]} rows; they must match")
    if idx.size == 0:
        raise DataError("the LOO ground truth is empty; retrain at least 3 leave-one-out models")
    if idx.min() < 0 or idx.max() >= s.shape[0]:
        raise ConfigError(f"removed_idx must lie in [0, {s.shape[0]}), got range [{idx.min()}, {idx.max()}]")
    r, p = pearson_columns(s[idx], gt)
    return _as_torch(r), _as_torch(p)


def _roc_curve(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-score, kind="mergesort")
    s_sorted = score[order]
    y_sorted = y[order]
    # Last position of each distinct score value (descending).
    distinct = np.r_[np.nonzero(np.diff(s_sorted))[0], s_sorted.size - 1]
    tps = np.cumsum(y_sorted)[distinct]
    fps = (distinct + 1) - tps
    pos = y.sum()
    neg = y.size - pos
    tpr = np.r_[0.0, tps / pos]
    fpr = np.r_[0.0, fps / neg]
    thresholds = np.r_[np.inf, s_sorted[distinct]]
    return fpr, tpr, thresholds


def mislabel_detection_auc(score: ArrayLike, noise_index: ArrayLike) -> tuple[float, tuple[Tensor, Tensor, Tensor]]:
    """ROC AUC of flagging mislabeled training samples by self-influence.

    Args:
        score: ``(n_train,)`` self-influence scores, or a square ``(n_train, n_train)``
            score matrix whose diagonal is used. Higher = more suspicious.
        noise_index: indices of the flipped samples ``(n_noisy,)``, or a boolean mask
            ``(n_train,)``.

    Returns:
        ``(auc, (fpr, tpr, thresholds))``. ``auc`` is the probability that a random
        flipped sample scores higher than a random clean one, ties counting one half.
        The curve holds one point per distinct score (descending thresholds, a sample is
        flagged when its score ``>=`` the threshold), starting at ``(0, 0)`` with
        threshold ``+inf``; each is a float64 tensor.
    """
    s = _np(score, "score")
    if s.ndim == 2:
        if s.shape[0] != s.shape[1]:
            raise ShapeError(f"a 2-d score must be square (n_train, n_train) to use its diagonal, got {tuple(s.shape)}")
        s = np.diagonal(s).copy()
    if s.ndim != 1 or s.size == 0:
        raise ShapeError(f"self-influence scores must have shape (n_train,), got {tuple(s.shape)}")
    if not np.all(np.isfinite(s)):
        raise DataError("self-influence scores contain NaN or inf; fix the attributor (e.g. add regularization)")
    n = s.size
    if (isinstance(noise_index, Tensor) and noise_index.dtype == torch.bool) or (
        isinstance(noise_index, np.ndarray) and noise_index.dtype == np.bool_
    ):
        y = _np(noise_index, "noise mask", dtype=np.bool_).reshape(-1)
        if y.size != n:
            raise ShapeError(f"a boolean noise mask must have n_train = {n} entries, got {y.size}")
    else:
        idx = _np(noise_index, "noise_index", dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise ConfigError(f"noise_index must lie in [0, {n}), got range [{idx.min()}, {idx.max()}]")
        y = np.zeros(n, dtype=np.bool_)
        y[idx] = True
    pos = int(y.sum())
    if pos == 0 or pos == n:
        raise DataError(
            f"mislabel detection needs both flipped and clean samples, got {pos} flipped of {n}; "
            "check noise_index (flip_labels returns the flipped indices)"
        )
    ranks = stats.rankdata(s, method="average")
    auc = (ranks[y].sum() - pos * (pos + 1) / 2.0) / (pos * (n - pos))
    fpr, tpr, thr = _roc_curve(y.astype(np.float64), s)
    return float(auc), (_as_torch(fpr), _as_torch(tpr), _as_torch(thr))


def mean_dropna(values: ArrayLike) -> tuple[float, int]:
    """Mean of the finite entries of ``values`` and how many there are (NaN if none)."""
    v = _np(values, "values").reshape(-1)
    v = v[np.isfinite(v)]
    return (float(v.mean()) if v.size else float("nan")), int(v.size)


def bootstrap_ci(
    values: ArrayLike, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean over test points.

    NaN entries are dropped first; test points are resampled with replacement
    ``num_resamples`` times with a ``numpy.random.Generator(PCG64(seed))``.

    Returns:
        ``(low, high)``; NaN if fewer than 2 finite values.
    """
    if not 0.0 < confidence < 1.0:
        raise ConfigError(f"confidence must be in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ConfigError(f"num_resamples must be >= 1, got {num_resamples}")
    v = _np(values, "values").reshape(-1)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return float("nan"), float("nan")
    rng = np.random.Generator(np.random.PCG64(seed))
    idx = rng.integers(0, v.size, size=(num_resamples, v.size))
    means = v[idx].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def summarize(values: ArrayLike, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0) -> dict[str, Any]:
    """JSON-able summary of per-test-point metric values.

    Returns:
        ``{"value", "ci_low", "ci_high", "confidence", "n_test", "n_valid"}`` where ``value``
        is the NaN-dropping mean and the interval is :func:`bootstrap_ci`.
    """
    v = _np(values, "values").reshape(-1)
    mean, n_valid = mean_dropna(v)
    lo, hi = bootstrap_ci(v, num_resamples=num_resamples, confidence=confidence, seed=seed)
    return {
        "value": mean,
        "ci_low": lo,
        "ci_high": hi,
        "confidence": confidence,
        "n_test": int(v.size),
        "n_valid": n_valid,
    }


@dataclass(frozen=True)
class NoiseCeiling:
    """The ground truth's own reproducibility.

    Attributes:
        run_corr: ``(n_test,)`` mean over run pairs ``(a, b)``, ``a < b``, of the Spearman
            correlation over subsets between run ``a``'s and run ``b``'s targets.
        reliability: ``(n_test,)`` Spearman-Brown reliability of the ``R``-run average,
            ``R * rho / (1 + (R - 1) * rho)`` with ``rho = max(run_corr, 0)``.
        ceiling: ``(n_test,)`` ``sqrt(reliability)``: the largest correlation any fixed
            predictor can have with the ``R``-run-averaged target under the classical model
            ``target = signal + independent run noise`` -- the best achievable LDS.
        num_runs: ``R``.
    """

    run_corr: Tensor
    reliability: Tensor
    ceiling: Tensor
    num_runs: int

    def summary(self, seed: int = 0) -> dict[str, Any]:
        """``{"run_corr": summarize(...), "ceiling": summarize(...), "num_runs": R}``."""
        return {
            "run_corr": summarize(self.run_corr, seed=seed),
            "reliability": summarize(self.reliability, seed=seed),
            "ceiling": summarize(self.ceiling, seed=seed),
            "num_runs": self.num_runs,
        }


def noise_ceiling(values: ArrayLike) -> NoiseCeiling:
    """Noise ceiling of a multi-run ground truth.

    Args:
        values: ``(S, R, n_test)`` target of the model retrained on subset ``s`` with
            independent seed ``r`` (``R >= 2``), as returned by
            :func:`tdabench.groundtruth.load_runs`.

    Returns:
        :class:`NoiseCeiling`. Per test point ``j``: ``run_corr[j]`` is the average over all
        run pairs of the Spearman correlation over subsets (the LDS that run ``b`` would get
        as a "predictor" of run ``a``), and ``ceiling[j] = sqrt(SB_R(run_corr[j]))`` with
        Spearman-Brown ``SB_R(rho) = R rho / (1 + (R - 1) rho)`` (rank correlations stand in
        for the Pearson correlations of classical test theory). Average with
        :func:`mean_dropna` to get one number.
    """
    v = _np(values, "values")
    if v.ndim != 3:
        raise ShapeError(f"values must have shape (S, R, n_test), got {tuple(v.shape)}; use load_runs()")
    s, r, _ = v.shape
    if r < 2:
        raise ConfigError(f"the noise ceiling needs num_runs >= 2 independent runs per subset, got {r}")
    if s < 3:
        raise DataError(f"the noise ceiling needs at least 3 subsets, got {s}")
    corrs = []
    for a in range(r):
        for b in range(a + 1, r):
            corrs.append(spearman_columns(v[:, a, :], v[:, b, :])[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns stay NaN
        rho = np.nanmean(np.stack(corrs), axis=0)
    rho_pos = np.clip(rho, 0.0, 1.0)
    rel = r * rho_pos / (1.0 + (r - 1) * rho_pos)
    ceiling = np.sqrt(rel)
    return NoiseCeiling(_as_torch(rho), _as_torch(rel), _as_torch(ceiling), r)
