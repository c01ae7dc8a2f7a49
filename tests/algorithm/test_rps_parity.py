"""RPS with dattri's conventions: refit on demand without ``cache()``, and the output-loss
refit (``refit_loss="outputs"``: the task's target on pre-activations and the model's own
predicted probabilities), on a multi-class and a single-logit model.

Oracles: explicit cache-then-attribute (bit-identical), an independent scipy refit of the same
objective with closed-form representer values, and the representer decomposition (each column
sums to the refitted pre-activation).
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, Subset, TensorDataset

from tdabench.algorithm import RPSAttributor
from tdabench.errors import ConfigError, DataError
from tdabench.task import AttributionTask

N_TRAIN, N_TEST, N_IN, N_HID = 20, 6, 4, 5
LAM = 0.01


def _setup(n_out, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(N_IN, N_HID), nn.Tanh(), nn.Linear(N_HID, n_out)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N_TRAIN + N_TEST, N_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, max(n_out, 2), (N_TRAIN + N_TEST,), generator=g)
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    test = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    with torch.no_grad():
        feats = torch.tanh(model[0](x))
        outs = model(x)
    return model, train, test, feats, outs, y


def _bce(pre, target):
    return F.binary_cross_entropy_with_logits(pre, target)


def _soft_ce(pre, target):
    return F.cross_entropy(pre, target)


def _verified_optimum(obj_grad, w0, ours):
    """``ours`` after checking it is the refit's optimum: the objective's independent closed-form
    gradient vanishes there (strictly convex: the unique optimum), and scipy's BFGS lands near it."""
    assert np.abs(obj_grad(ours.ravel())[1]).max() < 1e-10
    res = minimize(obj_grad, w0.ravel(), jac=True, method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(res.x.reshape(w0.shape), ours, rtol=1e-4, atol=1e-6)
    return ours


def _loaders(train, test, bs=7):
    return DataLoader(train, batch_size=bs), DataLoader(test, batch_size=3)


def test_binary_single_logit_closed_form():
    model, train, test, feats, outs, _ = _setup(1)
    f, s = feats[:N_TRAIN].numpy(), torch.sigmoid(outs[:N_TRAIN]).numpy()  # dattri's targets

    def obj(wflat):  # mean BCE(f w, s) + LAM ||w||^2, w (1, m), no bias
        z = f @ wflat
        p = 1.0 / (1.0 + np.exp(-z))
        loss = np.mean(np.logaddexp(0.0, z) - s[:, 0] * z) + LAM * wflat @ wflat
        return loss, f.T @ (p - s[:, 0]) / len(f) + 2 * LAM * wflat

    task = AttributionTask(_bce, model, model.state_dict())
    att = RPSAttributor(task, "2", l2_strength=LAM, epoch=500)
    tr, te = _loaders(train, test)
    att.cache(tr)
    assert att.convention == "outputs" and att.row_scale == pytest.approx(1 / N_TRAIN)
    w = _verified_optimum(obj, model[2].weight.detach().numpy(), att.weight.numpy())
    p = 1.0 / (1.0 + np.exp(-(f @ w.T)))
    alpha = -(p - s) / (2 * LAM * N_TRAIN)  # (n, 1)
    want = alpha * (f @ feats[N_TRAIN:].numpy().T)  # every test sample uses the one logit
    got = att.attribute(tr, te)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)
    # representer theorem: a column sums to the refitted pre-activation f_j W*^T
    torch.testing.assert_close(got.sum(0), feats[N_TRAIN:] @ att.weight[0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(att.self_attribute(tr), att.attribute(tr, tr).diag())


@pytest.mark.parametrize("normalize", [False, True])
def test_multiclass_output_loss_closed_form(normalize):
    model, train, test, feats, outs, y = _setup(3)
    f, t = feats[:N_TRAIN].numpy(), torch.softmax(outs[:N_TRAIN], 1).numpy()

    def obj(wflat):
        w = wflat.reshape(3, N_HID)
        z = f @ w.T
        logp = (
            z
            - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
            - z.max(1, keepdims=True)
        )
        grad = (np.exp(logp) - t).T @ f / len(f) + 2 * LAM * w
        return -(t * logp).sum(1).mean() + LAM * (w * w).sum(), grad.ravel()

    task = AttributionTask(_soft_ce, model, model.state_dict())
    att = RPSAttributor(task, "2", l2_strength=LAM, epoch=500, normalize_preactivate=normalize)
    tr, te = _loaders(train, test)
    att.cache(tr)
    w = _verified_optimum(obj, model[2].weight.detach().numpy(), att.weight.numpy())
    z = f @ w.T
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    alpha = -(p - t) / (2 * LAM * N_TRAIN)  # (n, C)
    f_te = feats[N_TRAIN:].numpy()
    fi, fj = (
        (f, f_te)
        if not normalize
        else (
            f / np.linalg.norm(f, axis=1, keepdims=True),
            f_te / np.linalg.norm(f_te, axis=1, keepdims=True),
        )
    )
    want = alpha[:, y[N_TRAIN:].numpy()] * (fi @ fj.T)

    got = att.attribute(tr, te)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-13)
    if not normalize:  # decomposition of the explained class's refitted pre-activation
        pre = (feats[N_TRAIN:] @ att.weight.T).gather(1, y[N_TRAIN:, None]).squeeze(1)
        torch.testing.assert_close(got.sum(0), pre, rtol=1e-9, atol=1e-11)
    assert att.hyperparameters()["refit_loss"] == "outputs"


def test_sum_reduced_output_loss_and_non_decomposable():
    model, train, test, feats, _, y = _setup(3)
    tr, te = _loaders(train, test)

    def summed(pre, target):
        return F.cross_entropy(pre, target, reduction="sum")

    att = RPSAttributor(AttributionTask(summed, model, model.state_dict()), "2", l2_strength=LAM)
    att.cache(tr)
    assert att.row_scale == 1.0
    got = att.attribute(tr, te)
    pre = (feats[N_TRAIN:] @ att.weight.T).gather(1, y[N_TRAIN:, None]).squeeze(1)
    torch.testing.assert_close(got.sum(0), pre, rtol=1e-9, atol=1e-11)

    def squared(pre, target):  # neither a mean nor a sum over rows
        return F.cross_entropy(pre, target) ** 2

    bad = RPSAttributor(AttributionTask(squared, model, model.state_dict()), "2", l2_strength=LAM)
    with pytest.raises(ConfigError, match="mean"):
        bad.cache(tr)


def _labels_task(model):
    def loss(params, batch):
        return F.cross_entropy(functional_call(model, params, (batch[0],)), batch[1])

    return AttributionTask(loss, model, model.state_dict())


@pytest.mark.parametrize("kind", ["labels", "outputs"])
def test_refit_on_demand_equals_cache_for_that_call(kind, caplog):
    model, train, test, *_ = _setup(3)
    task = (
        _labels_task(model)
        if kind == "labels"
        else AttributionTask(_soft_ce, model, model.state_dict())
    )
    sub = DataLoader(Subset(train, range(8)), batch_size=4)
    tr, te = _loaders(train, test)
    want = {}
    for name, loader in (("full", tr), ("sub", sub)):
        ref = RPSAttributor(task, "2", l2_strength=LAM, epoch=200)
        ref.cache(loader)
        want[name] = (ref.attribute(loader, te), ref.self_attribute(loader))
    lazy = RPSAttributor(task, "2", l2_strength=LAM, epoch=200)
    with caplog.at_level(logging.WARNING, logger="tdabench.algorithm.rps"):
        assert torch.equal(lazy.attribute(tr, te), want["full"][0])
    assert any("before cache()" in r.getMessage() for r in caplog.records)
    assert lazy.convention == kind
    # as dattri: the refit is for that call only; the next call refits on its own loader
    assert torch.equal(lazy.attribute(sub, te), want["sub"][0])
    assert torch.equal(lazy.self_attribute(sub), want["sub"][1])
    assert lazy.weight is None


def test_refit_loss_argument():
    model, train, test, *_ = _setup(3)
    tr, te = _loaders(train, test)
    with pytest.raises(ConfigError, match="refit_loss"):
        RPSAttributor(_labels_task(model), "2", refit_loss="ce")
    att = RPSAttributor(_labels_task(model), "2", l2_strength=LAM)
    att.cache(tr)
    assert att.convention == "labels" and "refit_loss" not in att.hyperparameters()
    # a dattri-form target beside a tdabench loss: the target is the refit's output loss
    both = AttributionTask(
        _labels_task(model).original_loss_func, model, model.state_dict(), target_func=_soft_ce
    )
    forced = RPSAttributor(both, "2", l2_strength=LAM, refit_loss="outputs")
    auto = RPSAttributor(both, "2", l2_strength=LAM)
    forced.cache(tr)
    auto.cache(tr)
    assert auto.convention == "outputs"
    assert torch.equal(auto.attribute(tr, te), forced.attribute(tr, te))


def test_labels_refit_ignores_the_target_and_bad_batches_fail_clearly():
    model, train, test, *_ = _setup(3)
    tr, te = _loaders(train, test)
    plain = RPSAttributor(_labels_task(model), "2", l2_strength=LAM)
    plain.cache(tr)
    both = AttributionTask(
        _labels_task(model).original_loss_func, model, model.state_dict(), target_func=_soft_ce
    )
    labels = RPSAttributor(both, "2", l2_strength=LAM, refit_loss="labels")
    labels.cache(tr)
    assert torch.equal(labels.attribute(tr, te), plain.attribute(tr, te))
    wide = TensorDataset(torch.randn(4, N_IN + 1, dtype=torch.float64), torch.zeros(4).long())
    with pytest.raises(DataError, match="input shape"):
        plain.attribute(tr, DataLoader(wide, batch_size=2))
