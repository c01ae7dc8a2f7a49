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

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from tdabench.errors import ConfigError, NonFiniteError, ShapeError
from tdabench.func.curvature import ExactHessian
from tdabench.func.solvers import ArnoldiSolver, CGSolver, DenseInverse, LiSSASolver

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

MODES = ("rev-rev", "rev-fwd")
"""Supported differentiation modes of Hessian-vector products."""

Matvec = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------------- helpers
def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown HVP mode {mode!r}; use one of {list(MODES)}")


def _check_nonneg(name: str, value: float) -> None:
    if not value >= 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _check_x_tuple(x: Any, fname: str) -> tuple[Any, ...]:
    if not isinstance(x, (tuple, list)):
        raise ShapeError(
            f"{fname}: x must be the tuple of func's positional arguments, got a {type(x).__name__}; "
            "call it as f((arg0, arg1, ...), v), e.g. f((x,), v) for a one-argument func"
        )
    return tuple(x)


def _at_any_x(
    at_x: Callable[..., Callable[[Tensor], Tensor]],
    func: Callable[..., Tensor],
    name: str,
    **kwargs: Any,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """The dattri "any point" form ``f(x, v) = at_x(func, *x, **kwargs)(v)`` of an ``*_at_x`` factory."""

    def f(x: Sequence[Any], v: Tensor) -> Tensor:
        return at_x(func, *_check_x_tuple(x, name), **kwargs)(v)

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


def _detach(x: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.detach() if isinstance(a, Tensor) else a for a in x)


def _flat_function(
    func: Callable[..., Tensor], x: tuple[Any, ...], argnums: int
) -> tuple[Callable[[Tensor], Tensor], Tensor]:
    """``g(flat)`` = ``func`` with ``x[argnums]`` replaced by ``flat.view(shape)``, and ``flat0``."""
    theta = _check_argnums(x, argnums)
    pos = argnums % len(x)
    shape = theta.shape
    xs = _detach(x)

    def g(flat: Tensor) -> Tensor:
        args = (*xs[:pos], flat.reshape(shape), *xs[pos + 1 :])
        out = func(*args)
        if not isinstance(out, Tensor) or out.numel() != 1:
            raise ShapeError(
                "func must return a scalar (a tensor with one element), got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}; reduce it with .sum() or .mean()"
            )
        return out.reshape(())

    return g, theta.detach().reshape(-1)


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


def _out(rows: Tensor, single: bool) -> Tensor:
    return rows[0] if single else rows


def _matvec(g: Callable[[Tensor], Tensor], flat0: Tensor, mode: str) -> Matvec:
    """Batched ``V (k, d) -> (k, d)``: rows of ``H v`` for the Hessian of ``g`` at ``flat0``
    (an :class:`~tdabench.func.curvature.ExactHessian` of one function)."""
    _check_mode(mode)
    return ExactHessian([g], flat0, 1, mode).mvp


# ---------------------------------------------------------------------------- HVP
def hvp_at_x(
    func: Callable[..., Tensor],
    x: Sequence[Any],
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
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
    _check_mode(mode)
    _check_nonneg("regularization", regularization)
    x = _check_x_tuple(x, "hvp_at_x")
    g, flat0 = _flat_function(func, x, argnums)
    mv = _matvec(g, flat0, mode)
    d = flat0.numel()

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, flat0)
        out = mv(V)
        if regularization:
            out = out + regularization * V
        return _out(out, single)

    return f


def hvp(
    func: Callable[..., Tensor],
    argnums: int = 0,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """Hessian-vector products at any point: ``f(x, v) = (H(x) + λI) v``.

    ``x`` is the tuple of ``func``'s positional arguments, ``v`` is ``(k, d)`` or ``(d,)``
    with ``d = x[argnums].numel()``; the result has ``v``'s shape. See :func:`hvp_at_x`.
    """
    _check_mode(mode)
    _check_nonneg("regularization", regularization)

    def f(x: Sequence[Any], v: Tensor) -> Tensor:
        return hvp_at_x(
            func,
            _check_x_tuple(x, "hvp"),
            argnums=argnums,
            mode=mode,
            regularization=regularization,
        )(v)

    return f


# ---------------------------------------------------------------------------- explicit
def ihvp_at_x_explicit(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> Callable[[Tensor], Tensor]:
    """Exact IHVPs at ``x`` from the dense Hessian, formed and factorised once.

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
    _check_nonneg("regularization", regularization)
    g, flat0 = _flat_function(func, tuple(x), argnums)
    H = ExactHessian([g], flat0, 1, "rev-rev").dense(max_bytes=max_dense_bytes)
    inverse = DenseInverse(H, regularization, in_place=True)
    d = flat0.numel()

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, flat0)
        return _out(inverse(V), single)

    return f


def ihvp_explicit(
    func: Callable[..., Tensor],
    argnums: int = 0,
    regularization: float = 0.0,
    max_dense_bytes: int | None = None,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """``f(x, v) = (H(x) + λI)^{-1} v`` from the dense Hessian; see :func:`ihvp_at_x_explicit`."""
    _check_nonneg("regularization", regularization)

    return _at_any_x(
        ihvp_at_x_explicit,
        func,
        "ihvp_explicit",
        argnums=argnums,
        regularization=regularization,
        max_dense_bytes=max_dense_bytes,
    )


# ---------------------------------------------------------------------------- CG
def ihvp_at_x_cg(
    func: Callable[..., Tensor],
    *x: Any,
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Tensor], Tensor]:
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
    _check_mode(mode)
    _check_nonneg("regularization", regularization)
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    _check_nonneg("tol", tol)
    g, flat0 = _flat_function(func, tuple(x), argnums)
    solver = CGSolver(max_iter, tol, regularization)
    solver.prepare(ExactHessian([g], flat0, 1, mode))
    d = flat0.numel()

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, flat0)
        return _out(solver.solve(V), single)

    return f


def ihvp_cg(
    func: Callable[..., Tensor],
    argnums: int = 0,
    max_iter: int = 10,
    tol: float = 1e-7,
    mode: str = "rev-rev",
    regularization: float = 0.0,
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """``f(x, v)``: CG inverse-HVPs at any point; see :func:`ihvp_at_x_cg`."""
    _check_mode(mode)
    _check_nonneg("regularization", regularization)
    if max_iter < 1:
        raise ConfigError(f"max_iter must be >= 1, got {max_iter}")
    _check_nonneg("tol", tol)

    return _at_any_x(
        ihvp_at_x_cg,
        func,
        "ihvp_cg",
        argnums=argnums,
        max_iter=max_iter,
        tol=tol,
        mode=mode,
        regularization=regularization,
    )


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
) -> Callable[[Tensor], Tensor]:
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
    _check_mode(mode)
    _check_nonneg("regularization", regularization)
    g, flat0 = _flat_function(func, tuple(x), argnums)
    d = flat0.numel()
    _check_nonneg("tol", tol)
    if proj_dim < 1 or max_iter < 1:
        raise ConfigError(f"proj_dim and max_iter must be >= 1, got {proj_dim}, {max_iter}")
    solver = ArnoldiSolver(proj_dim, max_iter, tol, norm_constant, seed, regularization)
    solver.prepare(ExactHessian([g], flat0, 1, mode))
    basis = solver.basis

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, flat0)
        out = basis.inverse_apply(V, regularization)
        if not bool(torch.isfinite(out).all()):
            raise NonFiniteError(
                "Arnoldi IHVP is not finite: a kept eigenvalue plus regularization is 0; "
                "change regularization or raise tol"
            )
        return _out(out, single)

    f.basis = basis  # type: ignore[attr-defined]
    return f


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
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """``f(x, v)``: Arnoldi IHVPs at any point (a new basis per call); see :func:`ihvp_at_x_arnoldi`."""
    _check_mode(mode)
    _check_nonneg("regularization", regularization)

    return _at_any_x(
        ihvp_at_x_arnoldi,
        func,
        "ihvp_arnoldi",
        argnums=argnums,
        max_iter=max_iter,
        tol=tol,
        mode=mode,
        regularization=regularization,
        proj_dim=proj_dim,
        norm_constant=norm_constant,
        seed=seed,
    )


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
) -> Callable[[Tensor], Tensor]:
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
    _check_mode(mode)
    x = tuple(x)
    _check_in_dims(in_dims, len(x), argnums)
    theta = _check_argnums(x, argnums)
    _check_lissa(batch_size, num_repeat, recursion_depth, damping, scaling)
    sampled = _SampledTupleHessian(func, x, argnums, mode, collate_fn)
    if sampled.data and batch_size > sampled.n:
        raise ConfigError(
            f"batch_size={batch_size} exceeds the {sampled.n} samples in the data arguments; "
            f"pass batch_size <= {sampled.n}"
        )
    solver = LiSSASolver(batch_size, num_repeat, recursion_depth, damping, scaling, seed=int(seed))
    solver.prepare(sampled)
    flat0 = theta.detach().reshape(-1)
    d = flat0.numel()

    def f(v: Tensor) -> Tensor:
        V, single = _as_rows(v, d, flat0)
        return _out(solver.solve(V), single)

    return f


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


def _check_lissa(
    batch_size: Any, num_repeat: int, recursion_depth: int, damping: float, scaling: float
) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if recursion_depth < 1 or num_repeat < 1:
        raise ConfigError(
            f"recursion_depth and num_repeat must be >= 1, got {recursion_depth}, {num_repeat}"
        )
    if scaling <= 0:
        raise ConfigError(
            f"scaling must be > 0 (above the largest Hessian eigenvalue), got {scaling}"
        )
    if not 0.0 <= damping < 1.0:
        raise ConfigError(f"damping must be in [0, 1), got {damping}")


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
    ) -> None:
        self.func, self.mode, self.collate_fn = func, mode, collate_fn
        self.pos = argnums % len(x)
        xs = _detach(x)
        self.data = xs[: self.pos] + xs[self.pos + 1 :]
        theta = x[argnums]
        self.shape, self.flat0 = theta.shape, theta.detach().reshape(-1)
        self.n = _num_samples(self.data) if self.data else 0
        self.full = None if self.data else ExactHessian([self._g(())], self.flat0, 1, mode)

    def _g(self, data_args: tuple[Any, ...]) -> Callable[[Tensor], Tensor]:
        def g(flat: Tensor) -> Tensor:
            args = (*data_args[: self.pos], flat.reshape(self.shape), *data_args[self.pos :])
            out = self.func(*args)
            if not isinstance(out, Tensor) or out.numel() != 1:
                raise ShapeError("func must return a scalar (one element); reduce it with .mean()")
            return out.reshape(())

        return g

    def sample(self, gen: torch.Generator, b: int) -> ExactHessian:
        if self.full is not None:
            return self.full
        idx = torch.randperm(self.n, generator=gen)[:b]
        sampled = tuple(t[idx.to(t.device)] for t in self.data)
        args = self.collate_fn(sampled) if self.collate_fn is not None else sampled
        if not isinstance(args, tuple):
            args = (args,)
        return ExactHessian([self._g(args)], self.flat0, 1, self.mode)


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
) -> Callable[[Sequence[Any], Tensor], Tensor]:
    """``f(x, v, in_dims=None)`` with ``x = (θ, *data)``: LiSSA IHVPs; see :func:`ihvp_at_x_lissa`."""
    _check_mode(mode)
    kwargs = dict(
        argnums=argnums,
        batch_size=batch_size,
        num_repeat=num_repeat,
        recursion_depth=recursion_depth,
        damping=damping,
        scaling=scaling,
        collate_fn=collate_fn,
        mode=mode,
        seed=seed,
    )

    def f(x: Sequence[Any], v: Tensor, in_dims: Sequence[int | None] | None = None) -> Tensor:
        return ihvp_at_x_lissa(func, *_check_x_tuple(x, "ihvp_lissa"), in_dims=in_dims, **kwargs)(v)

    return f
