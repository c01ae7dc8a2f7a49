"""Input conventions of the metrics (index lists vs 0/1 masks), typed errors and dtypes.

Oracles: brute-force pair counting for the ROC AUC, scipy's spearmanr/pearsonr per column.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import auc as sk_auc

from tdabench.errors import ConfigError, NonFiniteError, ShapeError
from tdabench.metric import lds, loo_corr, mislabel_detection_auc


def _pair_auc(s: np.ndarray, y: np.ndarray) -> float:
    """P(score of a flipped sample > score of a clean one), ties one half, by counting pairs."""
    pos, neg = s[y], s[~y]
    wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
    return wins / (pos.size * neg.size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64, torch.bool])
def test_auc_accepts_dattri_01_vector_in_any_dtype(dtype):
    scores = torch.arange(100)
    for lo, hi, want in ((90, 100, 1.0), (80, 90, 8.0 / 9.0), (0, 10, 0.0)):
        noise = torch.zeros(100, dtype=dtype)
        noise[lo:hi] = 1
        auc, (fpr, tpr, _) = mislabel_detection_auc(scores, noise)
        assert auc == pytest.approx(want, abs=1e-12)
        assert sk_auc(fpr, tpr) == auc  # the returned curve integrates to the returned AUC exactly
        assert auc == mislabel_detection_auc(scores, torch.arange(lo, hi))[0]


def test_auc_mask_and_index_agree_with_pair_counting():
    rng = np.random.default_rng(0)
    n = 40
    s = np.round(rng.normal(size=n), 1)  # ties
    y = np.zeros(n, bool)
    y[rng.choice(n, 7, replace=False)] = True
    want = _pair_auc(s, y)
    for noise in (
        y,
        y.astype(np.float32),
        y.astype(np.int8),
        np.flatnonzero(y),
        np.flatnonzero(y).astype(float),
    ):
        assert mislabel_detection_auc(s, noise)[0] == pytest.approx(want, abs=1e-12)


def test_auc_ambiguous_input_raises_and_can_be_disambiguated():
    s = torch.tensor([0.1, 0.9])
    with pytest.raises(ConfigError, match="ambiguous"):
        mislabel_detection_auc(s, torch.tensor([0, 1]))
    assert (
        mislabel_detection_auc(s, torch.tensor([0, 1]), as_mask=True)[0] == 1.0
    )  # sample 1 flipped
    assert mislabel_detection_auc(s, torch.tensor([False, True]))[0] == 1.0
    assert mislabel_detection_auc(s, torch.tensor([1]))[0] == 1.0  # index list: not 0/1 over all n
    with pytest.raises(ConfigError):
        mislabel_detection_auc(s, torch.tensor([False, True]), as_mask=False)
    # n_train = 3: a 0/1 vector of length 3 always repeats an index, so it is a mask
    assert (
        mislabel_detection_auc(torch.tensor([0.1, 0.9, 0.5]), [1, 1, 0])[0] == 0.5
    )  # flipped {0, 1}


def test_auc_bad_noise_raises():
    s = torch.arange(6.0)
    for bad in ([1.5, 2.0], [float("nan")], [2, 2], [0, 7], np.array([-1])):
        with pytest.raises(ConfigError):
            mislabel_detection_auc(s, bad)
    with pytest.raises(ConfigError):
        mislabel_detection_auc(s, [0, 1, 2, 0, 1, 3])  # length n_train but not 0/1, and repeats
    with pytest.raises(NonFiniteError):
        mislabel_detection_auc(torch.tensor([0.0, float("inf"), 1.0]), [1])


def _lds_oracle(score, gt, idx):
    pred = np.stack([score[i].sum(axis=0) for i in idx])
    return np.array([stats.spearmanr(pred[:, j], gt[:, j]).statistic for j in range(gt.shape[1])])


def test_lds_masks_of_any_dtype_match_indices_and_scipy():
    rng = np.random.default_rng(1)
    n, m, s_, k = 12, 3, 9, 5
    score = rng.normal(size=(n, m))
    idx = np.stack([rng.choice(n, k, replace=False) for _ in range(s_)])
    gt = rng.normal(size=(s_, m))
    mask = np.zeros((s_, n), bool)
    np.put_along_axis(mask, idx, True, axis=1)
    want = _lds_oracle(score, gt, idx)
    for sub in (
        idx,
        mask,
        mask.astype(np.float32),
        torch.tensor(mask).long(),
        idx.astype(np.float64),
    ):
        corr, _ = lds(score, (gt, sub))
        np.testing.assert_allclose(corr.numpy(), want, atol=1e-12)


def test_lds_ambiguous_and_float_subsets():
    score = torch.tensor([[1.0], [2.0]])
    gt = torch.tensor([[1.0], [2.0], [3.0]])
    both = torch.tensor([[0, 1], [1, 0], [0, 1]])
    with pytest.raises(ConfigError, match="ambiguous"):
        lds(score, (gt, both))
    corr, _ = lds(score, (gt, both), as_mask=True)  # subsets {1}, {0}, {1}: pred 2, 1, 2
    assert np.isclose(corr.item(), stats.spearmanr([2, 1, 2], [1, 2, 3]).statistic)
    score3 = torch.arange(12.0).reshape(6, 2)
    gt3 = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
    for bad in (torch.tensor([[0, 1.5], [2, 3], [4, 5]]), torch.tensor([[0, 0], [2, 3], [4, 5]])):
        with pytest.raises(ConfigError):
            lds(score3, (gt3, bad))
    with pytest.raises(ShapeError):
        lds(score3, (gt3, torch.tensor([[0, 1], [2, 3]])))


def test_loo_mask_index_duplicates_and_floats():
    rng = np.random.default_rng(2)
    score = rng.normal(size=(10, 4))
    removed = np.array([1, 4, 6, 9])
    gt = rng.normal(size=(4, 4))
    want = np.array([stats.pearsonr(score[removed, j], gt[:, j]).statistic for j in range(4)])
    mask = np.zeros(10)
    mask[removed] = 1.0
    for r in (removed, mask, mask.astype(bool), torch.tensor(mask, dtype=torch.int32)):
        corr, _ = loo_corr(score, (gt, r))
        np.testing.assert_allclose(corr.numpy(), want, atol=1e-12)
    with pytest.raises(ConfigError, match="repeats"):
        loo_corr(score, (gt, np.array([1, 4, 4, 9])))
    with pytest.raises(ConfigError, match="non-integer"):
        loo_corr(score, (gt, np.array([1.0, 4.0, 6.5, 9.0])))
    with pytest.raises(ConfigError):
        loo_corr(
            score, (gt, mask[::-1].copy() * 2)
        )  # values other than 0/1 at length n_train: not an index list either


def test_non_finite_scores_raise_or_propagate():
    rng = np.random.default_rng(3)
    n, m = 10, 4
    score = rng.normal(size=(n, m))
    idx = np.stack([rng.choice(n, 5, replace=False) for _ in range(8)])
    gt = rng.normal(size=(8, m))
    bad = score.copy()
    bad[2, 1] = np.nan
    bad[5, 3] = np.inf
    with pytest.raises(NonFiniteError, match="2 of 4"):
        lds(bad, (gt, idx))
    corr, pval = lds(bad, (gt, idx), nan_policy="propagate")
    want = _lds_oracle(score, gt, idx)
    assert np.isnan(corr[[1, 3]].numpy()).all() and np.isnan(pval[[1, 3]].numpy()).all()
    np.testing.assert_allclose(corr[[0, 2]].numpy(), want[[0, 2]], atol=1e-12)
    gtn = gt.copy()
    gtn[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="ground truth"):
        lds(score, (gtn, idx))
    for policy in ("raise", "propagate"):
        with pytest.raises(NonFiniteError, match="no test point"):
            lds(np.full((n, m), np.nan), (gt, idx), nan_policy=policy)
        with pytest.raises(NonFiniteError):
            loo_corr(np.full((n, m), np.nan), rng.normal(size=(n, m)), nan_policy=policy)
    with pytest.raises(NonFiniteError):
        loo_corr(bad, rng.normal(size=(n, m)))
    with pytest.raises(ConfigError):
        lds(score, (gt, idx), nan_policy="omit")


def test_return_dtypes_follow_score_dtype():
    rng = np.random.default_rng(4)
    score = rng.normal(size=(8, 2))
    idx = np.stack([rng.choice(8, 4, replace=False) for _ in range(6)])
    gt = rng.normal(size=(6, 2))
    loo_gt = rng.normal(size=(8, 2))
    for dt in (torch.float32, torch.float64):
        st = torch.tensor(score, dtype=dt)
        for out in (
            *lds(st, (torch.tensor(gt, dtype=dt), torch.tensor(idx))),
            *loo_corr(st, torch.tensor(loo_gt, dtype=dt)),
        ):
            assert out.dtype == dt
    assert lds(score, (gt, idx))[0].dtype == torch.float64  # numpy input: float64
    c32 = lds(torch.tensor(score, dtype=torch.float32), (gt, idx))[0]
    np.testing.assert_allclose(
        c32.numpy(), _lds_oracle(score.astype(np.float32).astype(float), gt, idx), rtol=1e-6
    )


def test_perfect_rank_correlation_is_exactly_one_with_p_zero():
    # three subsets whose predictions and targets have the same ranks: scipy gives r = 1, p = 0
    score = torch.tensor([[0.1, 0.2], [0.2, 0.1], [0.3, 0.3], [0.4, 0.4]], dtype=torch.float32)
    gt = torch.tensor([[0.3, 0.3], [0.4, 0.4], [0.5, 0.3]], dtype=torch.float32)
    idx = torch.tensor([[0, 1], [0, 2], [1, 2]])
    corr, pval = lds(score, (gt, idx))
    ref = stats.spearmanr([0.3, 0.4, 0.5], [0.3, 0.4, 0.5])
    assert corr[0].item() == ref.statistic == 1.0 and pval[0].item() == ref.pvalue == 0.0
    assert corr.dtype == torch.float32


def test_auc_takes_dattris_keyword():
    s, noise = torch.arange(10.0), torch.zeros(10)
    noise[7:] = 1
    assert mislabel_detection_auc(score=s, ground_truth=noise)[0] == pytest.approx(1.0, abs=1e-15)
    with pytest.raises(ConfigError):
        mislabel_detection_auc(s, noise, ground_truth=noise)
    with pytest.raises(ConfigError):
        mislabel_detection_auc(s)
