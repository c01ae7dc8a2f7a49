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

Index lists and 0/1 masks (the input convention of ``lds``, ``loo_corr`` and
``mislabel_detection_auc``): the training-sample selections (LDS subsets, LOO removals,
flipped labels) may be given as integer index lists or as 0/1 masks over the ``n_train``
training samples, in any dtype (bool, integer, or float holding whole numbers):

* a **bool** array is always a mask;
* any other array whose last dimension is ``n_train`` and whose values are all 0 or 1
  is a mask (dattri passes its flipped labels as such a float vector);
* anything else is an index list: whole numbers in ``[0, n_train)``, distinct within
  each row (a float such as 1.5 or a NaN raises :class:`~tdabench.errors.ConfigError`,
  never truncated; a repeated index raises too);
* an input is **ambiguous** when it is a 0/1 mask by the rule above *and* also a valid
  index list (distinct, in range, with the right count). That happens only when
  ``n_train <= 2`` and every row lists all of ``0 .. n_train - 1``; it raises
  :class:`~tdabench.errors.ConfigError` instead of guessing. Pass a bool tensor or
  ``as_mask=True`` to mean a mask, ``as_mask=False`` to mean indices.

Non-finite values: a NaN or inf score or target raises
:class:`~tdabench.errors.NonFiniteError` (``nan_policy="propagate"`` returns NaN for the
affected test points instead; an input with no finite test point raises either way).
Return dtypes follow dattri: ``lds`` and ``loo_corr`` return the floating dtype of a
``score`` tensor (float32 in, float32 out; float64 otherwise), computed in float64.
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

from tdabench.errors import ConfigError, DataError, NonFiniteError, ShapeError

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
        raise ConfigError(
            f"{what} cannot be converted to a {np.dtype(dtype).name} array ({exc}); pass a tensor"
        ) from exc


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
        raise ShapeError(
            f"pearson_columns needs two (S, n) arrays of the same shape, got {x.shape} and {y.shape}"
        )
    s = x.shape[0]
    xc = x - x.mean(axis=0, keepdims=True)
    yc = y - y.mean(axis=0, keepdims=True)
    # Scale each column by its largest magnitude first (as scipy does) so that the products
    # cannot overflow or underflow, then r = sum(x y) / sqrt(sum(x^2) sum(y^2)): one rounded
    # square root, so that perfectly correlated ranks give exactly 1 (and p = 0, as scipy).
    with np.errstate(invalid="ignore", divide="ignore"):
        xc = xc / np.max(np.abs(xc), axis=0, initial=0.0)
        yc = yc / np.max(np.abs(yc), axis=0, initial=0.0)
        r = np.sum(xc * yc, axis=0) / np.sqrt(np.sum(xc * xc, axis=0) * np.sum(yc * yc, axis=0))
    # A constant column has no defined correlation (as in scipy).
    const = (
        np.all(x == x[:1], axis=0) | np.all(y == y[:1], axis=0) if s else np.ones(x.shape[1], bool)
    )
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
        raise ShapeError(
            f"spearman_columns needs two (S, n) arrays of the same shape, got {x.shape} and {y.shape}"
        )
    if x.shape[0] == 0:
        return np.full(x.shape[1], np.nan), np.full(x.shape[1], np.nan)
    return pearson_columns(_rank_columns(x), _rank_columns(y))


def _score_matrix(score: ArrayLike) -> np.ndarray:
    s = _np(score, "score")
    if s.ndim != 2:
        raise ShapeError(
            f"score must have shape (n_train, n_test), got {tuple(s.shape)}; attribute() returns this shape"
        )
    return s


def _as_torch(a: np.ndarray, dtype: torch.dtype = torch.float64) -> Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(dtype)


def _out_dtype(score: ArrayLike) -> torch.dtype:
    """dattri returns the score tensor's dtype; a non-floating or non-tensor score gives float64."""
    if isinstance(score, Tensor) and score.dtype.is_floating_point:
        return score.dtype
    return torch.float64


