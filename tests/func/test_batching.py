"""Oracle tests of tdabench.func.batching (bmm of a broadcast matrix folded into one mm) and
of the code paths that use it (batched HVPs, dense_from_matvec), in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vjp, vmap

from tdabench.errors import ShapeError
from tdabench.func import batching
from tdabench.func.batching import fold_broadcast_bmm, folded_bmm
from tdabench.func.curvature import hvp_matvec as _batch_hvp
from tdabench.func.solvers import dense_from_matvec

DT = torch.float64


def _g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _layouts(k: int, n: int, m: int, p: int):
    """(a, b) pairs of bmm operands in the layouts vmap produces, one operand broadcast."""
    g = _g(1)
    A = torch.randn(n, m, generator=g, dtype=DT)
    Bs = torch.randn(m, p, generator=g, dtype=DT)
    b_contig = torch.randn(k, m, p, generator=g, dtype=DT)
    b_transposed = torch.randn(k, p, m, generator=g, dtype=DT).transpose(1, 2)  # bᵀ contiguous
    # rows of a wider (k, p*m + 3) matrix: bᵀ not contiguous (batch stride p*m + 3)
    b_padded = (
        torch.randn(k, p * m + 3, generator=g, dtype=DT)[:, : p * m].view(k, p, m).transpose(1, 2)
    )
    a_contig = torch.randn(k, n, m, generator=g, dtype=DT)
    a_transposed = torch.randn(k, m, n, generator=g, dtype=DT).transpose(1, 2)
    return [
        ("A broadcast, b contiguous", A.expand(k, n, m), b_contig),
        ("A broadcast, b transposed", A.expand(k, n, m), b_transposed),
        ("A broadcast, b padded rows", A.expand(k, n, m), b_padded),
        ("B broadcast, a contiguous", a_contig, Bs.expand(k, m, p)),
        ("B broadcast, a transposed", a_transposed, Bs.expand(k, m, p)),
    ]


@pytest.mark.parametrize("k,n,m,p", [(4, 7, 5, 3), (2, 1, 9, 1), (6, 11, 1, 4)])
def test_folded_bmm_matches_bmm(k, n, m, p):
    for name, a, b in _layouts(k, n, m, p):
        got = folded_bmm(a, b)
        assert got is not None, name
        assert got.shape == (k, n, p), name
        torch.testing.assert_close(got, torch.bmm(a, b), rtol=1e-13, atol=1e-13, msg=name)


def test_folded_bmm_declines_what_it_cannot_fold():
    g = _g(2)
    A = torch.randn(3, 4, generator=g, dtype=DT)
    B = torch.randn(4, 2, generator=g, dtype=DT)
    assert folded_bmm(A.expand(1, 3, 4), torch.randn(1, 4, 2, dtype=DT)) is None  # k = 1
    assert folded_bmm(A.expand(5, 3, 4), B.expand(5, 4, 2)) is None  # both broadcast
    assert folded_bmm(torch.randn(5, 3, 4, dtype=DT), torch.randn(5, 4, 2, dtype=DT)) is None
    assert folded_bmm(A, B) is None  # not batched


def test_mode_rewrites_only_bmm_and_keeps_values(monkeypatch):
    calls = []
    real = batching.folded_bmm

    def counting(a, b):
        out = real(a, b)
        calls.append(out is not None)
        return out

    monkeypatch.setattr(batching, "folded_bmm", counting)
    k, n, m, p = 5, 6, 4, 3
    for name, a, b in _layouts(k, n, m, p):
        calls.clear()
        with fold_broadcast_bmm():
            got = torch.bmm(a, b)
            other = a.sum() + b.sum()  # not a bmm: untouched
        assert calls == [True], name
        torch.testing.assert_close(got, torch.bmm(a, b), rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(other, a.sum() + b.sum())
    calls.clear()
    with fold_broadcast_bmm(batch=1):  # nothing to fold: the mode is not even entered
        torch.bmm(*_layouts(k, n, m, p)[0][1:])
    assert calls == []


# ---------------------------------------------------------------------------- HVPs
N, P, C = 30, 6, 4


@pytest.fixture(scope="module")
def lr():
    g = _g(3)
    X = torch.randn(N, P, generator=g, dtype=DT)
    y = torch.randint(0, C, (N,), generator=g)
    theta = 0.3 * torch.randn(C * P + C, generator=g, dtype=DT)

    def f(t: torch.Tensor) -> torch.Tensor:  # summed loss of a linear softmax model
        W, b = t[: C * P].view(C, P), t[C * P :]
        return F.cross_entropy(X @ W.T + b, y, reduction="sum")

    H = torch.func.hessian(f)(theta)
    return f, theta, H


@pytest.mark.parametrize("mode", ["rev-rev", "rev-fwd"])
@pytest.mark.parametrize("k", [1, 2, 7])
def test_batch_hvp_matches_dense_hessian(lr, mode, k):
    f, theta, H = lr
    V = torch.randn(k, theta.numel(), generator=_g(4), dtype=DT)
    torch.testing.assert_close(_batch_hvp(f, theta, mode)(V), V @ H, rtol=1e-10, atol=1e-12)


def test_batch_hvp_folds_the_broadcast_products(lr, monkeypatch):
    """The vmapped replay really goes through the fold (else this speed path is dead code)."""
    f, theta, _ = lr
    hits = []
    real = batching.folded_bmm
    monkeypatch.setattr(batching, "folded_bmm", lambda a, b: hits.append(1) or real(a, b))
    V = torch.randn(5, theta.numel(), generator=_g(5), dtype=DT)
    out = _batch_hvp(f, theta, "rev-rev")(V)
    assert hits
    _, vjp_fn = vjp(grad(f), theta)
    torch.testing.assert_close(out, vmap(vjp_fn)(V)[0], rtol=1e-12, atol=1e-12)


def test_dense_from_matvec_accumulates_into_out(lr):
    f, theta, H = lr
    d = theta.numel()
    mv = _batch_hvp(f, theta, "rev-rev")
    for chunk in (1, 5, d, d + 3):
        torch.testing.assert_close(
            dense_from_matvec(mv, d, DT, chunk=chunk), H, rtol=1e-10, atol=1e-12
        )
    out = torch.eye(d, dtype=DT)
    got = dense_from_matvec(mv, d, DT, chunk=4, out=out)
    assert got is out
    torch.testing.assert_close(out, H + torch.eye(d, dtype=DT), rtol=1e-10, atol=1e-12)
    with pytest.raises(ShapeError, match="out must have shape"):
        dense_from_matvec(mv, d, DT, out=torch.zeros(d, d + 1, dtype=DT))
