"""Oracle tests of tdabench.func.hessian: dense solves, finite differences, torch.func.hessian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdabench.errors import ConfigError, MemoryLimitError, NonFiniteError, ShapeError
from tdabench.func.hessian import (
    hvp,
    hvp_at_x,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
)

DT = torch.float64
N, P, C = 40, 4, 3  # samples, features, classes -> d = 12
# Per-entry L2 strengths: make the Hessian positive definite with distinct eigenvalues
# (plain L2 would leave the softmax's P-dimensional shift direction as a repeated eigenvalue,
# which a single-start Krylov method such as Arnoldi cannot resolve).
ALPHA = 0.05 * (1.0 + torch.arange(C * P, dtype=torch.float64).reshape(C, P) / (C * P))


def loss(W: torch.Tensor, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean multinomial logistic loss + weighted L2; W is (C, P)."""
    return F.cross_entropy(X @ W.T, y) + 0.5 * (ALPHA * W * W).sum()


@pytest.fixture(scope="module")
def problem():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, P, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    W = 0.5 * torch.randn(C, P, generator=g, dtype=DT)
    V = torch.randn(5, C * P, generator=g, dtype=DT)
    H = torch.func.hessian(lambda w: loss(w.view(C, P), X, y))(W.reshape(-1))
    return W, X, y, V, H


def solve(H, V, lam=0.0):
    return torch.linalg.solve(H + lam * torch.eye(H.shape[0], dtype=H.dtype), V.T).T


def test_issue_example_runs_verbatim():
    from tdabench.func.hessian import ihvp_at_x_cg, ihvp_cg

    def f(x, param):
        return torch.sin(x / param).sum()

    x = torch.randn(2)
    param = torch.randn(1)
    v = torch.randn(5, 2)
    ihvp_func = ihvp_cg(f, argnums=0, max_iter=2)
    ihvp_result_1 = ihvp_func((x, param), v)
    ihvp_at_x_func = ihvp_at_x_cg(f, x, param, argnums=0, max_iter=2)
    ihvp_result_2 = ihvp_at_x_func(v)
    assert torch.allclose(ihvp_result_1, ihvp_result_2)
    assert ihvp_result_1.shape == (5, 2)


