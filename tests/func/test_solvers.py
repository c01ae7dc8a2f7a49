"""Oracle tests of tdabench.func.solvers: dense solves and eigendecompositions of small float64
matrices, and the one argument check shared by the solvers and the dattri-shaped functions."""

from __future__ import annotations

import pytest
import torch

from tdabench.errors import ConfigError, MemoryLimitError
from tdabench.func.fisher import fvp, ifvp_cg, ifvp_explicit, per_sample_grad_matrix
from tdabench.func.hessian import hvp, ihvp_arnoldi, ihvp_cg, ihvp_explicit, ihvp_lissa
from tdabench.func.solvers import (
    ArnoldiSolver,
    CGSolver,
    DenseSolver,
    LiSSASolver,
    arnoldi_basis,
    check_dense_size,
    check_options,
    conjugate_gradient,
    lissa_recursion,
)

DT = torch.float64
D = 8


@pytest.fixture(scope="module")
def spd():
    g = torch.Generator().manual_seed(1)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=DT))
    A = Q @ torch.diag(torch.linspace(0.5, 4.0, D, dtype=DT)) @ Q.T
    B = torch.randn(3, D, generator=g, dtype=DT)
    return A, B


def solve(A, B, lam=0.0):
    return torch.linalg.solve(A + lam * torch.eye(A.shape[0], dtype=A.dtype), B.T).T


@pytest.mark.parametrize(
    "name, bad, good",
    [
        ("mode", "fwd-fwd", "rev-fwd"),
        ("regularization", -1e-3, 0.0),
        ("tol", -1.0, 0.0),
        ("max_iter", 0, 1),
        ("proj_dim", 0, 3),
        ("norm_constant", 0.0, 2.0),
        ("batch_size", 1.5, 4),
        ("num_repeat", 0, 2),
        ("recursion_depth", 0, 10),
        ("damping", 1.0, 0.5),
        ("scaling", 0.0, 1e-3),
        ("chunk_size", 0, 7),
    ],
)
def test_check_options_refuses_bad_values_naming_them(name, bad, good):
    check_options({name: good})
    with pytest.raises(ConfigError, match=name):
        check_options({name: bad})


def test_check_options_ignores_names_without_rule():
    check_options({"seed": -5, "collate_fn": None, "residual": True})


@pytest.mark.parametrize(
    "make",
    [
        lambda: CGSolver(max_iter=0),
        lambda: CGSolver(tol=-1.0),
        lambda: DenseSolver(regularization=-1.0),
        lambda: LiSSASolver(damping=1.5),
        lambda: LiSSASolver(scaling=0.0),
        lambda: ArnoldiSolver(proj_dim=0),
        lambda: ArnoldiSolver(norm_constant=-1.0),
        lambda: hvp(torch.sum, mode="bogus"),
        lambda: ihvp_explicit(torch.sum, regularization=-1.0),
        lambda: ihvp_cg(torch.sum, max_iter=0),
        lambda: ihvp_arnoldi(torch.sum, proj_dim=0),
        lambda: ihvp_lissa(torch.sum, batch_size=0),
        lambda: fvp(torch.sum, regularization=-1.0),
        lambda: ifvp_explicit(torch.sum, regularization=-1.0),
        lambda: ifvp_cg(torch.sum, tol=-1.0),
    ],
)
def test_settings_are_checked_before_any_point_is_seen(make):
    with pytest.raises(ConfigError):
        make()


def test_solver_objects_keep_positional_order():
    assert (CGSolver(3, 1e-4, 0.5).max_iter, CGSolver(3, 1e-4, 0.5).regularization) == (3, 0.5)
    lissa = LiSSASolver(2, 3, 40, 0.1, 9.0, 7)
    assert (lissa.batch_size, lissa.num_repeat, lissa.recursion_depth) == (2, 3, 40)
    assert (lissa.damping, lissa.scaling, lissa.seed) == (0.1, 9.0, 7)
    arnoldi = ArnoldiSolver(4, 5, 1e-6, 2.0, 3, 0.25, True)
    assert (arnoldi.proj_dim, arnoldi.max_iter, arnoldi.norm_constant) == (4, 5, 2.0)
    assert (arnoldi.seed, arnoldi.regularization, arnoldi.residual) == (3, 0.25, True)
    assert DenseSolver(0.5, 1024).max_dense_bytes == 1024


@pytest.mark.parametrize("lam", [0.0, 0.3])
def test_conjugate_gradient_matches_solve(spd, lam):
    A, B = spd
    X = conjugate_gradient(lambda V: V @ A, B, max_iter=D, tol=0.0, regularization=lam)
    torch.testing.assert_close(X, solve(A, B, lam), rtol=1e-9, atol=1e-10)
    X0 = conjugate_gradient(lambda V: V @ A, B, max_iter=D, tol=0.0, x0=solve(A, B) + 1e-3)
    torch.testing.assert_close(X0, solve(A, B), rtol=1e-9, atol=1e-10)


def test_conjugate_gradient_stops_rows_independently(spd):
    """A zero right-hand side stays exactly zero; a row alone gives what it gives in a batch."""
    A, B = spd
    batch = torch.cat([B, torch.zeros(1, D, dtype=DT)])
    X = conjugate_gradient(lambda V: V @ A, batch, max_iter=3, tol=1e-12)
    assert torch.equal(X[-1], torch.zeros(D, dtype=DT))
    alone = conjugate_gradient(lambda V: V @ A, B[1:2], max_iter=3, tol=1e-12)
    torch.testing.assert_close(X[1:2], alone, rtol=1e-12, atol=1e-14)


def test_lissa_recursion_reaches_its_fixed_point(spd):
    A, B = spd
    damping, scaling = 0.05, 6.0
    X = lissa_recursion(lambda _t: lambda V: V @ A, B, 600, damping, scaling, num_repeat=2)
    torch.testing.assert_close(X, solve(A, B, damping * scaling), rtol=1e-9, atol=1e-10)


def test_arnoldi_basis_full_rank_is_the_eigendecomposition(spd):
    A, B = spd
    basis = arnoldi_basis(lambda V: V @ A, D, proj_dim=D, max_iter=D, dtype=DT, seed=4)
    evals = torch.linalg.eigvalsh(A)
    torch.testing.assert_close(basis.values.sort().values, evals, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(basis.inverse_apply(B, 0.2), solve(A, B, 0.2), rtol=1e-8, atol=1e-9)


def test_check_dense_size_limits(spd):
    check_dense_size(D, DT, max_bytes=D * D * 8)
    with pytest.raises(MemoryLimitError, match="Fisher matrix of 8"):
        check_dense_size(D, DT, max_bytes=D * D * 8 - 1, what="Fisher matrix")


def test_per_sample_grad_matrix_chunks_agree():
    g = torch.Generator().manual_seed(2)
    X, y = torch.randn(9, 3, generator=g, dtype=DT), torch.randn(9, generator=g, dtype=DT)
    w = torch.randn(3, generator=g, dtype=DT)

    def mse(w_, X_, y_):
        return ((X_ @ w_ - y_) ** 2).mean()

    G = per_sample_grad_matrix(mse, (w, X, y), chunk_size=4)
    torch.testing.assert_close(G, 2 * (X @ w - y)[:, None] * X, rtol=1e-12, atol=1e-13)
    with pytest.raises(ConfigError, match="chunk_size"):
        per_sample_grad_matrix(mse, (w, X, y), chunk_size=0)
