"""dattri's call shapes of the influence-function attributors: ``attribute``/``self_attribute``
before ``cache()`` (cached on demand, or refused by Arnoldi) and the RelatIF third argument.

Oracles: the same attributor cached explicitly (bit-identical scores), and a dense float64
Hessian built with ``torch.autograd.functional.hessian`` and solved with ``torch.linalg.solve``.
"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from tdabench.errors import ConfigError, NotCachedError, ShapeError
from tdabench.task import AttributionTask

REG = 0.1
N_TRAIN, N_TEST, D_IN, C = 12, 5, 3, 3


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_TRAIN + N_TEST, D_IN, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N_TRAIN + N_TEST,), generator=g)
    model = nn.Linear(D_IN, C).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model, x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]


def _loader(x, y, bs):
    return DataLoader(TensorDataset(x, y), batch_size=bs)


def _task(model, target=False):
    def loss(params, batch):
        x, y = batch
        return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)

    def margin(params, batch):  # another target: the true-class logit
        x, y = batch
        out = torch.func.functional_call(model, params, (x,))
        return out.gather(1, y[:, None]).mean()

    return AttributionTask(loss, model, model.state_dict(), target_func=margin if target else None)


def _dense(model, x, y, target=False):
    """Flat per-sample gradients of loss and target, and H + REG I of the mean loss."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def unflat(flat):
        out, i = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = flat[i : i + s.numel()].reshape(s)
            i += s.numel()
        return out

    def out(flat, xs):
        return torch.func.functional_call(model, unflat(flat), (xs,))

    def loss(flat, xs, ys):
        return F.cross_entropy(out(flat, xs), ys)

    def tgt(flat, xs, ys):
        return out(flat, xs).gather(1, ys[:, None]).mean() if target else loss(flat, xs, ys)

    def grads(f, xs, ys):
        rows = [
            torch.autograd.grad(f(flat0.requires_grad_(), xs[i : i + 1], ys[i : i + 1]), flat0)[0]
            for i in range(len(ys))
        ]
        return torch.stack(rows)

    return grads, loss, tgt, flat0


@pytest.mark.parametrize("cls", [IFAttributorExplicit, IFAttributorCG, IFAttributorLiSSA])
def test_cache_on_demand_equals_explicit_cache(problem, cls, caplog):
    model, xtr, ytr, xte, yte = problem
    kw = {"regularization": REG} if cls is not IFAttributorLiSSA else {"recursion_depth": 20}
    tr, te = _loader(xtr, ytr, 5), _loader(xte, yte, 2)
    explicit = cls(_task(model), **kw)
    explicit.cache(tr)
    want, want_self = explicit.attribute(tr, te), explicit.self_attribute(tr)
    with caplog.at_level(logging.WARNING, logger="tdabench.algorithm.influence_function"):
        lazy = cls(_task(model), **kw)
        got = lazy.attribute(tr, te)
    assert any("before cache()" in r.getMessage() for r in caplog.records)
    assert torch.equal(got, want)
    lazy_self = cls(_task(model), **kw)
    assert torch.equal(lazy_self.self_attribute(tr), want_self)


def test_arnoldi_refuses_without_cache_as_valueerror(problem):
    model, xtr, ytr, xte, yte = problem
    att = IFAttributorArnoldi(_task(model), regularization=REG)
    with pytest.raises(NotCachedError, match="The Arnoldi projector has not been cached"):
        att.attribute(_loader(xtr, ytr, 4), _loader(xte, yte, 2))
    assert issubclass(NotCachedError, ValueError) and issubclass(NotCachedError, RuntimeError)


