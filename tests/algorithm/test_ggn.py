"""Gauss-Newton influence functions against a dense float64 oracle.

Oracle: the GGN ``Σ_i J_iᵀ H_i J_i / n`` with ``J_i`` from :func:`torch.func.jacrev` of the
model output and ``H_i`` from :func:`torch.func.hessian` of the per-sample cross-entropy;
per-sample gradients from a loop of :func:`torch.autograd.grad`; ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.utils.data import DataLoader, TensorDataset

from tdabench.algorithm import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)
from tdabench.errors import ConfigError
from tdabench.func.curvature import OutputLoss
from tdabench.func.solvers import CGSolver
from tdabench.task import AttributionTask

DT = torch.float64
N, NT, P, H_, C = 30, 5, 4, 6, 3
LAM = 0.05


def _data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N + NT, P, generator=g, dtype=DT)
    y = torch.randint(0, C, (N + NT,), generator=g)
    return (X[:N], y[:N]), (X[N:], y[N:])


def _model() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(P, H_), nn.Tanh(), nn.Linear(H_, C)).to(DT)


def _task(model: nn.Module, l2: float = 0.0) -> AttributionTask:
    def loss(params, batch):
        x, y = batch
        out = F.cross_entropy(functional_call(model, params, (x,)), y)
        return out + 0.5 * l2 * sum((p * p).sum() for p in params.values()) if l2 else out

    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return AttributionTask(loss, model, sd)


def _oracle(model: nn.Module, range_only: bool = False):
    (Xtr, ytr), (Xte, yte) = _data()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def params(f):
        out, o = {}, 0
        for n, s in zip(names, shapes, strict=True):
            out[n] = f[o : o + s.numel()].view(s)
            o += s.numel()
        return out

    def out_fn(f, x):
        return functional_call(model, params(f), (x,))

    d = flat0.numel()
    G = torch.zeros(d, d, dtype=DT)
    for i in range(N):
        xi, yi = Xtr[i : i + 1], ytr[i : i + 1]
        J = jacrev(lambda f, xi=xi: out_fn(f, xi))(flat0).reshape(C, d)
        z = out_fn(flat0, xi).reshape(-1)
        Hout = hessian(lambda t, yi=yi: F.cross_entropy(t[None], yi))(z)
        G += J.T @ Hout @ J
    G /= N

    def grads(X, y):
        rows = []
        for i in range(X.shape[0]):
            f = flat0.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(F.cross_entropy(out_fn(f, X[i : i + 1]), y[i : i + 1]), f)
            rows.append(g)
        return torch.stack(rows)

    gtr, gte = grads(Xtr, ytr), grads(Xte, yte)
    if range_only:  # (G + λI)^{-1} on the range of G, zero on its null space
        w, U = torch.linalg.eigh(G)
        U = U[:, w > 1e-10 * w.max()]
        w = w[w > 1e-10 * w.max()]
        return (gtr @ U) @ ((gte @ U) / (w + LAM)).T
    return gtr @ torch.linalg.solve(G + LAM * torch.eye(d, dtype=DT), gte.T)


def _scores(att):
    (Xtr, ytr), (Xte, yte) = _data()
    tr = DataLoader(TensorDataset(Xtr, ytr), batch_size=7)
    te = DataLoader(TensorDataset(Xte, yte), batch_size=2)
    att.cache(tr)
    return att.attribute(tr, te)


@pytest.mark.parametrize(
    "cls, kw",
    [
        (IFAttributorExplicit, {}),
        (IFAttributorCG, {"max_iter": 200, "tol": 1e-13}),
        (IFAttributorCG, {"max_iter": 200, "tol": 1e-13, "mode": "rev-fwd"}),
        (
            IFAttributorLiSSA,
            {"batch_size": N, "recursion_depth": 300, "scaling": 1.0, "damping": LAM},
        ),
    ],
)
def test_ggn_influence_matches_dense_oracle(cls, kw):
    model = _model()
    ref = _oracle(model)
    reg = {} if cls is IFAttributorLiSSA else {"regularization": LAM}
    att = cls(_task(model), hessian="ggn", ggn_output="cross_entropy", **reg, **kw)
    rtol = 1e-4 if cls is IFAttributorLiSSA else 1e-8
    torch.testing.assert_close(_scores(att), ref, rtol=rtol, atol=rtol * float(ref.abs().max()))


def test_ggn_arnoldi_full_rank_and_declared_on_the_loss():
    model = _model()
    ref = _oracle(model, range_only=True)
    task = _task(model)
    task.loss_func.ggn_output = OutputLoss("cross_entropy")  # declared by the loss
    d = sum(p.numel() for p in model.parameters())
    att = IFAttributorArnoldi(
        task, hessian="ggn", proj_dim=d, max_iter=d, tol=1e-14, regularization=LAM
    )
    # Arnoldi drops the GGN's null space (rank <= N (C - 1) < d): the oracle inverts its range only
    torch.testing.assert_close(_scores(att), ref, rtol=1e-6, atol=1e-6 * float(ref.abs().max()))


def test_injected_solver_is_used():
    model = _model()
    ref = _oracle(model)
    att = IFAttributorExplicit(
        _task(model), hessian="ggn", ggn_output="cross_entropy", solver=CGSolver(300, 1e-13, LAM)
    )
    torch.testing.assert_close(_scores(att), ref, rtol=1e-8, atol=1e-8 * float(ref.abs().max()))
    assert att.hyperparameters()["solver"] == "CGSolver"


def test_mismatched_output_loss_is_refused():
    model = _model()
    att = IFAttributorCG(_task(model, l2=0.1), hessian="ggn", ggn_output="cross_entropy")
    with pytest.raises(ConfigError, match="does not reproduce loss_func"):
        _scores(att)
    with pytest.raises(ConfigError, match="ggn_output"):
        IFAttributorCG(_task(model), hessian="ggn")
    with pytest.raises(ConfigError, match="hessian"):
        IFAttributorCG(_task(model), hessian="fisher")


@pytest.mark.parametrize(
    "cls, kw", [(IFAttributorCG, {"max_iter": 50, "tol": 1e-13}), (IFAttributorArnoldi, {})]
)
def test_tiny_memory_budget_gives_the_same_scores(cls, kw):
    """A one-byte budget solves one right-hand side at a time and keeps no replayed loader:
    the same numbers as the default (one piece)."""
    model = _model()
    ggn = {"hessian": "ggn", "ggn_output": "cross_entropy"}  # positive definite: CG converges
    base = _scores(cls(_task(model), regularization=LAM, **ggn, **kw))
    att = cls(_task(model), regularization=LAM, memory_budget=1, **ggn, **kw)
    assert att._chunk_rows() == 1
    torch.testing.assert_close(_scores(att), base, rtol=1e-12, atol=1e-12 * float(base.abs().max()))


@pytest.mark.parametrize("cls", ["IFAttributorExplicit", "IFAttributorCG"])
def test_test_side_split_by_the_memory_budget(cls, caplog):
    """A budget too small for all test gradients splits the test loader into parts (the training
    loader streamed once per part); the scores are those of one part."""
    import logging

    import tdabench.algorithm as alg

    g = torch.Generator().manual_seed(5)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(20, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (20,), generator=g)

    def loss(params, data):
        return F.cross_entropy(functional_call(model, params, (data[0],)), data[1])

    task = AttributionTask(loss, model, model.state_dict())
    train = DataLoader(TensorDataset(x[:14], y[:14]), batch_size=5)
    test = DataLoader(TensorDataset(x[14:], y[14:]), batch_size=2)
    kw = (
        {"regularization": 0.1, "max_dense_bytes": 10**6}
        if cls == "IFAttributorExplicit"
        else {"regularization": 0.1, "max_iter": 8, "tol": 0.0}
    )
    out = []
    for budget in (None, 1):
        a = getattr(alg, cls)(task, memory_budget=budget, **kw)
        a.cache(train)
        with caplog.at_level(logging.INFO, logger="tdabench.algorithm.influence_function"):
            out.append(a.attribute(train, test))
    assert "3 test parts" in caplog.text
    torch.testing.assert_close(out[0], out[1], rtol=1e-8, atol=1e-10)  # batched CG: other sums
