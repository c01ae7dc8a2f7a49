"""Linear solvers on a batched matrix-vector product.

Every solver here works on a *stacked* right-hand side ``V`` of shape ``(k, d)`` and a
``matvec`` mapping ``(k, d) -> (k, d)`` (row-wise ``H v``), so ``k`` inverse-HVPs cost
one solver run. They are shared by :mod:`tdabench.func.hessian`,
:mod:`tdabench.func.fisher` and the influence-function attributors.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tdabench._validate import check_choice, check_int, check_real
from tdabench.errors import ConfigError, NonFiniteError, ShapeError
from tdabench.func.curvature import MODES
from tdabench.memory import MemoryPlanner, planner_for

__all__ = [
    "ArnoldiSolver",
    "CGSolver",
    "DenseInverse",
    "DenseSolver",
    "EigenBasis",
    "IHVPSolver",
    "LiSSASolver",
    "arnoldi_basis",
    "check_dense_size",
    "check_options",
    "conjugate_gradient",
    "dense_from_matvec",
    "lissa_recursion",
    "solve_dense",
]

logger = logging.getLogger(__name__)

Matvec = Callable[[Tensor], Tensor]

_RULES: dict[str, Callable[[str, Any], Any]] = {
    "mode": lambda n, v: check_choice(n, v, MODES, "how Hessian-vector products are computed"),
    "regularization": lambda n, v: check_real(n, v, 0.0),
    "tol": lambda n, v: check_real(n, v, 0.0),
    "max_iter": lambda n, v: check_int(n, v, 1),
    "proj_dim": lambda n, v: check_int(n, v, 1),
    "norm_constant": lambda n, v: check_real(n, v, 0.0, strict=True),
    "batch_size": lambda n, v: check_int(n, v, 1),
    "num_repeat": lambda n, v: check_int(n, v, 1),
    "recursion_depth": lambda n, v: check_int(n, v, 1),
    "damping": lambda n, v: check_real(n, v, 0.0, below=1.0),
    "scaling": lambda n, v: check_real(
        n, v, 0.0, strict=True, fix="pass a scaling above the largest Hessian eigenvalue"
    ),
    "chunk_size": lambda n, v: check_int(n, v, 1),
}


def check_options(options: Mapping[str, Any]) -> None:
    """Validate every solver or product setting in ``options`` that has a rule.

    The one argument check of the solvers and of the dattri-shaped functions of
    :mod:`tdabench.func.hessian` / :mod:`tdabench.func.fisher`: ``mode`` in :data:`MODES`;
    ``regularization``, ``tol`` ``>= 0``; ``max_iter``, ``proj_dim``, ``batch_size``,
    ``num_repeat``, ``recursion_depth``, ``chunk_size`` integers ``>= 1``; ``norm_constant``,
    ``scaling`` ``> 0``; ``damping`` in ``[0, 1)``. Other names are not checked here.

    Args:
        options: ``{name: value}``, e.g. a function's ``locals()``.

    Raises:
        ConfigError: naming the setting, its value and the accepted range.
    """
    for name, value in options.items():
        rule = _RULES.get(name)
        if rule is not None:
            rule(name, value)


def check_dense_size(
    d: int,
    dtype: torch.dtype,
    max_bytes: int | None = None,
    what: str = "Hessian",
    planner: MemoryPlanner | None = None,
    device: torch.device | str = "cpu",
) -> None:
    """Refuse a dense ``d x d`` matrix that does not fit.

    Args:
        d: the matrix has ``d x d`` entries.
        dtype: its dtype.
        max_bytes: the limit, if given; else ``planner``'s budget (``device``'s by default).
        what: name of the matrix in the message.
        planner: the memory planner to ask when ``max_bytes`` is ``None``.
        device: the device of the default planner.

    Raises:
        MemoryLimitError: naming the matrix and the fixes.
    """
    if max_bytes is not None:
        planner = MemoryPlanner(device=torch.device(device), budget=int(max_bytes))
    planner = planner or planner_for(device)
    need = d * d * torch.empty((), dtype=dtype).element_size()
    planner.require(
        need,
        f"the explicit {what} of {d} parameters",
        "restrict parameters with layer_name=..., use an iterative method (CG, LiSSA, Arnoldi) "
        "or raise max_dense_bytes",
    )


def _as_2d(v: Tensor, d: int | None = None) -> Tensor:
    if v.dim() == 1:
        v = v.unsqueeze(0)
    if v.dim() != 2 or (d is not None and v.shape[1] != d):
        raise ShapeError(
            f"expected vectors of shape (k, {d if d is not None else 'd'}) (or ({d},)), got {tuple(v.shape)}"
        )
    return v


def dense_from_matvec(
    matvec: Matvec,
    d: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    chunk: int = 256,
    out: Tensor | None = None,
) -> Tensor:
    """Materialise the ``(d, d)`` matrix of a symmetric ``matvec`` (``(c, d) -> (c, d)``) by
    applying it to the identity in chunks of ``chunk`` rows.

    With ``out`` (a ``d x d`` tensor), the matrix is *added* into ``out`` block by block
    (no ``d x d`` temporary) and ``out`` is returned.
    """
    if out is None:
        out = torch.zeros(d, d, dtype=dtype, device=device)
    elif tuple(out.shape) != (d, d):
        raise ShapeError(f"out must have shape ({d}, {d}), got {tuple(out.shape)}")
    eye = torch.zeros(min(chunk, d), d, dtype=dtype, device=device)
    for start in range(0, d, chunk):
        stop = min(d, start + chunk)
        rows = torch.arange(stop - start, device=eye.device)
        eye.zero_()
        block = eye[: stop - start]
        block[rows, rows + start] = 1.0
        out[start:stop] += matvec(block)
    return out


class DenseInverse:
    """``(A + λI)^{-1}`` for a fixed symmetric ``A`` ``(d, d)``, factorised once: Cholesky when
    ``A + λI`` is positive definite, else LU (with a logged warning); singular raises.

    The one dense inverse of the package (explicit IF, ``ihvp_*_explicit``, ``ifvp_*_explicit``).

    Args:
        A: symmetric ``(d, d)``; it is symmetrised, and overwritten when ``in_place``.
        regularization: ``λ`` added to the diagonal.
        what: name of the matrix in messages.
        in_place: reuse ``A``'s storage (saves one ``d x d`` copy).
    """

    def __init__(
        self, A: Tensor, regularization: float = 0.0, what: str = "Hessian", in_place: bool = False
    ) -> None:
        d = A.shape[0]
        if A.dim() != 2 or A.shape != (d, d):
            raise ShapeError(f"expected a square matrix, got {tuple(A.shape)}")
        A = A if in_place else A.clone()
        if regularization:
            A.diagonal().add_(regularization)
        self.what, self.regularization = what, regularization
        L, info = torch.linalg.cholesky_ex(A)
        if int(info) == 0:
            self.kind, self.factor, self.pivots = "cholesky", L, None
            return
        del L
        logger.warning(
            "the %s + %.3g I is not positive definite; using an LU solve (raise regularization "
            "for a convex local model)",
            what,
            regularization,
        )
        LU, pivots, info = torch.linalg.lu_factor_ex(A)
        if int(info) != 0:
            raise NonFiniteError(
                f"the {d}x{d} {what} (+ regularization {regularization}) is singular; "
                "pass regularization > 0 (e.g. 1e-3)"
            )
        self.kind, self.factor, self.pivots = "lu", LU, pivots

    def __call__(self, V: Tensor) -> Tensor:
        """Rows of ``(A + λI)^{-1} v``: ``V`` ``(k, d)`` -> ``(k, d)``."""
        if self.kind == "cholesky":
            X = torch.cholesky_solve(V.T, self.factor).T
        else:
            X = torch.linalg.lu_solve(self.factor, self.pivots, V.T).T
        if not bool(torch.isfinite(X).all()):
            raise NonFiniteError(
                f"inverting the {self.what} produced NaN/inf: it is (near) singular; pass regularization > 0"
            )
        return X


def solve_dense(matrix: Tensor, V: Tensor, regularization: float = 0.0) -> Tensor:
    """Rows of ``(matrix + regularization * I)^{-1} V^T``; ``V`` is ``(k, d)``, returns ``(k, d)``.

    A one-shot :class:`DenseInverse` (Cholesky, else LU; singular raises with the fix).
    """
    d = matrix.shape[0]
    V2 = _as_2d(V, d)
    A = 0.5 * (matrix + matrix.T)
    return DenseInverse(A, regularization, "matrix", in_place=True)(V2.to(A.dtype)).to(V.dtype)


def conjugate_gradient(
    matvec: Matvec,
    B: Tensor,
    max_iter: int = 10,
    tol: float = 1e-7,
    regularization: float = 0.0,
    x0: Tensor | None = None,
) -> Tensor:
    """Solve ``(H + regularization I) x_j = b_j`` for every row ``b_j`` of ``B`` by CG.

    Args:
        matvec: batched ``H v``, ``(k, d) -> (k, d)``; ``H`` symmetric positive definite.
        B: right-hand sides, ``(k, d)``.
        max_iter: maximal number of CG iterations (each one batched ``matvec``).
        tol: a row stops once its residual norm ``||b - A x||`` is at most
            ``tol * ||b||`` (relative tolerance); CG stops when every row has.
        regularization: ``λ`` added to the diagonal.
        x0: optional start, ``(k, d)``; zeros by default.

    Returns:
        ``(k, d)`` approximate solutions.
    """
    check_options({"max_iter": max_iter, "tol": tol, "regularization": regularization})
    B = _as_2d(B)

    def A(v: Tensor) -> Tensor:
        out = matvec(v)
        return out + regularization * v if regularization else out

    x = torch.zeros_like(B) if x0 is None else x0.clone()
    r = B - A(x) if x0 is not None else B.clone()
    p = r.clone()
    rs = (r * r).sum(dim=1)
    thresh = (tol * B.norm(dim=1)) ** 2
    active = rs > thresh
    for _ in range(max_iter):
        if not bool(active.any()):
            break
        x, r, p, rs = _cg_step(A, x, r, p, rs, active)
        active = active & (rs > thresh)
    if not bool(torch.isfinite(x).all()):
        raise NonFiniteError(
            "CG diverged (NaN/inf): the Hessian is not positive definite; pass regularization > 0"
        )
    return x


def _cg_step(
    A: Matvec, x: Tensor, r: Tensor, p: Tensor, rs: Tensor, active: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One batched CG iteration on the ``active`` rows (the others keep their values).

    ``x``, ``r``, ``p`` ``(k, d)``: iterates, residuals, directions; ``rs`` ``(k,)``: squared
    residual norms; ``active`` ``(k,)`` bool. Returns the new ``x, r, p, rs``.
    """
    tiny = torch.finfo(r.dtype).tiny
    Ap = A(p)
    pAp = (p * Ap).sum(dim=1)
    alpha = torch.where(
        active & (pAp.abs() > tiny),
        rs / pAp.where(pAp.abs() > tiny, torch.ones_like(pAp)),
        torch.zeros_like(rs),
    )
    x = x + alpha[:, None] * p
    r = r - alpha[:, None] * Ap
    rs_new = (r * r).sum(dim=1)
    beta = torch.where(
        active & (rs > tiny),
        rs_new / rs.where(rs > tiny, torch.ones_like(rs)),
        torch.zeros_like(rs),
    )
    p = torch.where(active[:, None], r + beta[:, None] * p, p)
    return x, r, p, torch.where(active, rs_new, rs)