def _whole_numbers(x: ArrayLike, what: str) -> tuple[np.ndarray, bool]:
    """``(int64 array, is_bool)``; refuses NaN/inf and non-integral values instead of truncating."""
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.dtype == np.bool_:
        return a.astype(np.int64), True
    if a.dtype.kind not in "iuf":
        raise ConfigError(f"{what} must be integer indices or a 0/1 mask, got dtype {a.dtype}")
    if a.dtype.kind == "f":
        if not np.all(np.isfinite(a)):
            raise ConfigError(f"{what} contains NaN or inf; pass integer indices or a 0/1 mask")
        bad = a[a != np.round(a)]
        if bad.size:
            raise ConfigError(
                f"{what} contains non-integer values such as {bad.flat[0]!r}; indices are never truncated: "
                "pass integer indices or a 0/1 mask"
            )
    return a.astype(np.int64), False


def _index_problem(idx: np.ndarray, n: int, count: int | None) -> str | None:
    """Why ``idx`` (rows of indices) is not a valid index list, or ``None`` if it is."""
    if count is not None and idx.shape[-1] != count:
        return f"it has {idx.shape[-1]} entries where {count} are needed"
    if idx.size and (idx.min() < 0 or idx.max() >= n):
        return (
            f"its values span [{idx.min()}, {idx.max()}], outside [0, {n}) (n_train of the score)"
        )
    srt = np.sort(idx, axis=-1)
    if idx.shape[-1] > 1 and np.any(srt[..., 1:] == srt[..., :-1]):
        return "it repeats an index (each sample may be listed once)"
    return None


def _mask_problem(a: np.ndarray, n: int, count: int | None) -> str | None:
    """Why ``a`` is not a 0/1 mask over ``n`` samples (with ``count`` ones), or ``None``."""
    if a.shape[-1] != n:
        return f"its last dimension is {a.shape[-1]}, not n_train = {n}"
    if a.size and not np.all((a == 0) | (a == 1)):
        return "it holds values other than 0 and 1"
    if count is not None and int(a.sum()) != count:
        return f"it has {int(a.sum())} ones where {count} are needed"
    return None


def _selection(
    x: ArrayLike,
    n: int,
    what: str,
    ndim: int,
    as_mask: bool | None = None,
    count: int | None = None,
) -> tuple[str, np.ndarray]:
    """Read ``x`` as a 0/1 mask or an index list (see the module docstring for the rule).

    Args:
        x: ``(n_train,)``/``(S, n_train)`` mask or ``(k,)``/``(S, k)`` indices (``ndim`` 1 or 2).
        n: ``n_train``.
        what: the argument's name, for messages.
        ndim: 1 or 2.
        as_mask: ``True`` / ``False`` force a reading; ``None`` infers it.
        count: for 1-d input, the number of selected samples required (LOO: rows of gt).

    Returns:
        ``("mask", bool array)`` or ``("index", int64 array)``, with ``ndim`` dimensions.
    """
    a, is_bool = _whole_numbers(x, what)
    if ndim == 1:
        a = a.reshape(-1)
    elif a.ndim != ndim:
        raise ShapeError(
            f"{what} must be (S, subset_size) indices or an (S, n_train) mask, got shape {tuple(a.shape)}"
        )
    if count is not None and a.shape[-1] not in (count, n):
        raise ShapeError(
            f"{what} has {a.shape[-1]} entries, but the ground truth has {count} rows (an index list needs {count}, "
            f"a 0/1 mask n_train = {n}); they must match"
        )
    if is_bool and as_mask is False:
        raise ConfigError(
            f"{what} is a bool tensor, which is always a mask; pass integers to give indices"
        )
    why_mask = _mask_problem(a, n, count)
    why_index = "a bool tensor is a mask" if is_bool else _index_problem(a, n, count)
    if as_mask is None and why_mask is None and why_index is None:
        raise ConfigError(
            f"{what} is ambiguous: it is a 0/1 vector over all n_train = {n} samples and also a valid list of "
            "distinct indices (possible only when n_train <= 2); pass a bool tensor or as_mask=True to mean a "
            "mask, or as_mask=False to mean indices"
        )
    if as_mask is not False and why_mask is None:
        return "mask", a.astype(np.bool_)
    if as_mask is not True and why_index is None:
        return "index", a
    if as_mask is True:
        raise ConfigError(f"{what} was given as a mask (as_mask=True) but {why_mask}")
    raise ConfigError(
        f"{what} is neither a valid index list ({why_index}) nor a 0/1 mask over n_train = {n} samples "
        f"({why_mask}); pass distinct integer indices in [0, {n}) or a 0/1 mask of length {n}"
    )


