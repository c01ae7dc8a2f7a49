"""Hessian-vector products and inverse-Hessian-vector products (IHVPs).

Every function here follows one calling convention. ``func`` is a scalar function of
several positional arguments, ``func(*x)``; ``argnums`` says which argument is the
variable ``θ``; the Hessian ``H`` is the ``d x d`` Hessian of ``func`` with respect to
``x[argnums]`` *flattened* (``d = x[argnums].numel()``, any shape of ``x[argnums]`` is
allowed). Vectors ``v`` are ``(k, d)`` (``k`` right-hand sides, processed together:
matvecs are batched with :func:`torch.func.vmap`) or ``(d,)``; results have the shape
of ``v``, in the dtype and on the device of ``x[argnums]``.

Two forms exist for every operation:

* ``op(func, argnums=0, ...) -> f(x, v)`` where ``x`` is the *tuple* of ``func``'s
  positional arguments (the point can change between calls);
* ``op_at_x(func, *x, argnums=0, ...) -> f(v)`` (``hvp_at_x`` takes the tuple ``x``),
  which precomputes what it can at the fixed point ``x`` (the dense Hessian and its
  factorisation, the Arnoldi eigenbasis, the gradient graph of the HVP). The first form
  delegates to the second, so both return identical numbers.

``mode`` selects how an HVP is differentiated: ``"rev-rev"`` (reverse-over-reverse: a
VJP of the gradient, graph built once per point) or ``"rev-fwd"`` (forward-over-reverse:
a JVP of the gradient). Both give ``H v`` up to rounding.

Example:
    >>> import torch
    >>> from tdabench.func.hessian import ihvp_at_x_explicit
    >>> f = lambda w, a: 0.5 * (a * w * w).sum()    # H = diag(a)
    >>> w, a = torch.ones(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    >>> ihvp_at_x_explicit(f, w, a)(torch.ones(2, 3, dtype=torch.float64))
    tensor([[1.0000, 0.5000, 0.2500],
            [1.0000, 0.5000, 0.2500]], dtype=torch.float64)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tdabench.errors import ConfigError, NonFiniteError, ShapeError
from tdabench.func.curvature import MODES, ExactHessian
from tdabench.func.solvers import (
    ArnoldiSolver,
    CGSolver,
    DenseSolver,
    IHVPSolver,
    LiSSASolver,
    check_options,
)

__all__ = [
    "MODES",
    "hvp",
    "hvp_at_x",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_explicit",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_explicit",
    "ihvp_lissa",
]

VectorMap = Callable[[Tensor], Tensor]
PointMap = Callable[..., Tensor]


# ---------------------------------------------------------------------------- adapters
# The functions of this module and of :mod:`tdabench.func.fisher` are dattri-signature
# adapters: they check the point ``x`` and the vectors ``v``, build a curvature operator
# (:mod:`tdabench.func.curvature`) and a solver (:mod:`tdabench.func.solvers`, which also
# validates every setting, :func:`~tdabench.func.solvers.check_options`), and reshape.
# Spelled out: the public signatures are dattri's, so their parameter lists repeat across
# the forms (and in tdabench.func.fisher) on purpose.
def _check_x_tuple(x: Any, fname: str) -> tuple[Any, ...]:
    if not isinstance(x, (tuple, list)):
        raise ShapeError(
            f"{fname}: x must be the tuple of func's positional arguments, got a {type(x).__name__}; "
            "call it as f((arg0, arg1, ...), v), e.g. f((x,), v) for a one-argument func"
        )
    return tuple(x)


def _settings(local_vars: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword settings of a factory, from its ``locals()`` taken first thing."""
    return {k: v for k, v in local_vars.items() if k not in ("func", "x")}


def _at_any_x(
    at_x: Callable[..., VectorMap], name: str, func: Callable[..., Tensor], settings: dict[str, Any]
) -> Callable[..., Tensor]:
    """The dattri "any point" form ``f(x, v) = at_x(func, *x, **settings)(v)`` of an
    ``*_at_x`` factory; the settings are checked now, before any point is seen."""
    check_options(settings)

    def f(x: Sequence[Any], v: Tensor, **call: Any) -> Tensor:
        return at_x(func, *_check_x_tuple(x, name), **settings, **call)(v)

    return f


