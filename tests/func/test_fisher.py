"""Oracle tests of tdabench.func.fisher against per-sample autograd loops and dense solves."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdabench.errors import ConfigError, MemoryLimitError, NonFiniteError, ShapeError
from tdabench.func.fisher import (
    fvp,
    fvp_at_x,
    ifvp_at_x_cg,
    ifvp_at_x_explicit,
    ifvp_cg,
    ifvp_explicit,
    per_sample_grad_matrix,
)

DT = torch.float64
N, P, C = 30, 3, 2  # d = 6


def loss(W, X, y):
    """Mean cross-entropy over the batch; W is (C, P)."""
    return F.cross_entropy(X @ W.T, y)


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, P, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    W = torch.randn(C, P, generator=g, dtype=DT)
    V = torch.randn(4, C * P, generator=g, dtype=DT)
    # Oracle: per-sample gradients by a plain autograd loop, F = (1/n) Σ g gᵀ.
    rows = []
    for i in range(N):
        w = W.clone().requires_grad_(True)
        (gi,) = torch.autograd.grad(loss(w, X[i : i + 1], y[i : i + 1]), w)
        rows.append(gi.reshape(-1))
    G = torch.stack(rows)
    Fm = sum(torch.outer(r, r) for r in rows) / N
    return W, X, y, V, G, Fm


def test_per_sample_grad_matrix(problem):
    W, X, y, _, G, _ = problem
    torch.testing.assert_close(per_sample_grad_matrix(loss, (W, X, y)), G, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(
        per_sample_grad_matrix(loss, (W, X, y), chunk_size=7), G, rtol=1e-12, atol=1e-14
    )


@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_fvp_matches_manual_outer_products(problem, lam):
    W, X, y, V, _, Fm = problem
    A = Fm + lam * torch.eye(C * P, dtype=DT)
    out = fvp(loss, regularization=lam)((W, X, y), V)
    torch.testing.assert_close(out, V @ A, rtol=1e-10, atol=1e-12)
    single = fvp_at_x(loss, (W, X, y), regularization=lam)(V[1])
    assert single.shape == (C * P,)
    torch.testing.assert_close(single, A @ V[1], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [1e-3, 0.1])
def test_ifvp_explicit_matches_solve(problem, lam):
    W, X, y, V, _, Fm = problem
    ref = torch.linalg.solve(Fm + lam * torch.eye(C * P, dtype=DT), V.T).T
    out = ifvp_explicit(loss, regularization=lam)((W, X, y), V)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    at = ifvp_at_x_explicit(loss, W, X, y, regularization=lam)
    torch.testing.assert_close(at(V), out, rtol=0, atol=0)


def test_ifvp_cg_matches_explicit_and_honours_tol(problem):
    W, X, y, V, _, Fm = problem
    lam = 0.05
    ref = ifvp_at_x_explicit(loss, W, X, y, regularization=lam)(V)
    out = ifvp_cg(loss, max_iter=100, tol=1e-12, regularization=lam)((W, X, y), V)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    at = ifvp_at_x_cg(loss, W, X, y, max_iter=100, tol=1e-12, regularization=lam)
    torch.testing.assert_close(at(V), out, rtol=0, atol=0)
    loose = ifvp_at_x_cg(loss, W, X, y, max_iter=100, tol=0.3, regularization=lam)(V)
    A = Fm + lam * torch.eye(C * P, dtype=DT)
    res = ((loose @ A - V).norm(dim=1) / V.norm(dim=1)).max().item()
    assert 1e-6 < res <= 0.3


def test_fisher_of_argnums_not_first(problem):
    W, X, y, V, _, Fm = problem
    out = fvp(lambda X_, W_, y_: loss(W_, X_, y_), argnums=1)((X, W, y), V)
    torch.testing.assert_close(out, V @ Fm, rtol=1e-10, atol=1e-12)


def test_errors(problem):
    W, X, y, V, _, _ = problem
    # n = 3 < d = 6: F is singular without regularization.
    with pytest.raises(NonFiniteError, match="regularization"):
        ifvp_at_x_explicit(loss, W, X[:3], y[:3])
    with pytest.raises(MemoryLimitError):
        ifvp_at_x_explicit(loss, W, X, y, max_dense_bytes=10)
    with pytest.raises(ShapeError, match="tuple"):
        ifvp_explicit(loss)(W, V)
    with pytest.raises(ShapeError):
        fvp(loss)((W, X, y), torch.zeros(4, 5, dtype=DT))
    with pytest.raises(ShapeError, match="leading sample"):
        fvp(loss)((W, X, y[:4]), V)
    with pytest.raises(ConfigError, match="data"):
        fvp(lambda w: (w * w).sum())((W,), V)
    with pytest.raises(ConfigError):
        ifvp_cg(loss, regularization=-1.0)


def test_nested_data_argument_as_dattri_passes_it():
    """x = (θ, (inputs, labels)) (dattri's form) gives the same per-sample gradients as
    x = (θ, inputs, labels)."""
    from tdabench.func.fisher import per_sample_grad_matrix

    g = torch.Generator().manual_seed(0)
    X = torch.randn(9, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (9,), generator=g)
    w = torch.randn(6, generator=g, dtype=torch.float64)

    def flat_args(w, X, y):
        return torch.nn.functional.cross_entropy(X @ w.reshape(3, 2), y)

    def nested(w, data):
        return flat_args(w, data[0], data[1])

    a = per_sample_grad_matrix(flat_args, (w, X, y), chunk_size=4)
    b = per_sample_grad_matrix(nested, (w, (X, y)), chunk_size=4)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert a.shape == (9, 6)