def _subset_masks(
    subsets: ArrayLike, n_train: int, num_subsets: int, as_mask: bool | None
) -> np.ndarray:
    """Float ``(S, n_train)`` membership mask from ``(S, k)`` indices or an ``(S, n_train)`` 0/1 mask."""
    kind, a = _selection(subsets, n_train, "subset indices", 2, as_mask)
    if a.shape[0] != num_subsets:
        raise ShapeError(
            f"subset indices must have one row per subset, S = {num_subsets} (rows of gt_values), got {tuple(a.shape)}"
        )
    if kind == "mask":
        return a.astype(np.float64)
    m = np.zeros((num_subsets, n_train), dtype=np.float64)
    np.put_along_axis(m, a, 1.0, axis=1)
    return m


def _finite_columns(s: np.ndarray, gt: np.ndarray, nan_policy: str) -> np.ndarray:
    """``(n_test,)`` bool: test points whose scores and targets are all finite.

    Raises NonFiniteError for any non-finite column under ``nan_policy="raise"``, and for
    an input without a single finite test point under either policy.
    """
    if nan_policy not in ("raise", "propagate"):
        raise ConfigError(f"nan_policy must be 'raise' or 'propagate', got {nan_policy!r}")
    ok_s = np.all(np.isfinite(s), axis=0)
    ok_g = np.all(np.isfinite(gt), axis=0)
    ok = ok_s & ok_g
    if ok.all():
        return ok
    where = "score" if not ok_s.all() else "ground truth"
    bad = np.flatnonzero(~ok)
    msg = (
        f"{bad.size} of {ok.size} test points have NaN or inf in the {where} (first: test {bad[:5].tolist()}); "
        "fix the attributor or the retraining"
    )
    if not ok.any():
        raise NonFiniteError(msg + "; no test point is finite")
    if nan_policy == "raise":
        raise NonFiniteError(
            msg + ", or pass nan_policy='propagate' to get NaN for those test points"
        )
    return ok


