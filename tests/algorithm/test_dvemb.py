"""DVEmb against the dense unrolled first-order influence of a tiny float64 SGD run.

Oracle: per-sample gradients by a plain autograd loop at every recorded step, the step
Jacobians ``I - eta_s sum_j g_j g_j^T`` built as dense matrices and multiplied explicitly;
the score of sample i on test z is ``sum_{t: i in B_t} g_z^T J_{T-1} ... J_{t+1} eta_t g_i``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import DVEmbAttributor
from tdabench.algorithm.dvemb import DVEmbArguments
from tdabench.errors import ConfigError, NotCachedError
from tdabench.task import AttributionTask

LR = 0.3


def _data(seed: int = 0, n: int = 7, m: int = 3):
    g = torch.Generator().manual_seed(seed)
    x, xt = (
        torch.randn(n, 3, generator=g, dtype=torch.float64),
        torch.randn(m, 3, generator=g, dtype=torch.float64),
    )
    return x, torch.randint(0, 2, (n,), generator=g), xt, torch.randint(0, 2, (m,), generator=g)


def _model(seed: int = 1) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _functional_task(model):
    def loss(params, data):
        x, y = data
        return nn.functional.cross_entropy(functional_call(model, params, (x,)), y)

    return AttributionTask(loss, model, model.state_dict())


def _eager_task(model):
    def loss(mdl, data, device):
        x, y = data
        return nn.functional.cross_entropy(mdl(x.to(device)), y.to(device))

    return AttributionTask(loss, model, model.state_dict())


def _train(model, atts, x, y, epochs=2, bs=3):
    """Plain SGD on the mean loss; records each step's parameters, batch indices and step size."""
    steps = []
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for epoch in range(epochs):
        for start in range(0, len(y), bs):
            idx = torch.arange(start, min(len(y), start + bs))
            for a in atts:
                a.cache_gradients(epoch, (x[idx], y[idx]), idx, LR)
            steps.append(
                (epoch, [p.detach().clone() for p in model.parameters()], idx, LR / len(idx))
            )
            opt.zero_grad()
            nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return steps


def _grad(model, params, x, y) -> torch.Tensor:
    """One sample's loss gradient at ``params`` by a plain autograd call (no vmap)."""
    ps = [p.detach().clone().requires_grad_(True) for p in params]
    names = [n for n, _ in model.named_parameters()]
    out = functional_call(model, dict(zip(names, ps, strict=True)), (x[None],))
    gs = torch.autograd.grad(nn.functional.cross_entropy(out, y[None]), ps)
    return torch.cat([g.reshape(-1) for g in gs])


def _oracle(model, steps, x, y, xt, yt, epoch=None):
    final = [p.detach() for p in model.parameters()]
    gt = torch.stack([_grad(model, final, xt[j], yt[j]) for j in range(len(yt))])  # (m, d)
    d = gt.shape[1]
    scores = torch.zeros(len(y), len(yt), dtype=torch.float64)
    after = torch.eye(d, dtype=torch.float64)  # J_{T-1} ... J_{t+1}
    for ep, params, idx, eta in reversed(steps):
        g = torch.stack([_grad(model, params, x[i], y[i]) for i in idx.tolist()])  # (B, d)
        if epoch is None or ep == epoch:
            scores[idx] += eta * (g @ after.T @ gt.T)
        after = after @ (torch.eye(d, dtype=torch.float64) - eta * g.T @ g)
    return scores


def test_matches_dense_unrolled_influence_with_and_without_identity_projection():
    x, y, xt, yt = _data()
    model = _model()
    task = _functional_task(model)
    plain = DVEmbAttributor(task)
    ident = DVEmbAttributor(task, proj_type="identity")
    steps = _train(model, [plain, ident], x, y)
    want = _oracle(model, steps, x, y, xt, yt)
    test = DataLoader(TensorDataset(xt, yt), batch_size=2)
    for att in (plain, ident):
        att.cache(memory_saving=False)
        got = att.attribute(test)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
        for e in (0, 1):
            torch.testing.assert_close(
                att.attribute(test, epoch=e),
                _oracle(model, steps, x, y, xt, yt, epoch=e),
                rtol=1e-9,
                atol=1e-12,
            )
        torch.testing.assert_close(att.attribute(test, train_data_indices=[4, 1]), want[[4, 1]])
    # tdabench's (train, test) form; the train loader only fixes n_train (two never-seen samples score 0)
    xtr = torch.cat([x, x[:2]])
    both = plain.attribute(
        DataLoader(TensorDataset(xtr, torch.cat([y, y[:2]])), batch_size=4), test
    )
    torch.testing.assert_close(both[: len(y)], want, rtol=1e-9, atol=1e-12)
    assert torch.equal(both[len(y) :], torch.zeros(2, len(yt), dtype=torch.float64))
    # self_attribute = the diagonal of attribute(train, train)
    train = DataLoader(TensorDataset(x, y), batch_size=3)
    torch.testing.assert_close(
        plain.self_attribute(train), plain.attribute(train, train).diagonal()
    )