def test_issue_example_values_float64():
    # H = diag(-sin(x/p) / p^2): CG on a 2-d diagonal system is exact in 2 steps.
    x = torch.tensor([0.3, -1.1], dtype=DT)
    p = torch.tensor([0.7], dtype=DT)
    v = torch.randn(5, 2, dtype=DT, generator=torch.Generator().manual_seed(1))
    h = -torch.sin(x / p) / p**2
    out = ihvp_cg(lambda a, b: torch.sin(a / b).sum(), max_iter=2, tol=0.0)((x, p), v)
    torch.testing.assert_close(out, v / h, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_hvp_matches_dense_hessian_and_finite_differences(problem, mode):
    W, X, y, V, H = problem
    out = hvp(loss, mode=mode)((W, X, y), V)
    torch.testing.assert_close(out, V @ H, rtol=1e-10, atol=1e-12)
    # Central finite differences of the gradient: (g(θ + εv) - g(θ - εv)) / 2ε.
    gfun = torch.func.grad(lambda w: loss(w.view(C, P), X, y))
    eps = 1e-5
    w0 = W.reshape(-1)
    fd = torch.stack([(gfun(w0 + eps * v) - gfun(w0 - eps * v)) / (2 * eps) for v in V])
    torch.testing.assert_close(out, fd, rtol=1e-6, atol=1e-8)


def test_hvp_regularization_single_vector_and_at_x(problem):
    W, X, y, V, H = problem
    out = hvp(loss, regularization=0.3)((W, X, y), V[0])
    assert out.shape == (C * P,)
    torch.testing.assert_close(
        out, (H + 0.3 * torch.eye(C * P, dtype=DT)) @ V[0], rtol=1e-10, atol=1e-12
    )
    f_at = hvp_at_x(loss, (W, X, y), regularization=0.3)
    torch.testing.assert_close(f_at(V[0]), out, rtol=0, atol=0)
    torch.testing.assert_close(f_at(V), hvp(loss, regularization=0.3)((W, X, y), V), rtol=0, atol=0)


def test_hvp_other_argnums(problem):
    W, X, y, V, H = problem

    def loss_w_last(X_, y_, W_):
        return loss(W_, X_, y_)

    out = hvp(loss_w_last, argnums=2, mode="rev-fwd")((X, y, W), V)
    torch.testing.assert_close(out, V @ H, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("lam", [0.0, 0.2])
def test_explicit_matches_solve(problem, lam):
    W, X, y, V, H = problem
    ref = solve(H, V, lam)
    out = ihvp_explicit(loss, regularization=lam)((W, X, y), V)
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
    at = ihvp_at_x_explicit(loss, W, X, y, regularization=lam)
    torch.testing.assert_close(at(V), out, rtol=0, atol=0)
    torch.testing.assert_close(at(V[2]), ref[2], rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("factory", ["explicit", "arnoldi", "rev-rev-hvp"])
def test_at_x_forms_precompute_once(problem, factory):
    W, X, y, V, _ = problem
    calls = []

    def counted(W_, X_, y_):
        calls.append(1)
        return loss(W_, X_, y_)

    if factory == "explicit":
        f = ihvp_at_x_explicit(counted, W, X, y)
    elif factory == "arnoldi":
        f = ihvp_at_x_arnoldi(counted, W, X, y, max_iter=6, proj_dim=6)
    else:
        f = hvp_at_x(counted, (W, X, y))
    before = len(calls)
    assert before >= 1
    first = f(V)
    torch.testing.assert_close(f(V), first, rtol=0, atol=0)
    assert len(calls) == before  # no new evaluation of func: nothing recomputed per call


def test_explicit_indefinite_uses_lu_and_singular_raises():
    a = torch.tensor([2.0, -1.0, 0.5], dtype=DT)

    def quad(w, a_):
        return 0.5 * (a_ * w * w).sum()

    v = torch.ones(2, 3, dtype=DT)
    out = ihvp_explicit(quad)((torch.zeros(3, dtype=DT), a), v)
    torch.testing.assert_close(out, v / a, rtol=1e-12, atol=1e-12)
    with pytest.raises(NonFiniteError, match="regularization"):
        ihvp_at_x_explicit(quad, torch.zeros(3, dtype=DT), torch.tensor([1.0, 0.0, 1.0], dtype=DT))


def test_explicit_refuses_beyond_memory_limit(problem):
    W, X, y, V, _ = problem
    with pytest.raises(MemoryLimitError, match="max_dense_bytes"):
        ihvp_at_x_explicit(loss, W, X, y, max_dense_bytes=100)
    with pytest.raises(MemoryLimitError):
        ihvp_explicit(loss, max_dense_bytes=100)((W, X, y), V)


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_cg_converges_to_solve(problem, mode, lam):
    W, X, y, V, H = problem
    ref = solve(H, V, lam)
    out = ihvp_cg(loss, max_iter=100, tol=1e-12, mode=mode, regularization=lam)((W, X, y), V)
    torch.testing.assert_close(out, ref, rtol=1e-8, atol=1e-10)
    at = ihvp_at_x_cg(loss, W, X, y, max_iter=100, tol=1e-12, mode=mode, regularization=lam)
    torch.testing.assert_close(at(V), out, rtol=0, atol=0)


def test_cg_tol_and_max_iter_change_the_result(problem):
    W, X, y, V, H = problem

    def rel_res(Y):
        return ((Y @ H - V).norm(dim=1) / V.norm(dim=1)).max().item()

    exact = ihvp_at_x_cg(loss, W, X, y, max_iter=100, tol=1e-12)(V)
    loose = ihvp_at_x_cg(loss, W, X, y, max_iter=100, tol=0.2)(V)
    assert rel_res(exact) < 1e-10
    assert 1e-6 < rel_res(loose) <= 0.2  # stopped early, but honouring tol
    assert not torch.allclose(loose, exact, rtol=1e-4)
    short = ihvp_at_x_cg(loss, W, X, y, max_iter=2, tol=0.0)(V)
    assert rel_res(short) > 1e-3
    assert not torch.allclose(short, exact, rtol=1e-4)


def test_rev_fwd_equals_rev_rev(problem):
    W, X, y, V, _ = problem
    a = hvp(loss, mode="rev-rev")((W, X, y), V)
    b = hvp(loss, mode="rev-fwd")((W, X, y), V)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("mode", ["rev-fwd", "rev-rev"])
@pytest.mark.parametrize("lam", [0.0, 0.1])
def test_arnoldi_full_rank_matches_solve(problem, mode, lam):
    W, X, y, V, H = problem
    d = C * P
    ref = solve(H, V, lam)
    out = ihvp_arnoldi(loss, max_iter=d, proj_dim=d, mode=mode, regularization=lam, tol=1e-12)(
        (W, X, y), V
    )
    torch.testing.assert_close(out, ref, rtol=1e-7, atol=1e-9)
    at = ihvp_at_x_arnoldi(
        loss, W, X, y, max_iter=d, proj_dim=d, mode=mode, regularization=lam, tol=1e-12
    )
    torch.testing.assert_close(at(V), out, rtol=0, atol=0)


def test_arnoldi_low_rank_is_projection_onto_top_eigenspace(problem):
    W, X, y, V, H = problem
    evals, evecs = torch.linalg.eigh(H)
    U, lam = evecs[:, -3:], evals[-3:]
    ref = (V @ U / lam) @ U.T
    out = ihvp_at_x_arnoldi(loss, W, X, y, max_iter=C * P, proj_dim=3, tol=1e-12)(V)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-9)


def test_arnoldi_defaults_never_nan():
    # Rank-one Hessian (a aᵀ) and an exactly zero Hessian, float32, default arguments.
    a = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.5])
    v = torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
    out = ihvp_arnoldi(lambda w: 0.5 * (a @ w) ** 2)((torch.zeros(5),), v)
    assert torch.isfinite(out).all()
    # On the eigenvector direction it inverts exactly: (a aᵀ)^+ a = a / |a|^2.
    torch.testing.assert_close(
        ihvp_at_x_arnoldi(lambda w: 0.5 * (a @ w) ** 2, torch.zeros(5))(a),
        a / (a @ a),
        rtol=1e-4,
        atol=1e-5,
    )
    zero = ihvp_arnoldi(lambda w: (a * w).sum())((torch.zeros(5),), v)
    assert torch.isfinite(zero).all()