def _check_argnums(x: tuple[Any, ...], argnums: int) -> Tensor:
    if not isinstance(argnums, int) or isinstance(argnums, bool):
        raise ConfigError(
            f"argnums must be one int (the index of the variable in x), got {argnums!r}"
        )
    if not -len(x) <= argnums < len(x):
        raise ConfigError(
            f"argnums={argnums} is out of range for x with {len(x)} arguments; pass 0..{len(x) - 1}"
        )
    theta = x[argnums]
    if not isinstance(theta, Tensor) or not theta.is_floating_point():
        raise ConfigError(
            f"x[{argnums}] must be a floating-point tensor (the variable of the Hessian), got "
            f"{type(theta).__name__ if not isinstance(theta, Tensor) else theta.dtype}; cast it with .double() or .float()"
        )
    if theta.numel() == 0:
        raise ShapeError(f"x[{argnums}] is empty; the Hessian needs at least one variable")
    return theta


def _split(x: tuple[Any, ...], argnums: int) -> tuple[Tensor, int, tuple[Any, ...]]:
    """``(θ, its position, the other arguments detached)`` of ``x``, with ``θ`` checked."""
    theta = _check_argnums(x, argnums)
    pos = argnums % len(x)
    rest = tuple(a.detach() if isinstance(a, Tensor) else a for a in x[:pos] + x[pos + 1 :])
    return theta, pos, rest


def _bind(
    func: Callable[..., Tensor], pos: int, shape: torch.Size, data: tuple[Any, ...]
) -> Callable[[Tensor], Tensor]:
    """``g(flat)`` = ``func`` with ``flat.reshape(shape)`` inserted at ``pos`` among ``data``."""

    def g(flat: Tensor) -> Tensor:
        out = func(*data[:pos], flat.reshape(shape), *data[pos:])
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ShapeError(
                "func must return a scalar (a tensor with one element), got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; reduce it with .sum() or .mean()"
            )
        return out.reshape(())

    return g


def _hessian(
    func: Callable[..., Tensor], x: Sequence[Any], argnums: int, mode: str
) -> ExactHessian:
    """The :class:`ExactHessian` of ``func`` w.r.t. ``x[argnums]`` flattened, at ``x``."""
    theta, pos, rest = _split(tuple(x), argnums)
    return ExactHessian([_bind(func, pos, theta.shape, rest)], theta.detach().reshape(-1), 1, mode)


def _as_rows(v: Any, d: int, like: Tensor) -> tuple[Tensor, bool]:
    """``v`` as ``(k, d)`` rows in ``like``'s dtype/device, and whether it was a single vector."""
    if not isinstance(v, Tensor):
        raise ShapeError(f"v must be a tensor of shape (k, {d}) or ({d},), got {type(v).__name__}")
    if v.dim() == 1 and v.shape[0] == d:
        return v.to(dtype=like.dtype, device=like.device).unsqueeze(0), True
    if v.dim() == 2 and v.shape[1] == d:
        return v.to(dtype=like.dtype, device=like.device), False
    raise ShapeError(
        f"v has shape {tuple(v.shape)} but the variable has d={d} entries; pass v of shape (k, {d}) "
        f"(k vectors) or ({d},), flattening each vector like x[argnums].reshape(-1)"
    )


def _vector_map(apply: VectorMap, like: Tensor, regularization: float = 0.0) -> VectorMap:
    """``f(v)``: ``v`` ``(k, d)`` or ``(d,)`` -> rows of ``apply(V) + regularization V`` in
    ``v``'s shape, ``V`` cast to the dtype/device of ``like`` (``(d,)`` or ``(n, d)``)."""
    d = like.shape[-1]

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, like)
        out = apply(V)
        if regularization:
            out = out + regularization * V
        return out[0] if single else out

    return f


def _solved(op: Any, solver: IHVPSolver, like: Tensor) -> VectorMap:
    """``f(v)``: ``solver`` prepared on ``op`` applied to ``v`` (see :func:`_vector_map`)."""
    solver.prepare(op)
    return _vector_map(solver.solve, like)