def lissa_recursion(
    matvec_sampler: Callable[[int], Matvec],
    V: Tensor,
    recursion_depth: int = 5000,
    damping: float = 0.0,
    scaling: float = 50.0,
    num_repeat: int = 1,
) -> Tensor:
    """LiSSA: stochastic Neumann-series estimate of inverse-HVPs.

    With ``H_t`` the Hessian on the ``t``-th sampled mini-batch (``matvec_sampler(t)``)
    and ``h_0 = v``, iterates ``h_t = v + (1 - damping) h_{t-1} - H_t h_{t-1} / scaling``
    and returns ``h_T / scaling``, averaged over ``num_repeat`` independent runs. The
    fixed point is ``(H + damping * scaling * I)^{-1} v``; it converges when the
    eigenvalues of ``H / scaling + damping I`` lie in ``(0, 2)``, so ``scaling`` must
    exceed half the largest Hessian eigenvalue.
    """
    check_options(
        {"recursion_depth": recursion_depth, "num_repeat": num_repeat}
        | {"damping": damping, "scaling": scaling}
    )
    V = _as_2d(V)
    total = torch.zeros_like(V)
    step = 0
    for _ in range(num_repeat):
        h = V.clone()
        for _t in range(recursion_depth):
            mv = matvec_sampler(step)
            step += 1
            h = V + (1.0 - damping) * h - mv(h) / scaling
        if not bool(torch.isfinite(h).all()):
            raise NonFiniteError(
                "LiSSA diverged (NaN/inf); raise scaling above half the largest Hessian eigenvalue "
                "or add damping"
            )
        total = total + h / scaling
    return total / num_repeat