def _hessian_eigs(H):
    e = torch.linalg.eigvalsh(H)
    return e.min().item(), e.max().item()


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
def test_lissa_full_batch_is_deterministic_solve(problem, mode):
    W, X, y, V, H = problem
    lo, hi = _hessian_eigs(H)
    scaling = 1.2 * hi
    depth = int(18 / (lo / scaling)) + 1  # (1 - lo/s)^depth < 1e-8
    out = ihvp_lissa(loss, batch_size=N, recursion_depth=depth, scaling=scaling, mode=mode)(
        (W, X, y), V
    )
    assert out.dtype == DT
    torch.testing.assert_close(out, solve(H, V), rtol=1e-6, atol=1e-8)


def test_lissa_damping_fixed_point(problem):
    W, X, y, V, H = problem
    _, hi = _hessian_eigs(H)
    scaling, damping = 1.2 * hi, 0.05
    out = ihvp_at_x_lissa(
        loss, W, X, y, batch_size=N, recursion_depth=400, scaling=scaling, damping=damping
    )(V)
    torch.testing.assert_close(out, solve(H, V, damping * scaling), rtol=1e-6, atol=1e-8)


def test_lissa_stochastic_close_and_seeded(problem):
    W, X, y, V, H = problem
    _, hi = _hessian_eigs(H)
    # Bias (1 - lo/scaling)^200 < 1e-5; the rest is sampling noise of 20-of-40 mini-batches.
    out = ihvp_at_x_lissa(
        loss, W, X, y, batch_size=20, recursion_depth=200, scaling=2.0 * hi, seed=3
    )(V)
    ref = solve(H, V)
    rel = ((out - ref).norm(dim=1) / ref.norm(dim=1)).max().item()
    assert rel < 0.15, rel
    assert rel > 1e-6  # really stochastic
    kw = dict(batch_size=5, recursion_depth=10, scaling=2.0 * hi)
    f = ihvp_at_x_lissa(loss, W, X, y, seed=3, **kw)
    first = f(V)
    torch.testing.assert_close(f(V), first, rtol=0, atol=0)  # same seed, same numbers
    torch.testing.assert_close(ihvp_lissa(loss, seed=3, **kw)((W, X, y), V), first, rtol=0, atol=0)
    other = ihvp_at_x_lissa(loss, W, X, y, seed=4, **kw)(V)
    assert not torch.allclose(other, first)