# ---------------------------------------------------------------------------- HVP
def hvp_at_x(
    func: Callable[..., Tensor],
    x: Sequence[Any],
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> VectorMap:
    """Hessian-vector products at the fixed point ``x``.

    Args:
        func: scalar function ``func(*x)``.
        x: tuple of ``func``'s positional arguments.
        argnums: index in ``x`` of the variable (any shape; ``d`` = its number of entries).
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: ``λ >= 0``; the product is ``(H + λI) v``.

    Returns:
        ``f(v)``: ``v`` ``(k, d)`` or ``(d,)`` -> ``(H + λI) v`` of the same shape.
    """
    check_options(_settings(locals()))
    op = _hessian(func, _check_x_tuple(x, "hvp_at_x"), argnums, mode)
    return _vector_map(op.mvp, op.flat, regularization)


def _hvp_at(func: Callable[..., Tensor], *x: Any, **settings: Any) -> VectorMap:
    return hvp_at_x(func, x, **settings)


# Spelled out: dattri's signature (the settings of hvp_at_x, for any point)
def hvp(
    func: Callable[..., Tensor],
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> PointMap:
    """Hessian-vector products at any point: ``f(x, v) = (H(x) + λI) v``.

    Args:
        func, argnums, mode, regularization: as in :func:`hvp_at_x`.

    Returns:
        ``f(x, v)``: ``x`` the tuple of ``func``'s positional arguments, ``v`` ``(k, d)`` or
        ``(d,)`` with ``d = x[argnums].numel()`` -> ``(H(x) + λI) v`` of ``v``'s shape.
    """
    return _at_any_x(_hvp_at, "hvp", func, _settings(locals()))


# ---------------------------------------------------------------------------- dense
def ihvp_at_x_explicit(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> VectorMap:
    """Exact IHVPs at ``x`` from the dense ``(d, d)`` Hessian, formed and factorised once.

    Args:
        func: scalar function ``func(*x)``.
        *x: ``func``'s positional arguments.
        argnums: index of the variable in ``x``.
        regularization: ``λ``; solves ``(H + λI) y = v``.
        max_dense_bytes: refuse (``MemoryLimitError``) a ``d x d`` Hessian larger than this
            (default: the memory planner's budget for the device of ``x[argnums]``).

    Returns:
        ``f(v)``: ``v`` ``(k, d)`` or ``(d,)`` -> ``(H + λI)^{-1} v`` of the same shape.
        A positive-definite matrix is Cholesky-factorised, anything else LU-factorised;
        a singular one raises ``NonFiniteError``.
    """
    solver = DenseSolver(regularization, max_dense_bytes)
    op = _hessian(func, x, argnums, "rev-rev")
    return _solved(op, solver, op.flat)


# Spelled out: dattri's signature (the settings of ihvp_at_x_explicit, for any point)
def ihvp_explicit(
    func: Callable[..., Tensor],
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> PointMap:
    """``f(x, v) = (H(x) + λI)^{-1} v`` from the dense Hessian at any point.

    Args:
        func, argnums, regularization, max_dense_bytes: as in :func:`ihvp_at_x_explicit`.

    Returns:
        ``f(x, v)``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape.
    """
    return _at_any_x(ihvp_at_x_explicit, "ihvp_explicit", func, _settings(locals()))


# ---------------------------------------------------------------------------- CG
def ihvp_at_x_cg(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> VectorMap:
    """IHVPs at ``x`` by batched conjugate gradient on HVPs.

    Args:
        func, *x, argnums: as in :func:`ihvp_at_x_explicit`.
        max_iter: at most this many CG iterations (one batched HVP each).
        tol: relative tolerance: row ``j`` stops once ``||v_j - (H + λI) y_j|| <= tol ||v_j||``;
            CG returns when every row has (or after ``max_iter``).
        mode: HVP mode, ``"rev-rev"`` or ``"rev-fwd"``.
        regularization: ``λ``; solves ``(H + λI) y = v``. ``H + λI`` should be positive definite.

    Returns:
        ``f(v)``: ``v`` ``(k, d)`` or ``(d,)`` -> approximate ``(H + λI)^{-1} v``, same shape.
    """
    solver = CGSolver(max_iter, tol, regularization)
    check_options({"mode": mode})
    op = _hessian(func, x, argnums, mode)
    return _solved(op, solver, op.flat)


# Spelled out: dattri's signature (the settings of ihvp_at_x_cg, for any point)
def ihvp_cg(
    func: Callable[..., Tensor],
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> PointMap:
    """CG inverse-HVPs at any point.

    Args:
        func, argnums, max_iter, tol, mode, regularization: as in :func:`ihvp_at_x_cg`.

    Returns:
        ``f(x, v)``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape.
    """
    return _at_any_x(ihvp_at_x_cg, "ihvp_cg", func, _settings(locals()))


# ---------------------------------------------------------------------------- Arnoldi
def ihvp_at_x_arnoldi(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    proj_dim: int = 100,
    norm_constant: float = 1.0,
    seed: int = 0,
) -> VectorMap:
    """IHVPs at ``x`` in the dominant eigenspace of ``H`` found by Arnoldi iteration.

    The eigenbasis (``H ≈ U diag(λ) Uᵀ`` with at most ``proj_dim`` pairs, from a Krylov
    space of ``min(max_iter, d)`` vectors started from a ``seed``-ed random vector) is
    computed once, here. ``f(v) = U diag(1 / (λ + regularization)) Uᵀ v``: the component of
    ``v`` outside the eigenspace is dropped. Eigenvalues below ``tol * max|λ|`` in
    magnitude are discarded, so the result is finite (never NaN) for any finite Hessian.

    Args:
        func, *x, argnums: as in :func:`ihvp_at_x_explicit`.
        max_iter: Krylov dimension (number of HVPs).
        tol: breakdown / eigenvalue cut-off tolerance (see above).
        mode: HVP mode.
        regularization: ``λ`` added to each kept eigenvalue.
        proj_dim: number of top eigenpairs kept.
        norm_constant: ``H`` is divided by it during the iteration (numerical range only).
        seed: seed of the start vector.

    Returns:
        ``f(v)``: ``(k, d)`` or ``(d,)`` -> same shape. ``f.basis`` is the
        :class:`tdabench.func.solvers.EigenBasis` (``values`` ``(r,)``, ``vectors`` ``(d, r)``).
    """
    solver = ArnoldiSolver(proj_dim, max_iter, tol, norm_constant, seed, regularization)
    check_options({"mode": mode})

    def finite(V: Tensor) -> Tensor:
        out = solver.solve(V)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(
                "Arnoldi IHVP is not finite: a kept eigenvalue plus regularization is 0; "
                "change regularization or raise tol"
            )
        return out

    op = _hessian(func, x, argnums, mode)
    solver.prepare(op)
    f = _vector_map(finite, op.flat)
    f.basis = solver.basis  # type: ignore[attr-defined]
    return f


# Spelled out: dattri's signature (the settings of ihvp_at_x_arnoldi, for any point)
def ihvp_arnoldi(
    func: Callable[..., Tensor],
    argnums: int = 0,
    max_iter: int = 100,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    proj_dim: int = 100,
    norm_constant: float = 1.0,
    seed: int = 0,
) -> PointMap:
    """Arnoldi IHVPs at any point (a new basis per call).

    Args:
        func, argnums, max_iter, tol, mode, regularization, proj_dim, norm_constant, seed:
            as in :func:`ihvp_at_x_arnoldi`.

    Returns:
        ``f(x, v)``: ``v`` ``(k, d)`` or ``(d,)`` -> the same shape.
    """
    return _at_any_x(ihvp_at_x_arnoldi, "ihvp_arnoldi", func, _settings(locals()))


# ---------------------------------------------------------------------------- LiSSA
def _num_samples(data: tuple[Any, ...]) -> int:
    sizes = {int(t.shape[0]) for t in data if isinstance(t, Tensor) and t.dim() > 0}
    bad = [type(t).__name__ for t in data if not isinstance(t, Tensor) or t.dim() == 0]
    if bad or len(sizes) != 1:
        raise ShapeError(
            "LiSSA samples mini-batches from the data arguments (every argument but x[argnums]); "
            f"they must be tensors with the same leading sample dimension, got sizes {sorted(sizes)} "
            f"and non-tensors/scalars {bad}; bind constant arguments into func with a closure"
        )
    return sizes.pop()


def ihvp_at_x_lissa(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable[[tuple[Tensor, ...]], Any] | None = None,
    mode: str = "rev-rev",
    seed: int = 0,
    in_dims: Sequence[int | None] | None = None,
) -> VectorMap:
    """Stochastic IHVPs at ``x`` by the LiSSA recursion.

    ``x = (θ, *data)`` (``θ = x[argnums]``; the other arguments, in order, are data
    tensors with a common leading sample dimension ``n``). ``func`` should be a *mean*
    over the data it receives, so a mini-batch Hessian estimates the full one. Each
    recursion step draws ``batch_size`` distinct samples (``torch.randperm`` with a
    ``torch.Generator`` seeded by ``seed``, fresh at every call of ``f``, so ``f`` is
    deterministic) and uses the HVP of ``func(θ, *data[idx])``; ``collate_fn``, if given,
    maps the sampled tuple ``(d_1[idx], d_2[idx], ...)`` to the data arguments (a tuple,
    or one object). With ``h_0 = v``: ``h_t = v + (1 - damping) h_{t-1} - H_t h_{t-1} /
    scaling``, result ``h_T / scaling`` averaged over ``num_repeat`` runs; it converges to
    ``(H + damping · scaling · I)^{-1} v`` when ``scaling`` exceeds the largest eigenvalue
    of ``H`` (strictly: half of it) and ``H`` is positive definite.

    Args:
        func, *x, argnums: ``func(*x)`` with ``x = (θ, *data)``, ``θ = x[argnums]``.
        batch_size: samples per step, ``1 <= batch_size <= n``; ``n`` makes it deterministic.
        num_repeat, recursion_depth: independent recursions averaged; steps per recursion.
        damping, scaling: in ``[0, 1)``; ``> 0``.
        collate_fn: optional ``f(sampled_tuple) -> data args``.
        mode, seed: HVP mode; sampling seed.
        in_dims: dattri's spelling of which arguments are sampled: one entry per ``x``, ``0``
            for a data argument (sampled along dim 0) and ``None`` for ``θ``; the only layout
            supported is the one above (every argument but ``θ`` is data), anything else
            raises :class:`ConfigError`.

    Returns:
        ``f(v)``: ``(k, d)`` or ``(d,)`` -> same shape. Works in any floating dtype.
    """
    check_options({"mode": mode})
    _check_in_dims(in_dims, len(x), argnums)
    solver = LiSSASolver(batch_size, num_repeat, recursion_depth, damping, scaling, seed=int(seed))
    op = _SampledTupleHessian(func, x, argnums, mode, collate_fn, batch_size)
    return _solved(op, solver, op.flat)


def _check_in_dims(in_dims: Sequence[int | None] | None, n: int, argnums: int) -> None:
    """dattri's ``in_dims`` for LiSSA: accepted when it says what tdabench assumes."""
    if in_dims is None:
        return
    expected = tuple(None if i == argnums else 0 for i in range(n))
    if tuple(in_dims) != expected:
        raise ConfigError(
            f"in_dims={tuple(in_dims)!r} is not supported: LiSSA samples every argument but "
            f"argnums={argnums} along dim 0, i.e. in_dims={expected!r}; put fixed non-parameter "
            "inputs inside func (a closure) instead"
        )


class _SampledTupleHessian:
    """LiSSA's operator family for ``x = (θ, *data)``: ``sample(gen, b)`` is the Hessian of
    ``func(θ, *data[idx])`` on ``b`` samples drawn with ``torch.randperm`` (``collate_fn``
    maps the sampled tuple to the data arguments); without data, always the full Hessian."""

    def __init__(
        self,
        func: Callable[..., Tensor],
        x: tuple[Any, ...],
        argnums: int,
        mode: str,
        collate_fn: Callable[[tuple[Tensor, ...]], Any] | None,
        batch_size: int,
    ) -> None:
        self.func, self.mode, self.collate_fn = func, mode, collate_fn
        theta, self.pos, self.data = _split(x, argnums)
        self.shape, self.flat = theta.shape, theta.detach().reshape(-1)
        self.n = _num_samples(self.data) if self.data else 0
        if self.data and batch_size > self.n:
            raise ConfigError(
                f"batch_size={batch_size} exceeds the {self.n} samples in the data arguments; "
                f"pass batch_size <= {self.n}"
            )
        self.full = None if self.data else self._hessian(())

    def _hessian(self, data: tuple[Any, ...]) -> ExactHessian:
        g = _bind(self.func, self.pos, self.shape, data)
        return ExactHessian([g], self.flat, 1, self.mode)

    def sample(self, gen: torch.Generator, b: int) -> ExactHessian:
        """The Hessian on ``b`` samples drawn with ``gen`` (the full one without data)."""
        if self.full is not None:
            return self.full
        idx = torch.randperm(self.n, generator=gen)[:b]
        sampled = tuple(t[idx.to(t.device)] for t in self.data)
        args = self.collate_fn(sampled) if self.collate_fn is not None else sampled
        return self._hessian(args if isinstance(args, tuple) else (args,))


# Spelled out: dattri's signature (the settings of ihvp_at_x_lissa, for any point)
def ihvp_lissa(
    func: Callable[..., Tensor],
    argnums: int = 0,
    batch_size: int = 1,
    num_repeat: int = 1,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    collate_fn: Callable[[tuple[Tensor, ...]], Any] | None = None,
    mode: str = "rev-rev",
    seed: int = 0,
) -> PointMap:
    """LiSSA IHVPs at any point.

    Args:
        func, argnums, batch_size, num_repeat, recursion_depth, damping, scaling, collate_fn,
            mode, seed: as in :func:`ihvp_at_x_lissa`.

    Returns:
        ``f(x, v, in_dims=None)`` with ``x = (θ, *data)``: ``v`` ``(k, d)`` or ``(d,)`` -> the
        same shape.
    """
    f = _at_any_x(ihvp_at_x_lissa, "ihvp_lissa", func, _settings(locals()))

    def lissa(x: Sequence[Any], v: Tensor, in_dims: Sequence[int | None] | None = None) -> Tensor:
        return f(x, v, in_dims=in_dims)

    return lissa