@dataclass
class EigenBasis:
    """Top eigenpairs of a symmetric operator: ``H ≈ U diag(values) Uᵀ``.

    ``values`` ``(r,)``, ``vectors`` ``(d, r)`` with orthonormal columns.
    """

    values: Tensor
    vectors: Tensor

    def inverse_apply(
        self, V: Tensor, regularization: float = 0.0, residual: bool = False
    ) -> Tensor:
        """Rows of ``U diag(1 / (values + λ)) Uᵀ v`` for each row ``v`` of ``V`` ``(k, d)`` or
        ``(d,)`` (``λ`` the regularization); returns ``(k, d)``.

        With ``residual=True`` (needs ``λ > 0``), the exact inverse of the truncated operator
        plus ``λI``, ``U diag(1 / (values + λ)) Uᵀ v + (v - U Uᵀ v) / λ``: the part of ``v``
        outside the basis is kept and damped instead of dropped.
        """
        V2 = _as_2d(V, self.vectors.shape[0])
        coeff = V2 @ self.vectors
        if not residual:
            return (coeff / (self.values + regularization)) @ self.vectors.T
        if not regularization > 0:
            raise ConfigError(
                "residual=True needs regularization > 0 (the residual is divided by it)"
            )
        inside = coeff * (1.0 / (self.values + regularization) - 1.0 / regularization)
        return inside @ self.vectors.T + V2 / regularization