def test_factorized_without_projection_equals_full_gradients():
    x, y, xt, yt = _data(2)
    m1, m2 = _model(3), _model(3)
    full = DVEmbAttributor(_functional_task(m1))
    kron = DVEmbAttributor(_eager_task(m2), factorization_type="kronecker")
    elem = DVEmbAttributor(
        _eager_task(m2), factorization_type="elementwise", layer_names=["0", "2"]
    )
    _train(m1, [full], x, y)
    _train(m2, [kron, elem], x, y)
    test = DataLoader(TensorDataset(xt, yt), batch_size=3)
    full.cache()
    want = full.attribute(test)
    for att in (kron, elem):
        att.cache(memory_saving=False)
        torch.testing.assert_close(att.attribute(test), want, rtol=1e-9, atol=1e-12)
        assert (
            len(att.cached_factors[0][0]) == 2 and not att.cached_gradients
        )  # factors kept, not gradients
    # projected factor features have the documented widths and are seeded
    for kind, width in (("kronecker", 2 * 2**2), ("elementwise", 2 * 4)):
        a, b = (
            DVEmbAttributor(_eager_task(m2), proj_dim=8, factorization_type=kind, proj_seed=5)
            for _ in range(2)
        )
        for att in (a, b):
            att.cache_gradients(0, (x[:3], y[:3]), torch.arange(3), LR)
        assert a.cached_gradients[0][0].shape == (3, width)
        assert torch.equal(a.cached_gradients[0][0], b.cached_gradients[0][0])


def test_gaussian_projection_statistics_one_step():
    # One SGD step: score = eta <P^T g_i, P^T g_z>; over projection seeds its mean is the exact
    # eta <g_i, g_z> and its variance eta^2 (|g_i|^2 |g_z|^2 + <g_i, g_z>^2) / k (Gaussian N(0, 1/k)).
    x, y, xt, yt = _data(4, n=2, m=1)
    model = _model(5)
    task = _functional_task(model)
    k, seeds, eta = 6, 300, LR / 2
    exact = DVEmbAttributor(task)
    exact.cache_gradients(0, (x, y), torch.arange(2), LR)
    gi = exact.cached_gradients[0][0][0]
    exact.cache()
    test = DataLoader(TensorDataset(xt, yt), batch_size=1)
    want = exact.attribute(test)[0, 0].item()
    gz = _grad(model, list(model.parameters()), xt[0], yt[0])
    assert want == pytest.approx(eta * float(gi @ gz), rel=1e-12)
    vals = []
    for s in range(seeds):
        att = DVEmbAttributor(task, proj_dim=k, proj_seed=s)
        att.cache_gradients(0, (x, y), torch.arange(2), LR)
        assert att.cached_gradients[0][0].shape == (2, k)
        att.cache()
        vals.append(att.attribute(test)[0, 0].item())
    vals = np.array(vals)
    var = eta**2 * (float(gi @ gi) * float(gz @ gz) + float(gi @ gz) ** 2) / k
    assert abs(vals.mean() - want) < 4 * np.sqrt(var / seeds)
    assert 0.7 < vals.var(ddof=1) / var < 1.4


def test_errors_and_arguments():
    x, y, xt, yt = _data()
    model = _model()
    task = _functional_task(model)
    with pytest.raises(ConfigError, match="Wrong loss function format"):
        DVEmbAttributor(task, factorization_type="kronecker")
    with pytest.raises(ConfigError, match="Wrong loss function format"):
        DVEmbAttributor(_eager_task(model))
    for bad in ({"proj_dim": 0}, {"proj_seed": -1}, {"factorization_type": "svd"}):
        with pytest.raises(ConfigError):
            DVEmbAttributor(task, **bad)
    att = DVEmbAttributor(task)
    with pytest.raises(NotCachedError):
        att.cache()
    att.cache_gradients(0, (x[:2], y[:2]), torch.arange(2), LR)
    with pytest.raises(NotCachedError):
        att.attribute(DataLoader(TensorDataset(xt, yt)))
    att.cache()
    with pytest.raises(ConfigError):
        att.attribute(DataLoader(TensorDataset(xt, yt)), epoch=3)
    with pytest.raises(ConfigError):
        att.attribute(DataLoader(TensorDataset(xt, yt)), 0)
    assert DVEmbArguments(proj_dim=16).to_dict()["proj_dim"] == 16


def test_registered_arguments_round_trip():
    from tdabench.algorithm.arguments import arguments_for

    cls = arguments_for("DVEmbAttributor")
    args = cls.from_dict(
        {"proj_dim": 64, "factorization_type": "elementwise", "layer_names": ["fc"]}
    )
    assert cls.from_dict(args.to_dict()) == args
    for bad in (
        {"proj_dim": 0},
        {"factorization_type": "svd"},
        {"proj_type": "identity", "factorization_type": "kronecker"},
        {"layer_names": []},
        {"no_such_key": 1},
    ):
        with pytest.raises(ConfigError):
            cls.from_dict(bad)


def test_cache_with_a_loader_says_what_is_missing():
    x, y, _, _ = _data()
    att = DVEmbAttributor(_functional_task(_model()))
    with pytest.raises(ConfigError, match="cache_gradients"):
        att.cache(DataLoader(TensorDataset(x, y)))
