"""Empirical Fisher information: products and inverse products (IFVPs).

Calling convention (as in :mod:`tdabench.func.hessian`): ``x = (θ, *data)`` is the tuple
of ``func``'s positional arguments, ``θ = x[argnums]`` the variable (any shape, ``d =
θ.numel()`` entries once flattened) and every other argument a data tensor with the
same leading sample dimension ``n``. For each sample ``i`` the per-sample gradient

    ``g_i = ∇_θ func(θ, *data[i:i+1])``          (``func`` evaluated on a batch of ONE sample)

is computed with :func:`torch.func.vmap` over :func:`torch.func.grad`
(:func:`tdabench.func.utils.per_sample_grads`), and the empirical Fisher is

    ``F = (1/n) Σ_i g_i g_iᵀ = (1/n) Gᵀ G``        (``G`` the ``(n, d)`` matrix of rows ``g_i``),

regularised as ``F + λI``. Note the ``1/n``: ``F`` is the *mean* outer product, whatever
``func`` returns on a batch. Vectors ``v`` are ``(k, d)`` or ``(d,)``; results keep the
shape of ``v`` and the dtype/device of ``θ``.

Functions: :func:`fvp` / :func:`fvp_at_x` (``(F + λI) v`` without forming ``F``),
:func:`ifvp_explicit` / :func:`ifvp_at_x_explicit` (dense ``F``, factorised once),
:func:`ifvp_cg` / :func:`ifvp_at_x_cg` (conjugate gradient on ``fvp``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tdabench.errors import ConfigError
from tdabench.func.curvature import EmpiricalFisher
from tdabench.func.hessian import (
    _as_rows,
    _at_any_x,
    _check_argnums,
    _check_nonneg,
    _check_x_tuple,
    _detach,
    _num_samples,
    _out,
)
from tdabench.func.solvers import CGSolver, DenseInverse, check_dense_size
from tdabench.func.utils import per_sample_grads

__all__ = [
    "fvp",
    "fvp_at_x",
    "ifvp_at_x_cg",
    "ifvp_at_x_explicit",
    "ifvp_cg",
    "ifvp_explicit",
    "per_sample_grad_matrix",
]


def per_sample_grad_matrix(
    func: Callable[..., Tensor], x: Sequence[Any], argnums: int = 0, chunk_size: int = 256
) -> Tensor:
    """The ``(n, d)`` matrix ``G`` of per-sample gradients of ``func`` w.r.t. ``x[argnums]``.

    Row ``i`` is the gradient of ``func(θ, *[t[i:i+1] for t in data])`` (a batch of one),
    flattened like ``θ.reshape(-1)``. Samples are processed ``chunk_size`` at a time.
    """
    x = _check_x_tuple(x, "per_sample_grad_matrix")
    theta = _check_argnums(x, argnums)
    pos = argnums % len(x)
    xs = _detach(x)
    data = xs[:pos] + xs[pos + 1 :]
    if not data:
        raise ConfigError(
            "the empirical Fisher needs data arguments: x must be (θ, *data) with data tensors of a "
            "leading sample dimension; got x with only the variable"
        )
    leaves, rebuild = _data_leaves(data)  # dattri passes (θ, (inputs, labels)): nested data
    n = _num_samples(leaves)
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be >= 1, got {chunk_size}")
    shape = theta.shape

    def flat_func(flat: Tensor, batch: tuple[Tensor, ...]) -> Tensor:
        args = rebuild(batch)
        return func(*args[:pos], flat.reshape(shape), *args[pos:])

    flat0 = theta.detach().reshape(-1)
    rows = [
        per_sample_grads(flat_func, flat0, tuple(t[s : s + chunk_size] for t in leaves))
        for s in range(0, n, chunk_size)
    ]
    return torch.cat(rows, dim=0)


def _data_leaves(
    data: tuple[Any, ...],
) -> tuple[tuple[Any, ...], Callable[[Sequence[Any]], tuple[Any, ...]]]:
    """The data arguments as a flat tuple of leaves, and the function rebuilding the arguments
    from (sliced) leaves: an argument may be a tensor or a tuple/list of tensors."""
    sizes = [len(a) if isinstance(a, (tuple, list)) else 1 for a in data]
    leaves = tuple(x for a in data for x in (a if isinstance(a, (tuple, list)) else (a,)))

    def rebuild(flat: Sequence[Any]) -> tuple[Any, ...]:
        out, i = [], 0
        for a, k in zip(data, sizes, strict=True):
            out.append(type(a)(flat[i : i + k]) if isinstance(a, (tuple, list)) else flat[i])
            i += k
        return tuple(out)

    return leaves, rebuild


def fvp_at_x(
    func: Callable[..., Tensor], x: Sequence[Any], argnums: int = 0, regularization: float = 0.0
) -> Callable[[Tensor], Tensor]:
    """Fisher-vector products at ``x``: ``f(v) = (1/n) Gᵀ (G v) + λ v``.

    ``G`` (``(n, d)``) is computed once; ``F`` is never formed. ``v``: ``(k, d)`` or ``(d,)``.
    """
    _check_nonneg("regularization", regularization)
    fisher = EmpiricalFisher(per_sample_grad_matrix(func, x, argnums))
    G, d = fisher.G, fisher.dim

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, G)
        out = fisher.mvp(V)
        if regularization:
            out = out + regularization * V
        return _out(out, single)

    return f


def fvp(
    func: Callable[..., Tensor], argnums: int = 0, regularization: float = 0.0
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """``f(x, v) = (F(x) + λI) v``; see :func:`fvp_at_x`."""
    _check_nonneg("regularization", regularization)

    def f(x: Sequence[Any], v: Tensor) -> Tensor:
        return fvp_at_x(
            func, _check_x_tuple(x, "fvp"), argnums=argnums, regularization=regularization
        )(v)

    return f


def ifvp_at_x_explicit(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """Exact inverse-Fisher-vector products at ``x``: ``f(v) = (F + λI)^{-1} v``.

    ``F = (1/n) Gᵀ G`` is formed (refused above ``max_dense_bytes``, see
    :func:`tdabench.func.solvers.check_dense_size`) and factorised once. ``F`` has rank at
    most ``n``: with ``n < d`` it is singular and ``regularization > 0`` is required
    (otherwise ``NonFiniteError``). ``v``: ``(k, d)`` or ``(d,)``, result of the same shape.
    """
    _check_nonneg("regularization", regularization)
    x = tuple(x)
    theta = _check_argnums(x, argnums)
    check_dense_size(theta.numel(), theta.dtype, max_dense_bytes, what="Fisher matrix")
    fisher = EmpiricalFisher(per_sample_grad_matrix(func, x, argnums))
    G, d = fisher.G, fisher.dim
    inverse = DenseInverse(
        fisher.dense(max_bytes=max_dense_bytes), regularization, "Fisher matrix", in_place=True
    )

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, G)
        return _out(inverse(V), single)

    return f


def ifvp_explicit(
    func: Callable[..., Tensor],
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """``f(x, v) = (F(x) + λI)^{-1} v`` with ``x = (θ, *data)``; see :func:`ifvp_at_x_explicit`."""
    _check_nonneg("regularization", regularization)

    return _at_any_x(
        ifvp_at_x_explicit,
        func,
        "ifvp_explicit",
        argnums=argnums,
        regularization=regularization,
        max_dense_bytes=max_dense_bytes,
    )


def ifvp_at_x_cg(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
    """Inverse-Fisher-vector products at ``x`` by batched CG on :func:`fvp_at_x`.

    ``tol`` is relative per row (``||v - (F + λI) y|| <= tol ||v||``); ``max_iter`` bounds
    the iterations. ``v``: ``(k, d)`` or ``(d,)``, result of the same shape.
    """
    _check_nonneg("regularization", regularization)
    _check_nonneg("tol", tol)
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    theta = _check_argnums(tuple(x), argnums)
    solver = CGSolver(max_iter, tol, regularization)
    solver.prepare(EmpiricalFisher(per_sample_grad_matrix(func, tuple(x), argnums)))
    d = theta.numel()
    like = theta.detach().reshape(-1)

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, like)
        return _out(solver.solve(V.to(solver.op.dtype)), single)

    return f


def ifvp_cg(
    func: Callable[..., Tensor],
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    regularization: float = 0.0,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """``f(x, v)``: CG inverse-Fisher-vector products at any point; see :func:`ifvp_at_x_cg`."""
    _check_nonneg("regularization", regularization)

    return _at_any_x(
        ifvp_at_x_cg,
        func,
        "ifvp_cg",
        argnums=argnums,
        max_iter=max_iter,
        tol=tol,
        regularization=regularization,
    )