def arnoldi_basis(
    matvec: Matvec,
    d: int,
    proj_dim: int = 100,
    max_iter: int = 100,
    tol: float = 1e-7,
    norm_constant: float = 1.0,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> EigenBasis:
    """Arnoldi iteration: the ``proj_dim`` dominant eigenpairs of a symmetric ``H``.

    Builds an orthonormal Krylov basis of ``max_iter`` vectors from a seeded random start
    (with full re-orthogonalisation), stopping early when the next vector's norm falls
    below ``tol`` (an invariant subspace was found), then diagonalises the projected
    matrix. Eigenvalues whose magnitude is below ``tol * max|λ|`` are dropped so the
    inverse is always finite. ``norm_constant`` divides ``H`` during the iteration for
    numerical range and is undone on the returned eigenvalues.
    """
    check_options(
        {"proj_dim": proj_dim, "max_iter": max_iter, "tol": tol, "norm_constant": norm_constant}
    )
    n_iter = min(max_iter, d)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    q = torch.randn(d, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    Q = torch.zeros(n_iter + 1, d, dtype=dtype, device=device)
    Hm = torch.zeros(n_iter + 1, n_iter, dtype=dtype, device=device)
    Q[0] = q / q.norm()
    k = n_iter
    for i in range(n_iter):
        w = matvec(Q[i : i + 1])[0] / norm_constant
        # Gram-Schmidt twice for numerical orthogonality.
        for _ in range(2):
            h = Q[: i + 1] @ w
            Hm[: i + 1, i] += h
            w = w - Q[: i + 1].T @ h
        nrm = w.norm()
        Hm[i + 1, i] = nrm
        if float(nrm) < tol:
            k = i + 1
            break
        Q[i + 1] = w / nrm
    T = Hm[:k, :k]
    T = 0.5 * (T + T.T)
    evals, evecs = torch.linalg.eigh(T)
    order = torch.argsort(evals.abs(), descending=True)
    evals, evecs = evals[order], evecs[:, order]
    keep = evals.abs() > tol * evals.abs().max().clamp_min(torch.finfo(dtype).tiny)
    evals, evecs = evals[keep][:proj_dim], evecs[:, keep][:, :proj_dim]
    vectors = Q[:k].T @ evecs
    if not bool(torch.isfinite(evals).all() and torch.isfinite(vectors).all()):
        raise NonFiniteError(
            "Arnoldi produced NaN/inf; check that the Hessian is finite (try float64)"
        )
    return EigenBasis(values=evals * norm_constant, vectors=vectors)


# ---------------------------------------------------------------------- solver objects
class IHVPSolver:
    """Applies ``(C + λI)^{-1}`` for a curvature operator ``C``
    (:class:`~tdabench.func.curvature.CurvatureOperator`): :meth:`prepare` once per operator,
    then :meth:`solve` on stacked right-hand sides ``(k, d) -> (k, d)``.

    ``holds_operator``: whether :meth:`solve` keeps calling the operator (CG, LiSSA: its
    linearised graphs stay alive) or only a precomputed factor/basis (dense, Arnoldi).
    """

    holds_operator: bool = True
    regularization: float = 0.0

    def prepare(self, op: Any, planner: MemoryPlanner | None = None) -> None:
        """Once per operator ``op`` (``dim`` ``d``): keep it, or precompute a factor or basis."""
        self.op = op

    def solve(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Rows of ``(C + λI)^{-1} v``: ``V`` ``(k, d)`` -> ``(k, d)``."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Settings, for provenance."""
        return {"solver": type(self).__name__}


@dataclass(eq=False)
class DenseSolver(IHVPSolver):
    """Forms the dense operator (refused over ``max_dense_bytes`` or the planner's budget) and
    factorises ``C + λI`` once (:class:`DenseInverse`).

    Args:
        regularization: ``λ >= 0``.
        max_dense_bytes: explicit limit on the ``(d, d)`` matrix (default: the planner's budget).
    """

    regularization: float = 0.0
    max_dense_bytes: int | None = None
    holds_operator = False

    def __post_init__(self) -> None:
        check_options(vars(self))
        self.regularization = float(self.regularization)

    def prepare(self, op: Any, planner: MemoryPlanner | None = None) -> None:
        """Form and factorise ``C + λI`` of ``op`` (a ``(d, d)`` matrix)."""
        A = op.dense(planner, self.max_dense_bytes)
        if not bool(torch.isfinite(A.sum())):
            raise NonFiniteError(
                f"the explicit {op.name} contains NaN or inf; check the model and data (float64 helps)"
            )
        self.inverse = DenseInverse(A, self.regularization, op.name, in_place=True)

    def solve(self, V: Tensor) -> Tensor:
        """Rows of ``(C + λI)^{-1} v``: ``V`` ``(k, d)`` -> ``(k, d)``."""
        return self.inverse(V)


@dataclass(eq=False)
class CGSolver(IHVPSolver):
    """Batched conjugate gradient on the operator's products (see :func:`conjugate_gradient`).

    Args:
        max_iter: at most this many iterations (one batched product each).
        tol: relative residual tolerance per row.
        regularization: ``λ >= 0``.
    """

    max_iter: int = 10
    tol: float = 1e-7
    regularization: float = 0.0

    def __post_init__(self) -> None:
        check_options(vars(self))
        self.max_iter, self.tol = int(self.max_iter), float(self.tol)
        self.regularization = float(self.regularization)

    def solve(self, V: Tensor) -> Tensor:
        """Rows of ``(C + λI)^{-1} v`` by CG: ``V`` ``(k, d)`` -> ``(k, d)``."""
        return conjugate_gradient(
            self.op.mvp, V, max_iter=self.max_iter, tol=self.tol, regularization=self.regularization
        )


@dataclass(eq=False)
class LiSSASolver(IHVPSolver):
    """The LiSSA recursion (:func:`lissa_recursion`) on mini-batch operators.

    The operator must offer ``sample(generator, batch_size) -> operator`` (the curvature of
    ``batch_size`` samples drawn with ``generator``). Every :meth:`solve` restarts a CPU
    generator seeded with ``seed``, so results do not depend on how right-hand sides are chunked.

    Args:
        batch_size: samples per recursion step.
        num_repeat: independent recursions averaged.
        recursion_depth: steps per recursion.
        damping: in ``[0, 1)``.
        scaling: ``> 0``, above half the largest eigenvalue.
        seed: seed of the sampling generator.
    """

    batch_size: int = 1
    num_repeat: int = 1
    recursion_depth: int = 5000
    damping: float = 0.0
    scaling: float = 50.0
    seed: int = 0

    def __post_init__(self) -> None:
        check_options(vars(self))

    def solve(self, V: Tensor) -> Tensor:
        """Rows of ``≈ (C + damping·scaling·I)^{-1} v``: ``V`` ``(k, d)`` -> ``(k, d)``."""
        gen = torch.Generator(device="cpu").manual_seed(int(self.seed))

        def sampler(_step: int) -> Matvec:
            return self.op.sample(gen, self.batch_size).mvp

        return lissa_recursion(
            sampler,
            V,
            recursion_depth=self.recursion_depth,
            damping=self.damping,
            scaling=self.scaling,
            num_repeat=self.num_repeat,
        )


@dataclass(eq=False)
class ArnoldiSolver(IHVPSolver):
    """A low-rank eigenbasis by Arnoldi (:func:`arnoldi_basis`); ``solve`` is
    ``U diag(1 / (values + λ)) Uᵀ v`` (zero outside the basis), or with ``residual=True`` the
    exact inverse of the rank-``r`` truncation plus ``λI`` (the rest of ``v`` divided by ``λ``).

    Args:
        proj_dim, max_iter, tol, norm_constant, seed: as in :func:`arnoldi_basis`.
        regularization: ``λ >= 0`` added to each kept eigenvalue.
        residual: keep (and damp by ``1 / λ``) the part of ``v`` outside the basis.
    """

    proj_dim: int = 100
    max_iter: int = 100
    tol: float = 1e-7
    norm_constant: float = 1.0
    seed: int = 0
    regularization: float = 0.0
    residual: bool = False
    holds_operator = False

    def __post_init__(self) -> None:
        check_options(vars(self))
        self.regularization, self.residual = float(self.regularization), bool(self.residual)

    def prepare(self, op: Any, planner: MemoryPlanner | None = None) -> None:
        """Run Arnoldi on ``op``'s products; sets ``basis`` (an :class:`EigenBasis`)."""
        settings = (self.proj_dim, self.max_iter, self.tol, self.norm_constant, self.seed)
        self.basis = arnoldi_basis(op.mvp, op.dim, *settings, dtype=op.dtype, device=op.device)

    def solve(self, V: Tensor) -> Tensor:
        """Rows of the basis inverse: ``V`` ``(k, d)`` -> ``(k, d)``."""
        return self.basis.inverse_apply(V, self.regularization, self.residual)