def test_lissa_argnums_and_collate_fn(problem):
    W, X, y, V, H = problem
    lo, hi = _hessian_eigs(H)
    kw = dict(batch_size=N, recursion_depth=int(18 / (lo / (1.2 * hi))) + 1, scaling=1.2 * hi)
    # Data first, variable last.
    out = ihvp_at_x_lissa(lambda X_, y_, W_: loss(W_, X_, y_), X, y, W, argnums=2, **kw)(V)
    torch.testing.assert_close(out, solve(H, V), rtol=1e-6, atol=1e-8)
    # One packed data tensor, unpacked by collate_fn into (X, y).
    Z = torch.cat([X, y[:, None].to(DT)], dim=1)

    def collate(sampled):
        (z,) = sampled
        return z[:, :P], z[:, P].long()

    out2 = ihvp_lissa(loss, collate_fn=collate, **kw)((W, Z), V)
    torch.testing.assert_close(out2, solve(H, V), rtol=1e-6, atol=1e-8)


def test_lissa_float32_and_without_data():
    a = torch.tensor([1.0, 2.0, 4.0])
    out = ihvp_at_x_lissa(
        lambda w: 0.5 * (a * w * w).sum(), torch.zeros(3), recursion_depth=200, scaling=5.0
    )(torch.ones(3))
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, 1 / a, rtol=1e-5, atol=1e-6)


def test_errors(problem):
    W, X, y, V, _ = problem
    for factory in (hvp, ihvp_cg, ihvp_arnoldi, ihvp_lissa):
        with pytest.raises(ConfigError, match="rev-rev"):
            factory(loss, mode="fwd-fwd")
    with pytest.raises(ConfigError):
        ihvp_at_x_cg(loss, W, X, y, mode="bogus")
    with pytest.raises(ShapeError, match=r"\(k, 12\)"):
        hvp(loss)((W, X, y), torch.zeros(5, 11, dtype=DT))
    with pytest.raises(ShapeError):
        ihvp_at_x_explicit(loss, W, X, y)(torch.zeros(2, 3, 12, dtype=DT))
    with pytest.raises(ShapeError, match="tuple"):
        ihvp_cg(loss)(W, V)
    with pytest.raises(ShapeError, match="tuple"):
        ihvp_explicit(loss)(W, V)
    with pytest.raises(ShapeError, match="scalar"):
        hvp(lambda w: w * w)((torch.ones(3, dtype=DT),), torch.ones(3, dtype=DT))
    with pytest.raises(ConfigError, match="argnums"):
        hvp(loss, argnums=5)((W, X, y), V)
    with pytest.raises(ConfigError, match="floating"):
        hvp(loss, argnums=2)((W, X, y), V)
    with pytest.raises(ConfigError, match="batch_size"):
        ihvp_at_x_lissa(loss, W, X, y, batch_size=N + 1)
    with pytest.raises(ShapeError, match="leading sample"):
        ihvp_at_x_lissa(loss, W, X, y[:5])
    with pytest.raises(ConfigError):
        ihvp_cg(loss, tol=-1.0)
    with pytest.raises(ConfigError):
        hvp(loss, regularization=-1.0)


def test_lissa_accepts_dattris_in_dims():
    """dattri's ``in_dims`` (data along dim 0, None for θ) gives the same IHVP; others are refused."""
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(40, 2, generator=g, dtype=DT)
    ys = torch.randn(40, generator=g, dtype=DT)
    theta = torch.randn(2, generator=g, dtype=DT)

    def mse(x, y, w):
        return ((x @ w - y) ** 2).mean()

    v = torch.randn(1, 2, generator=g, dtype=DT)
    kw = dict(argnums=2, batch_size=40, recursion_depth=300, scaling=20.0)
    plain = ihvp_at_x_lissa(mse, xs, ys, theta, **kw)(v)
    torch.testing.assert_close(
        ihvp_at_x_lissa(mse, xs, ys, theta, in_dims=(0, 0, None), **kw)(v), plain
    )
    torch.testing.assert_close(
        ihvp_lissa(mse, **kw)((xs, ys, theta), v, in_dims=(0, 0, None)), plain
    )
    exact = torch.linalg.solve(2 * xs.T @ xs / 40, v[0])
    torch.testing.assert_close(plain[0], exact, rtol=1e-6, atol=1e-8)
    with pytest.raises(ConfigError, match="in_dims"):
        ihvp_at_x_lissa(mse, xs, ys, theta, in_dims=(0, None, None), **kw)
