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
    PointMap,
    VectorMap,
    _at_any_x,
    _check_x_tuple,
    _num_samples,
    _settings,
    _solved,
    _split,
    _vector_map,
)
from tdabench.func.solvers import CGSolver, DenseSolver, check_dense_size, check_options
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

    Args:
        func: ``func(*x)``, a scalar on a batch of samples.
        x: ``(θ, *data)``: ``θ = x[argnums]`` (``d`` entries), data tensors (or tuples of
            tensors) with a common leading sample dimension ``n``.
        argnums: index of ``θ`` in ``x``.
        chunk_size: samples per vectorised gradient call.

    Returns:
        ``(n, d)``: row ``i`` is the gradient of ``func(θ, *[t[i:i+1] for t in data])`` (a
        batch of one), flattened like ``θ.reshape(-1)``.
    """
    check_options({"chunk_size": chunk_size})
    theta, pos, data = _split(_check_x_tuple(x, "per_sample_grad_matrix"), argnums)
    if not data:
        raise ConfigError(
            "the empirical Fisher needs data arguments: x must be (θ, *data) with data tensors of a "
            "leading sample dimension; got x with only the variable"
        )
    leaves, rebuild = _data_leaves(data)  # dattri passes (θ, (inputs, labels)): nested data
    n = _num_samples(leaves)
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


def _fisher(func: Callable[..., Tensor], x: Sequence[Any], argnums: int) -> EmpiricalFisher:
    return EmpiricalFisher(per_sample_grad_matrix(func, x, argnums))


def fvp_at_x(
    func: Callable[..., Tensor], x: Sequence[Any], argnums: int = 0, regularization: float = 0.0
) -> VectorMap:
    """Fisher-vector products at ``x``: ``f(v) = (1/n) Gᵀ (G v) + λ v``.

    Args:
        func, x, argnums: as in :func:`per_sample_grad_matrix`.
        regularization: ``λ >= 0``.

    Returns:
        ``f(v)``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape. ``G`` ``(n, d)`` is computed
        once; ``F`` is never formed.
    """
    check_options({"regularization": regularization})
    fisher = _fisher(func, x, argnums)
    return _vector_map(fisher.mvp, fisher.G, regularization)


def _fvp_at(func: Callable[..., Tensor], *x: Any, **settings: Any) -> VectorMap:
    return fvp_at_x(func, x, **settings)


# Spelled out: dattri's signature (the settings of fvp_at_x, for any point)
def fvp(func: Callable[..., Tensor], argnums: int = 0, regularization: float = 0.0) -> PointMap:
    """Fisher-vector products at any point.

    Args:
        func, argnums, regularization: as in :func:`fvp_at_x`.

    Returns:
        ``f(x, v) = (F(x) + λI) v``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape.
    """
    return _at_any_x(_fvp_at, "fvp", func, _settings(locals()))


# Spelled out: dattri's signature (as its Hessian twin ifvp_at_x_explicit)
def ifvp_at_x_explicit(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> VectorMap:
    """Exact inverse-Fisher-vector products at ``x``: ``f(v) = (F + λI)^{-1} v``.

    ``F = (1/n) Gᵀ G`` is formed (refused above ``max_dense_bytes``, see
    :func:`tdabench.func.solvers.check_dense_size`, before any gradient is computed) and
    factorised once. ``F`` has rank at most ``n``: with ``n < d`` it is singular and
    ``regularization > 0`` is required (otherwise ``NonFiniteError``).

    Args:
        func, *x, argnums: as in :func:`per_sample_grad_matrix`.
        regularization: ``λ >= 0``.
        max_dense_bytes: limit on the ``(d, d)`` matrix (default: the memory planner's budget).

    Returns:
        ``f(v)``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape.
    """
    solver = DenseSolver(regularization, max_dense_bytes)
    theta, _, _ = _split(x, argnums)
    check_dense_size(theta.numel(), theta.dtype, max_dense_bytes, what="Fisher matrix")
    fisher = _fisher(func, x, argnums)
    return _solved(fisher, solver, fisher.G)


# Spelled out: dattri's signature (the settings of ifvp_at_x_explicit, for any point)
def ifvp_explicit(
    func: Callable[..., Tensor],
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> PointMap:
    """Exact inverse-Fisher-vector products at any point.

    Args:
        func, argnums, regularization, max_dense_bytes: as in :func:`ifvp_at_x_explicit`.

    Returns:
        ``f(x, v) = (F(x) + λI)^{-1} v`` with ``x = (θ, *data)``: ``v`` ``(k, d)`` or ``(d,)``
        -> the same shape.
    """
    return _at_any_x(ifvp_at_x_explicit, "ifvp_explicit", func, _settings(locals()))


# Spelled out: dattri's signature (as its Hessian twin ifvp_at_x_cg)
def ifvp_at_x_cg(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    regularization: float = 0.0,
) -> VectorMap:
    """Inverse-Fisher-vector products at ``x`` by batched CG on :func:`fvp_at_x`.

    Args:
        func, *x, argnums: as in :func:`per_sample_grad_matrix`.
        max_iter: at most this many iterations.
        tol: relative per row: ``||v - (F + λI) y|| <= tol ||v||``.
        regularization: ``λ >= 0``.

    Returns:
        ``f(v)``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape.
    """
    solver = CGSolver(max_iter, tol, regularization)
    fisher = _fisher(func, x, argnums)
    return _solved(fisher, solver, fisher.G)


# Spelled out: dattri's signature (the settings of ifvp_at_x_cg, for any point)
def ifvp_cg(
    func: Callable[..., Tensor],
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    regularization: float = 0.0,
) -> PointMap:
    """CG inverse-Fisher-vector products at any point.

    Args:
        func, argnums, max_iter, tol, regularization: as in :func:`ifvp_at_x_cg`.

    Returns:
        ``f(x, v)``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape.
    """
    return _at_any_x(ifvp_at_x_cg, "ifvp_cg", func, _settings(locals()))
