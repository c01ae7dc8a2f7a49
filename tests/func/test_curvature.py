"""Oracle tests of the curvature operators and solver objects (float64, tiny models).

Oracles: a dense GGN ``Σ_i J_iᵀ H_i J_i / n`` with ``J`` from :func:`torch.func.jacrev` and
``H_i`` from :func:`torch.func.hessian` of the per-sample output loss (autodiff, not the closed
form under test); the exact Hessian from :func:`torch.func.hessian`; ``torch.linalg.solve``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jacrev

from tdabench.errors import ConfigError, MemoryLimitError
from tdabench.func.curvature import (
    EmpiricalFisher,
    ExactHessian,
    GaussNewton,
    OutputLoss,
    resolve_output_loss,
)
from tdabench.func.solvers import ArnoldiSolver, CGSolver, DenseInverse, DenseSolver
from tdabench.memory import MemoryPlanner

DT = torch.float64
N, P, H_, C = 12, 4, 5, 3


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _mlp_out(flat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    W1 = flat[: H_ * P].view(H_, P)
    W2 = flat[H_ * P :].view(C, H_)
    return torch.tanh(X @ W1.T) @ W2.T


def _seq_out(flat: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """A tiny sequence model: (B, T, P) -> logits (B, T, C), tokens mixed by a causal mean."""
    W1 = flat[: H_ * P].view(H_, P)
    W2 = flat[H_ * P :].view(C, H_)
    h = torch.tanh(X @ W1.T)  # (B, T, H)
    T = X.shape[1]
    mix = (
        torch.tril(torch.ones(T, T, dtype=X.dtype)) / torch.arange(1, T + 1, dtype=X.dtype)[:, None]
    )
    return (mix @ h) @ W2.T


def _dense_ggn(out_fn, flat, loss: OutputLoss, X, y) -> torch.Tensor:
    """Σ_i J_iᵀ H_i J_i / n with autodiff J and H_i (independent of the closed form)."""
    n = X.shape[0]
    d = flat.numel()
    G = torch.zeros(d, d, dtype=DT)
    for i in range(n):
        xi, yi = X[i : i + 1], y[i : i + 1]
        J = jacrev(lambda f, xi=xi: out_fn(f, xi))(flat).reshape(-1, d)
        o = out_fn(flat, xi)
        Hout = hessian(lambda z, o=o, yi=yi: loss.per_sample(z.view_as(o), yi).sum())(o.reshape(-1))
        G += J.T @ Hout @ J
    return G / n


def _problem(kind: str):
    g = _g(0)
    d = H_ * P + C * H_
    flat = torch.randn(d, generator=g, dtype=DT) * 0.7
    if kind == "seq":
        X = torch.randn(N, 4, P, generator=g, dtype=DT)
        y = torch.randint(0, C, (N, 4), generator=g)
        y[0, 1] = -100  # an ignored token
        y[3, :2] = -100
        return _seq_out, flat, OutputLoss("cross_entropy"), X, y
    X = torch.randn(N, P, generator=g, dtype=DT)
    if kind == "mse":
        return _mlp_out, flat, OutputLoss("mse"), X, torch.randn(N, C, generator=g, dtype=DT)
    return _mlp_out, flat, OutputLoss("cross_entropy"), X, torch.randint(0, C, (N,), generator=g)


def _ggn(kind: str, mode: str = "rev-rev", chunks: int = 2, keep: bool = True):
    out_fn, flat, loss, X, y = _problem(kind)
    parts = torch.arange(N).chunk(chunks)
    return (
        GaussNewton(
            [(lambda f, i=i: out_fn(f, X[i])) for i in parts],
            [y[i] for i in parts],
            loss,
            flat,
            N,
            mode,
            keep,
        ),
        _dense_ggn(out_fn, flat, loss, X, y),
    )


@pytest.mark.parametrize("kind", ["ce", "mse", "seq"])
@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_ggn_products_match_the_jacrev_oracle(kind, mode):
    op, G = _ggn(kind, mode)
    V = torch.randn(4, op.dim, generator=_g(1), dtype=DT)
    torch.testing.assert_close(op.mvp(V), V @ G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.mvp(V[:1]), V[:1] @ G, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(op.dense(), G, rtol=1e-10, atol=1e-12)
    # positive semi-definite (convex output losses)
    assert float(torch.linalg.eigvalsh(G).min()) > -1e-12


def test_ggn_not_kept_equals_kept():
    kept, _ = _ggn("ce", keep=True)
    rebuilt, _ = _ggn("ce", keep=False)
    V = torch.randn(3, kept.dim, generator=_g(2), dtype=DT)
    torch.testing.assert_close(rebuilt.mvp(V), kept.mvp(V), rtol=1e-12, atol=1e-14)


def test_output_loss_reproduces_torch_losses():
    _, flat, loss, X, y = _problem("seq")
    out = _seq_out(flat, X)
    for i in range(N):
        valid = y[i] != -100
        ref = F.cross_entropy(out[i][valid], y[i][valid])
        torch.testing.assert_close(loss.per_sample(out[i : i + 1], y[i : i + 1])[0], ref)
    z = torch.randn(5, C, dtype=DT)
    t = torch.randn(5, C, dtype=DT)
    torch.testing.assert_close(
        OutputLoss("mse").per_sample(z, t), F.mse_loss(z, t, reduction="none").mean(1)
    )


def test_linear_model_exact_hessian_equals_ggn():
    g = _g(3)
    X = torch.randn(N, P, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    flat = torch.randn(C * P, generator=g, dtype=DT)

    def out(f, Xb):
        return Xb @ f.view(C, P).T

    exact = ExactHessian([lambda f: F.cross_entropy(out(f, X), y, reduction="sum")], flat, N)
    ggn = GaussNewton([lambda f: out(f, X)], [y], OutputLoss(), flat, N)
    ref = hessian(lambda f: F.cross_entropy(out(f, X), y))(flat)
    torch.testing.assert_close(exact.dense(), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ggn.dense(), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver", ["dense", "cg", "arnoldi"])
def test_solvers_on_the_ggn_match_a_dense_solve(solver):
    op, G = _ggn("ce")
    lam = 0.1
    V = torch.randn(3, op.dim, generator=_g(4), dtype=DT)
    if solver == "arnoldi":  # G has rank N (C - 1) < d: Arnoldi drops its null space
        V = V @ G
    ref = torch.linalg.solve(G + lam * torch.eye(op.dim, dtype=DT), V.T).T
    s = {
        "dense": DenseSolver(lam),
        "cg": CGSolver(max_iter=200, tol=1e-13, regularization=lam),
        "arnoldi": ArnoldiSolver(proj_dim=op.dim, max_iter=op.dim, tol=1e-14, regularization=lam),
    }[solver]
    s.prepare(op)
    torch.testing.assert_close(s.solve(V), ref, rtol=1e-7, atol=1e-9)


def test_empirical_fisher_products_and_cheap_inverse():
    G = torch.randn(6, 9, generator=_g(5), dtype=DT)
    F_ = G.T @ G / 6
    op = EmpiricalFisher(G)
    V = torch.randn(2, 9, generator=_g(6), dtype=DT)
    torch.testing.assert_close(op.mvp(V), V @ F_)
    ref = torch.linalg.solve(F_ + 0.3 * torch.eye(9, dtype=DT), V.T).T
    torch.testing.assert_close(op.inverse_mvp(V, 0.3), ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(DenseInverse(op.dense(), 0.3)(V), ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ConfigError, match="damping > 0"):
        op.inverse_mvp(V, 0.0)


def test_dense_refuses_over_budget():
    op, _ = _ggn("ce")
    need = op.dim * op.dim * 8
    with pytest.raises(MemoryLimitError, match="layer_name"):
        op.dense(MemoryPlanner(torch.device("cpu"), need - 1))
    with pytest.raises(MemoryLimitError, match="max_dense_bytes"):
        op.dense(max_bytes=need - 1)
    op.dense(MemoryPlanner(torch.device("cpu"), need))


def test_output_loss_declaration():
    def loss_func(params, batch):
        return params

    assert resolve_output_loss("mse").kind == "mse"
    loss_func.ggn_output = OutputLoss("cross_entropy", target_index=2)  # type: ignore[attr-defined]
    assert resolve_output_loss(None, loss_func).target_index == 2
    with pytest.raises(ConfigError, match="ggn_output"):
        resolve_output_loss(None, lambda p, b: p)
    with pytest.raises(ConfigError, match="kind"):
        OutputLoss("hinge")


def test_arnoldi_residual_inverts_the_truncation_plus_damping():
    op, G = _ggn("mse")
    r, lam = 6, 0.2
    s = ArnoldiSolver(proj_dim=r, max_iter=op.dim, tol=1e-14, regularization=lam, residual=True)
    s.prepare(op)
    w, U = torch.linalg.eigh(G)
    top = w.abs().argsort(descending=True)[:r]
    G_r = (U[:, top] * w[top]) @ U[:, top].T  # the rank-r truncation (oracle: eigh)
    V = torch.randn(3, op.dim, generator=_g(7), dtype=DT)
    ref = torch.linalg.solve(G_r + lam * torch.eye(op.dim, dtype=DT), V.T).T
    torch.testing.assert_close(s.solve(V), ref, rtol=1e-7, atol=1e-9)
    with pytest.raises(ConfigError, match="regularization > 0"):
        s.basis.inverse_apply(V, 0.0, residual=True)