def lds(
    score: ArrayLike,
    ground_truth: tuple[ArrayLike, ArrayLike],
    *,
    as_mask: bool | None = None,
    nan_policy: str = "raise",
) -> tuple[Tensor, Tensor]:
    """Linear datamodeling score, per test point.

    Args:
        score: ``(n_train, n_test)`` attribution scores.
        ground_truth: ``(gt_values, subsets)`` where ``gt_values`` is ``(S, n_test)``, the
            higher-is-better target of the model retrained on subset ``s`` for each test
            sample (averaged over runs), and ``subsets`` is either ``(S, subset_size)``
            integer training indices or an ``(S, n_train)`` 0/1 mask of any dtype (see the
            module docstring for how the two are told apart).
        as_mask: ``True``/``False`` force reading ``subsets`` as a mask / as indices;
            ``None`` (default) infers it and raises on the ambiguous case.
        nan_policy: ``"raise"`` (default): a NaN/inf score or target raises
            :class:`~tdabench.errors.NonFiniteError`; ``"propagate"``: those test points
            get NaN.

    Returns:
        ``(corr, pval)``, each a tensor of shape ``(n_test,)`` in the score tensor's
        floating dtype (float64 for other inputs): the Spearman rank correlation over the
        ``S`` subsets between ``sum_{i in s} score[i, j]`` and ``gt_values[s, j]``, and its
        two-sided p-value. NaN where undefined (a constant column).

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
        raise ConfigError(
            "ground_truth must be a pair (gt_values[S, n_test], subset_indices[S, k]); see calculate_lds_ground_truth"
        )
    s = _score_matrix(score)
    gt = _np(ground_truth[0], "gt_values")
    if gt.ndim != 2 or gt.shape[1] != s.shape[1]:
        raise ShapeError(
            f"gt_values must have shape (S, n_test={s.shape[1]}), got {tuple(gt.shape)}"
        )
    if gt.shape[0] < 2:
        raise DataError(f"LDS needs at least 2 subsets, got {gt.shape[0]}; retrain more subsets")
    masks = _subset_masks(ground_truth[1], s.shape[0], gt.shape[0], as_mask)
    ok = _finite_columns(s, gt, nan_policy)
    pred = masks @ np.where(ok, s, 0.0)  # (S, n_test)
    rho, p = spearman_columns(pred, np.where(ok, gt, 0.0))
    rho, p = np.where(ok, rho, np.nan), np.where(ok, p, np.nan)
    dt = _out_dtype(score)
    return _as_torch(rho, dt), _as_torch(p, dt)


def _loo_ground_truth(
    ground_truth: ArrayLike | tuple[ArrayLike, ArrayLike], n_train: int, as_mask: bool | None
) -> tuple[np.ndarray, np.ndarray]:
    """``(gt (n_removed, n_test), removed_idx (n_removed,))`` from either accepted form."""
    if isinstance(ground_truth, (tuple, list)):
        if len(ground_truth) != 2:
            raise ConfigError(
                "ground_truth must be (gt[n_removed, n_test], removed_idx[n_removed]) or a (n_train, n_test) tensor"
            )
        gt = _np(ground_truth[0], "gt")
        if gt.ndim != 2:
            raise ShapeError(
                f"LOO ground truth must have shape (n_removed, n_test), got {tuple(gt.shape)}"
            )
        kind, a = _selection(ground_truth[1], n_train, "removed_idx", 1, as_mask, count=gt.shape[0])
        idx = np.flatnonzero(a) if kind == "mask" else a
        return gt, idx
    gt = _np(ground_truth, "gt")
    if gt.ndim == 2 and gt.shape[0] != n_train:
        raise ShapeError(
            f"a plain LOO ground truth must have one row per training sample ({n_train}), got {gt.shape[0]}; "
            "pass (gt, removed_idx) for a subset of removals"
        )
    return gt, np.arange(gt.shape[0] if gt.ndim else 0)


def loo_corr(
    score: ArrayLike,
    ground_truth: ArrayLike | tuple[ArrayLike, ArrayLike],
    *,
    as_mask: bool | None = None,
    nan_policy: str = "raise",
) -> tuple[Tensor, Tensor]:
    """Leave-one-out correlation, per test point.

    Args:
        score: ``(n_train, n_test)`` attribution scores.
        ground_truth: either ``(gt, removed)`` with ``gt`` of shape ``(n_removed, n_test)``
            -- the test loss (or another lower-is-better target) of the model trained
            without a removed sample -- and ``removed`` the ``(n_removed,)`` distinct
            indices of those samples in ``gt``'s row order, or a ``(n_train,)`` 0/1 mask of
            any dtype with ``n_removed`` ones (then ``gt``'s rows are in increasing index
            order); or a plain ``(n_train, n_test)`` tensor meaning ``removed = arange(n_train)``.
        as_mask: ``True``/``False`` force reading ``removed`` as a mask / as indices;
            ``None`` infers it (module docstring).
        nan_policy: ``"raise"`` (default) or ``"propagate"``, as in :func:`lds`.

    Returns:
        ``(corr, pval)``, each ``(n_test,)`` in the score tensor's floating dtype (float64
        otherwise): the Pearson correlation over removals ``r`` of ``score[removed[r], j]``
        and ``gt[r, j]`` and its two-sided p-value. A good method has positive correlation
        (removing a helpful sample raises the loss).
    """
    s = _score_matrix(score)
    gt, idx = _loo_ground_truth(ground_truth, s.shape[0], as_mask)
    if gt.ndim != 2 or gt.shape[1] != s.shape[1]:
        raise ShapeError(
            f"LOO ground truth must have shape (n_removed, n_test={s.shape[1]}), got {tuple(gt.shape)}"
        )
    if idx.shape[0] != gt.shape[0]:
        raise ShapeError(
            f"removed_idx has {idx.shape[0]} entries but gt has {gt.shape[0]} rows; they must match"
        )
    if idx.size == 0:
        raise DataError("the LOO ground truth is empty; retrain at least 3 leave-one-out models")
    sub = s[idx]
    ok = _finite_columns(sub, gt, nan_policy)
    r, p = pearson_columns(np.where(ok, sub, 0.0), np.where(ok, gt, 0.0))
    r, p = np.where(ok, r, np.nan), np.where(ok, p, np.nan)
    dt = _out_dtype(score)
    return _as_torch(r, dt), _as_torch(p, dt)


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


def _self_scores(score: ArrayLike) -> np.ndarray:
    """``(n_train,)`` finite self-influence scores (the diagonal of a square matrix)."""
    s = _np(score, "score")
    if s.ndim == 2:
        if s.shape[0] != s.shape[1]:
            raise ShapeError(
                f"a 2-d score must be square (n_train, n_train) to use its diagonal, got {tuple(s.shape)}"
            )
        s = np.diagonal(s).copy()
    if s.ndim != 1 or s.size == 0:
        raise ShapeError(f"self-influence scores must have shape (n_train,), got {tuple(s.shape)}")
    if not np.all(np.isfinite(s)):
        bad = np.flatnonzero(~np.isfinite(s))
        raise NonFiniteError(
            f"{bad.size} self-influence scores are NaN or inf (first: train {bad[:5].tolist()}); "
            "fix the attributor (e.g. add regularization)"
        )
    return s


def mislabel_detection_auc(
    score: ArrayLike,
    noise_index: ArrayLike | None = None,
    *,
    as_mask: bool | None = None,
    ground_truth: ArrayLike | None = None,
) -> tuple[float, tuple[Tensor, Tensor, Tensor]]:
    """ROC AUC of flagging mislabeled training samples by self-influence.

    Args:
        score: ``(n_train,)`` self-influence scores, or a square ``(n_train, n_train)``
            score matrix whose diagonal is used. Higher = more suspicious.
        noise_index: the flipped samples: ``(n_noisy,)`` distinct indices, or a
            ``(n_train,)`` 0/1 mask of any dtype (dattri's convention; the module
            docstring says how the two are told apart).
        as_mask: ``True``/``False`` force reading ``noise_index`` as a mask / as indices;
            ``None`` (default) infers it and raises on the ambiguous case.
        ground_truth: dattri's keyword name for ``noise_index`` (pass one of the two).

    Returns:
        ``(auc, (fpr, tpr, thresholds))``. ``auc`` is the probability that a random
        flipped sample scores higher than a random clean one, ties counting one half
        (computed as the trapezoidal area under the curve below, which equals it up to
        rounding, so that ``sklearn.metrics.auc(fpr, tpr) == auc`` exactly). The curve holds
        one point per distinct score (descending thresholds, a sample is flagged when its
        score ``>=`` the threshold), starting at ``(0, 0)`` with threshold ``+inf``; each
        is a float64 tensor.

    Raises:
        NonFiniteError: a NaN or inf score.
        ConfigError: ``noise_index`` is neither a valid index list nor a mask, or is
            ambiguous.
        DataError: no flipped or no clean sample.
    """
    if (noise_index is None) == (ground_truth is None):
        raise ConfigError("pass the flipped samples once: noise_index (or dattri's ground_truth=)")
    noise_index = noise_index if noise_index is not None else ground_truth
    s = _self_scores(score)
    n = s.size
    kind, a = _selection(noise_index, n, "noise_index", 1, as_mask)
    if kind == "mask":
        y = a
    else:
        y = np.zeros(n, dtype=np.bool_)
        y[a] = True
    pos = int(y.sum())
    if pos == 0 or pos == n:
        raise DataError(
            f"mislabel detection needs both flipped and clean samples, got {pos} flipped of {n}; "
            "check noise_index (flip_labels returns the flipped indices)"
        )
    fpr, tpr, thr = _roc_curve(y.astype(np.float64), s)
    auc = float(np.trapezoid(tpr, fpr))
    return auc, (_as_torch(fpr), _as_torch(tpr), _as_torch(thr))


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


def summarize(
    values: ArrayLike, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict[str, Any]:
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
        raise ShapeError(
            f"values must have shape (S, R, n_test), got {tuple(v.shape)}; use load_runs()"
        )
    s, r, _ = v.shape
    if r < 2:
        raise ConfigError(
            f"the noise ceiling needs num_runs >= 2 independent runs per subset, got {r}"
        )
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
