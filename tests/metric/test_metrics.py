"""Metrics against independent oracles: scipy correlations, sklearn ROC, hand-computed AUC."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from sklearn.metrics import roc_auc_score, roc_curve

from tdabench.errors import ConfigError, DataError, NonFiniteError, ShapeError
from tdabench.metric import (
    bootstrap_ci,
    lds,
    loo_corr,
    mean_dropna,
    mislabel_detection_auc,
    noise_ceiling,
    summarize,
)


def _subsets(rng, s, n, k):
    return np.stack([np.sort(rng.choice(n, k, replace=False)) for _ in range(s)])


def test_lds_matches_scipy_spearman_loop():
    rng = np.random.default_rng(0)
    n_train, n_test, s, k = 30, 6, 25, 15
    score = rng.normal(size=(n_train, n_test))
    idx = _subsets(rng, s, n_train, k)
    gt = rng.normal(size=(s, n_test))
    gt[:, 1] = np.round(gt[:, 1])  # ties in the ground truth
    corr, pval = lds(torch.tensor(score), (torch.tensor(gt), torch.tensor(idx)))
    for j in range(n_test):
        pred = np.array([score[idx[t], j].sum() for t in range(s)])
        ref = stats.spearmanr(pred, gt[:, j])
        assert corr[j].item() == pytest.approx(ref.statistic, abs=1e-12)
        assert pval[j].item() == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    assert corr.shape == (n_test,) and corr.dtype == torch.float64


def test_lds_accepts_bool_mask_and_numpy():
    rng = np.random.default_rng(1)
    score = rng.normal(size=(20, 3))
    idx = _subsets(rng, 10, 20, 7)
    mask = np.zeros((10, 20), dtype=bool)
    np.put_along_axis(mask, idx, True, axis=1)
    gt = rng.normal(size=(10, 3))
    a = lds(score, (gt, idx))[0]
    b = lds(torch.tensor(score), (torch.tensor(gt), torch.tensor(mask)))[0]
    assert torch.allclose(a, b, atol=1e-14)


def test_lds_perfect_linear_model_gives_one():
    rng = np.random.default_rng(2)
    score = rng.normal(size=(40, 4))
    idx = _subsets(rng, 30, 40, 20)
    gt = np.stack([score[i].sum(axis=0) for i in idx]) * 3.0 + 1.0
    corr, _ = lds(score, (gt, idx))
    assert torch.allclose(corr, torch.ones(4, dtype=torch.float64))


def test_lds_constant_target_is_nan():
    rng = np.random.default_rng(3)
    score = rng.normal(size=(10, 2))
    idx = _subsets(rng, 8, 10, 5)
    gt = rng.normal(size=(8, 2))
    gt[:, 0] = 1.5
    corr, pval = lds(score, (gt, idx))
    assert torch.isnan(corr[0]) and torch.isnan(pval[0]) and torch.isfinite(corr[1])
    with pytest.warns(stats.ConstantInputWarning):
        assert np.isnan(stats.spearmanr(rng.normal(size=8), gt[:, 0]).statistic)  # scipy agrees


def test_lds_bad_input():
    score = torch.zeros(10, 2)
    idx = torch.tensor([[0, 1], [2, 3], [4, 5]])
    with pytest.raises(ShapeError):
        lds(score, (torch.zeros(3, 5), idx))
    with pytest.raises(ConfigError):
        lds(score, (torch.zeros(3, 2), idx + 9))
    with pytest.raises(ShapeError):
        lds(score, (torch.zeros(4, 2), idx))
    with pytest.raises(ShapeError):
        lds(torch.zeros(10), (torch.zeros(3, 2), idx))
    with pytest.raises(ConfigError):
        lds(score, torch.zeros(3, 2))


def test_loo_corr_matches_scipy_pearson():
    rng = np.random.default_rng(4)
    n_train, n_test = 25, 5
    score = rng.normal(size=(n_train, n_test))
    removed = np.array([3, 7, 1, 20, 11, 5, 9])
    gt = rng.normal(size=(len(removed), n_test))
    corr, pval = loo_corr(torch.tensor(score), (torch.tensor(gt), torch.tensor(removed)))
    for j in range(n_test):
        ref = stats.pearsonr(score[removed, j], gt[:, j])
        assert corr[j].item() == pytest.approx(ref.statistic, abs=1e-12)
        assert pval[j].item() == pytest.approx(ref.pvalue, rel=1e-9)


def test_loo_corr_plain_tensor_means_arange():
    rng = np.random.default_rng(5)
    score = rng.normal(size=(12, 3))
    gt = rng.normal(size=(12, 3))
    a = loo_corr(score, gt)[0]
    b = loo_corr(score, (gt, np.arange(12)))[0]
    assert torch.equal(a, b)
    with pytest.raises(ShapeError):
        loo_corr(score, gt[:5])
    with pytest.raises(ShapeError):
        loo_corr(score, (gt[:5], np.arange(4)))
    with pytest.raises(ConfigError):
        loo_corr(score, (gt[:2], np.array([0, 12])))


def test_auc_hand_computed_with_ties():
    # scores: flipped = {0, 2}; pairs (pos, neg): 0.9>0.5, 0.9>0.1, 0.9 vs 0.9 tie,
    # 0.5 vs 0.5 tie, 0.5>0.1, 0.5<0.9 -> (1 + 1 + .5 + .5 + 1 + 0) / 6
    s = torch.tensor([0.9, 0.5, 0.5, 0.1, 0.9])
    auc, (fpr, tpr, thr) = mislabel_detection_auc(s, torch.tensor([0, 2]))
    assert auc == pytest.approx(4.0 / 6.0, abs=1e-15)
    y = np.zeros(5, bool)
    y[[0, 2]] = True
    assert auc == pytest.approx(roc_auc_score(y, s.numpy()), abs=1e-12)
    rf, rt, rthr = roc_curve(y, s.numpy(), drop_intermediate=False)
    assert np.allclose(fpr.numpy(), rf) and np.allclose(tpr.numpy(), rt)
    assert np.allclose(thr.numpy()[1:], rthr[1:]) and np.isinf(thr[0].item())


def test_auc_random_matches_sklearn_and_uses_diagonal():
    rng = np.random.default_rng(6)
    n = 50
    s = np.round(rng.normal(size=n), 1)  # many ties
    y = np.zeros(n, bool)
    y[rng.choice(n, 8, replace=False)] = True
    auc, _ = mislabel_detection_auc(s, torch.tensor(y))
    assert auc == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    m = rng.normal(size=(n, n))
    np.fill_diagonal(m, s)
    auc2, _ = mislabel_detection_auc(torch.tensor(m), np.nonzero(y)[0])
    assert auc2 == pytest.approx(auc, abs=1e-15)


def test_auc_bad_input():
    with pytest.raises(DataError):
        mislabel_detection_auc(torch.ones(4), torch.tensor([], dtype=torch.long))
    with pytest.raises(ConfigError):
        mislabel_detection_auc(torch.ones(4), torch.tensor([4]))
    with pytest.raises(ShapeError):
        mislabel_detection_auc(torch.ones(4, 3), torch.tensor([1]))
    with pytest.raises(NonFiniteError):
        mislabel_detection_auc(torch.tensor([1.0, float("nan")]), torch.tensor([1]))


def test_aggregation_helpers():
    v = np.array([0.2, np.nan, 0.4, 0.6, np.nan])
    assert mean_dropna(v) == (pytest.approx(0.4), 3)
    lo, hi = bootstrap_ci(v, num_resamples=500, seed=3)
    assert lo <= 0.4 <= hi and (lo, hi) == bootstrap_ci(v, num_resamples=500, seed=3)
    assert (lo, hi) != bootstrap_ci(v, num_resamples=500, seed=4)
    # Oracle: the bootstrap distribution of the mean of 3 values is discrete; check bounds.
    assert lo >= 0.2 and hi <= 0.6
    s = summarize(torch.tensor(v))
    assert s["n_test"] == 5 and s["n_valid"] == 3 and s["value"] == pytest.approx(0.4)
    with pytest.raises(ConfigError):
        bootstrap_ci(v, confidence=1.0)


def test_noise_ceiling_matches_simulated_oracle():
    # target_r = signal + noise_r: the R-run average correlates with the signal at
    # sqrt(reliability); the ceiling must predict that from the runs alone.
    rng = np.random.default_rng(7)
    s, r, n_test, sigma = 3000, 2, 6, 0.8
    signal = rng.normal(size=(s, n_test))
    values = signal[:, None, :] + sigma * rng.normal(size=(s, r, n_test))
    nc = noise_ceiling(torch.tensor(values))
    best = np.array(
        [
            stats.spearmanr(signal[:, j], values[:, :, j].mean(axis=1)).statistic
            for j in range(n_test)
        ]
    )
    assert np.allclose(nc.ceiling.numpy(), best, atol=0.03)
    run01 = np.array(
        [stats.spearmanr(values[:, 0, j], values[:, 1, j]).statistic for j in range(n_test)]
    )
    assert np.allclose(nc.run_corr.numpy(), run01, atol=1e-12)
    rho = np.clip(run01, 0, 1)
    assert np.allclose(nc.reliability.numpy(), 2 * rho / (1 + rho), atol=1e-12)
    with pytest.raises(ConfigError):
        noise_ceiling(torch.zeros(5, 1, 2))