@pytest.mark.parametrize("target", [False, True])
@pytest.mark.parametrize("relatif", [None, "theta", "l"])
@pytest.mark.parametrize("cls", [IFAttributorExplicit, IFAttributorCG, IFAttributorArnoldi])
def test_relatif_matches_dense_oracle(problem, cls, relatif, target):
    model, xtr, ytr, xte, yte = problem
    grads, loss, tgt, flat0 = _dense(model, xtr, ytr, target)
    H = torch.autograd.functional.hessian(lambda f: loss(f, xtr, ytr), flat0.detach())
    A = H + REG * torch.eye(H.shape[0], dtype=H.dtype)
    g_tr, t_tr, t_te = grads(loss, xtr, ytr), grads(tgt, xtr, ytr), grads(tgt, xte, yte)
    x_tr = torch.linalg.solve(A, g_tr.T).T  # (H + λI)^{-1} g_i
    want = g_tr @ torch.linalg.solve(A, t_te.T)
    want_self = (g_tr * torch.linalg.solve(A, t_tr.T).T).sum(1)
    if relatif == "theta":
        denom = x_tr.norm(dim=1).clamp_min(1e-12)
    elif relatif == "l":
        denom = (t_tr * x_tr).sum(1).clamp_min(1e-12).sqrt()
    else:
        denom = torch.ones(N_TRAIN, dtype=torch.float64)
    kw = {"regularization": REG}
    if cls is IFAttributorCG:
        kw.update(max_iter=200, tol=1e-14)
    if cls is IFAttributorArnoldi:
        kw.update(proj_dim=flat0.numel(), max_iter=flat0.numel(), tol=0.0)
    att = cls(_task(model, target), **kw)
    att.cache(_loader(xtr, ytr, 5))
    tr, te = _loader(xtr, ytr, 5), _loader(xte, yte, 2)
    got = att.attribute(tr, te, relatif) if relatif else att.attribute(tr, te)
    torch.testing.assert_close(got, want / denom[:, None], rtol=1e-7, atol=1e-9)
    got_self = att.self_attribute(tr, relatif_method=relatif)
    torch.testing.assert_close(got_self, want_self / denom, rtol=1e-7, atol=1e-9)


def test_relatif_lissa_positional_and_unknown(problem):
    model, xtr, ytr, xte, yte = problem
    att = IFAttributorLiSSA(_task(model), recursion_depth=5, batch_size=2)
    tr, te = _loader(xtr, ytr, 4), _loader(xte, yte, 2)
    att.cache(tr)
    plain = att.attribute(tr, te)
    for method in ("l", "theta"):
        scaled = att.attribute(tr, te, method)
        ratio = plain / scaled  # one positive denominator per training row
        assert bool((ratio > 0).all())
        torch.testing.assert_close(ratio, ratio[:, :1].expand_as(ratio))
    with pytest.raises(ConfigError, match="Unknown relatif_method"):
        att.attribute(tr, te, "L2")
    with pytest.raises(ValueError):
        att.self_attribute(tr, "x")


@pytest.mark.parametrize("cls", [IFAttributorExplicit, IFAttributorCG, IFAttributorArnoldi])
def test_transform_test_rep_is_the_dense_inverse(problem, cls):
    """dattri's ``transform_test_rep(ckpt_idx, V)``: rows of ``(H + λI)^{-1} V``; with the
    test gradients as ``V`` it reproduces ``attribute`` (``G_train @ transform(G_test)ᵀ``)."""
    model, xtr, ytr, xte, yte = problem
    grads, loss, _, flat0 = _dense(model, xtr, ytr)
    H = torch.autograd.functional.hessian(lambda f: loss(f, xtr, ytr), flat0.detach())
    A = H + REG * torch.eye(H.shape[0], dtype=H.dtype)
    kw = {"regularization": REG}
    if cls is IFAttributorCG:
        kw.update(max_iter=200, tol=1e-14)
    if cls is IFAttributorArnoldi:
        kw.update(proj_dim=flat0.numel(), max_iter=flat0.numel(), tol=0.0)
    att = cls(_task(model), **kw)
    tr, te = _loader(xtr, ytr, 5), _loader(xte, yte, 2)
    with pytest.raises(NotCachedError, match="cache"):
        att.transform_test_rep(0, torch.zeros(1, flat0.numel(), dtype=torch.float64))
    att.cache(tr)
    V = torch.randn(
        4, flat0.numel(), generator=torch.Generator().manual_seed(5), dtype=torch.float64
    )
    torch.testing.assert_close(att.transform_test_rep(0, V), torch.linalg.solve(A, V.T).T)
    g_tr, g_te = grads(loss, xtr, ytr), grads(loss, xte, yte)
    torch.testing.assert_close(g_tr @ att.transform_test_rep(0, g_te).T, att.attribute(tr, te))
    with pytest.raises(ConfigError, match="ckpt_idx 1"):
        att.transform_test_rep(1, V)
    with pytest.raises(ShapeError, match="test_rep must be"):
        att.transform_test_rep(0, V[:, :-1])
