"""Representer points: the representer theorem, the sign, an independent refit, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import minimize
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import RPSAttributor
from tdabench.errors import ConfigError
from tdabench.task import AttributionTask

N_TRAIN, N_TEST, N_IN, N_HID, N_CLS = 24, 6, 4, 5, 3
LAM = 0.01


class Net(nn.Module):
    def __init__(self, bias=True):
        super().__init__()
        self.fc1 = nn.Linear(N_IN, N_HID)
        self.drop = nn.Dropout(0.5)  # must be off while extracting features
        self.fc2 = nn.Linear(N_HID, N_CLS, bias=bias)

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.fc1(x))))


def _setup(bias=True, seed=0):
    torch.manual_seed(seed)
    model = Net(bias).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(N_TRAIN + N_TEST, N_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, N_CLS, (N_TRAIN + N_TEST,), generator=g)

    def loss(params, data):
        return F.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    task = AttributionTask(loss, model, model.state_dict())
    train = TensorDataset(x[:N_TRAIN], y[:N_TRAIN])
    test = TensorDataset(x[N_TRAIN:], y[N_TRAIN:])
    return model, task, train, test, x, y


def _feats(model, x, bias, normalize=False):
    with torch.no_grad():
        f = torch.tanh(model.fc1(x))
    if normalize:
        f = f / f.norm(dim=1, keepdim=True)
    if bias:
        f = torch.cat([f, torch.ones(len(f), 1, dtype=f.dtype)], dim=1)
    return f


def _scipy_refit(feat, y, w0):
    f, yy = feat.numpy(), y.numpy()
    n = len(f)

    def obj(wflat):
        w = wflat.reshape(w0.shape)
        z = f @ w.T
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        p = np.exp(logp)
        p[np.arange(n), yy] -= 1.0
        grad = p.T @ f / n + 2 * LAM * w
        return -logp[np.arange(n), yy].mean() + LAM * (w * w).sum(), grad.ravel()

    res = minimize(
        obj, w0.numpy().ravel(), jac=True, method="BFGS", options={"gtol": 1e-12, "maxiter": 10000}
    )
    return torch.from_numpy(res.x.reshape(w0.shape))


@pytest.mark.parametrize("bias,normalize", [(True, False), (False, False), (True, True)])
def test_representer_theorem_and_independent_refit(bias, normalize):
    model, task, train, test, x, y = _setup(bias)
    tr = DataLoader(train, batch_size=5, shuffle=False)  # 5 batches
    te = DataLoader(test, batch_size=4, shuffle=False)
    att = RPSAttributor(task, "fc2", normalize_preactivate=normalize, l2_strength=LAM, epoch=500)
    att.cache(tr)
    assert att.stationarity < 1e-13
    f_tr = _feats(model, x[:N_TRAIN], bias, normalize)
    f_te = _feats(model, x[N_TRAIN:], bias, normalize)
    # the refit agrees with an independent scipy BFGS fit of the same objective
    w0 = model.fc2.weight.detach()
    if bias:
        w0 = torch.cat([w0, model.fc2.bias.detach()[:, None]], dim=1)
    w_scipy = _scipy_refit(f_tr, y[:N_TRAIN], w0)
    torch.testing.assert_close(att.weight, w_scipy, rtol=1e-6, atol=1e-7)
    # representer theorem: every fine-tuned logit of a test sample is sum_i alpha_i <f_i, f_t>
    logits = f_te @ att.weight.T  # (n_test, C)
    alpha = att.alpha(f_tr, y[:N_TRAIN])
    torch.testing.assert_close((f_te @ f_tr.T) @ alpha, logits, rtol=1e-11, atol=1e-11)
    # the scores decompose the logit of the test sample's label
    scores = att.attribute(tr, te)
    assert scores.shape == (N_TRAIN, N_TEST)
    torch.testing.assert_close(
        scores.sum(0), logits[torch.arange(N_TEST), y[N_TRAIN:]], rtol=1e-11, atol=1e-11
    )
    # explaining another class: relabel the test set
    for c in range(N_CLS):
        relabelled = DataLoader(TensorDataset(x[N_TRAIN:], torch.full((N_TEST,), c)), batch_size=4)
        torch.testing.assert_close(
            att.attribute(tr, relabelled).sum(0), logits[:, c], rtol=1e-11, atol=1e-11
        )
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-12, atol=1e-12
    )


def test_sign_convention():
    model, task, train, _test, x, y = _setup()
    tr = DataLoader(train, batch_size=8)
    att = RPSAttributor(task, "fc2", l2_strength=LAM, epoch=500)
    att.cache(tr)
    # alpha_i[y_i] = (1 - p_i) / (2 lambda n) > 0 and alpha_i[c] < 0 for c != y_i
    alpha = att.alpha(_feats(model, x[:N_TRAIN], True), y[:N_TRAIN])
    own = alpha[torch.arange(N_TRAIN), y[:N_TRAIN]]
    assert bool((own > 0).all())
    assert bool((alpha.sum(1).abs() < 1e-12).all())
    # a training sample explaining itself raises its own true-class logit: helpful (> 0)
    assert bool((att.self_attribute(tr) > 0).all())
    # a test copy of sample 0 (same input and label): its largest contribution has a positive sign
    # and removing sample 0 from the refit raises the copy's loss (helpful <=> positive)
    copy = DataLoader(TensorDataset(x[:1], y[:1]), batch_size=1)
    s = att.attribute(tr, copy)[:, 0]
    assert float(s[0]) > 0
    f_tr = _feats(model, x[:N_TRAIN], True)
    full = att.weight
    keep = torch.arange(1, N_TRAIN)
    w0 = torch.cat([model.fc2.weight.detach(), model.fc2.bias.detach()[:, None]], dim=1)
    loo = _scipy_refit(f_tr[keep], y[keep], w0)
    loss_full = F.cross_entropy(f_tr[:1] @ full.T, y[:1])
    loss_loo = F.cross_entropy(f_tr[:1] @ loo.T, y[:1])
    assert float(loss_loo) > float(loss_full)


def test_self_attribute_matches_diag_multi_batch():
    _, task, train, _, _, _ = _setup(seed=3)
    tr = DataLoader(train, batch_size=7)  # 4 batches
    att = RPSAttributor(task, "fc2", l2_strength=0.003, epoch=300)
    att.cache(tr)
    torch.testing.assert_close(
        att.self_attribute(tr), torch.diagonal(att.attribute(tr, tr)), rtol=1e-12, atol=1e-12
    )
    assert att.hyperparameters()["l2_strength"] == 0.003


def test_bad_input():
    # (before cache(): refit on demand, tests/algorithm/test_rps_parity.py)
    _, task, _, _, _, _ = _setup()
    with pytest.raises(ConfigError, match="fc9"):
        RPSAttributor(task, "fc9")
    with pytest.raises(ConfigError, match=r"nn\.Linear"):
        RPSAttributor(task, "drop")
    with pytest.raises(ConfigError, match="l2_strength"):
        RPSAttributor(task, "fc2", l2_strength=0.0)
    with pytest.raises(ConfigError, match="epoch"):
        RPSAttributor(task, "fc2", epoch=0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    _, task, train, test, _, _ = _setup()
    tr, te = DataLoader(train, batch_size=8), DataLoader(test, batch_size=8)
    cpu = RPSAttributor(task, "fc2", l2_strength=LAM, epoch=300)
    gpu = RPSAttributor(task, "fc2", l2_strength=LAM, epoch=300, device="cuda")
    cpu.cache(tr)
    gpu.cache(tr)
    torch.testing.assert_close(
        gpu.attribute(tr, te).cpu(), cpu.attribute(tr, te), rtol=1e-8, atol=1e-10
    )
