"""Influence-function attributors: explicit, conjugate-gradient, LiSSA and Arnoldi.

Every class here computes, for each checkpoint of the task and then averaged over them,

.. math::

    \\text{score}[i, j] = \\nabla_\\theta t(z^{test}_j)^\\top (H + \\lambda I)^{-1} \\nabla_\\theta L(z^{train}_i)

where ``t`` is the task's target function, ``L`` its loss function and ``H`` the Hessian of
the **mean** training loss over every sample of the loader passed to :meth:`cache`
(``H = (1/n) Σ_i ∇²L(z_i)``). Each sample's loss is evaluated as a batch of one, so ``H``
does not depend on how the loss function reduces a batch or on how the cache loader is
batched. A high score means the training sample helps the test sample: removing
``z_i`` from a mean objective ``(1/n) Σ L + R(θ)`` raises the test target by about
``score[i, j] / n``.

An L2 penalty ``(λ/2)||θ||²`` of the training objective ``(1/n) Σ L + (λ/2)||θ||²`` belongs
in ``H``: pass ``regularization=λ`` with a ``loss_func`` that is the data loss only (the
usual choice), or put the penalty inside ``loss_func`` (``L_i + (λ/2)||θ||²``, same ``H``).
The second route also adds ``λθ`` to every training gradient, i.e. it models removing a
sample *together with its 1/n share of the penalty*; that shifts each test column by the
constant ``∇t(z_j)ᵀ(H + λI)^{-1} λθ``, which leaves per-test rankings, LOO and LDS
correlations unchanged. Keep the penalty out of ``target_func`` in either case.

The methods differ only in how they apply ``(H + λI)^{-1}``:

* :class:`IFAttributorExplicit` forms the dense Hessian and factorises it once.
* :class:`IFAttributorCG` runs batched conjugate gradient with Hessian-vector products that
  stream over the cached training batches.
* :class:`IFAttributorLiSSA` runs the stochastic LiSSA recursion on seeded mini-batches.
* :class:`IFAttributorArnoldi` builds a low-rank eigenbasis of ``H`` with Arnoldi.

:meth:`attribute` transforms the test side once per checkpoint (all test gradients go
through one batched solve, in chunks of :attr:`rhs_chunk_size` rows), then streams over
the training batches computing ``G_train @ X_testᵀ``. ``self_attribute`` uses the target
gradient on the "test" side too, so it is exactly the diagonal of
``attribute(train, train)``.
"""

from __future__ import annotations

import logging
import math
import numbers
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap
from tqdm.auto import tqdm

from tdabench.algorithm.base import BaseAttributor
from tdabench.errors import ConfigError, DataError, NonFiniteError
from tdabench.func.batching import fold_broadcast_bmm
from tdabench.func.solvers import (
    DEFAULT_MAX_DENSE_BYTES,
    EigenBasis,
    arnoldi_basis,
    check_dense_size,
    conjugate_gradient,
    dense_from_matvec,
    lissa_recursion,
)
from tdabench.func.utils import Batch, batch_size_of, check_finite
from tdabench.task import AttributionTask, LayerName

__all__ = [
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
]

logger = logging.getLogger(__name__)

HVP_MODES = ("rev-rev", "rev-fwd")

Matvec = Callable[[Tensor], Tensor]


# ---------------------------------------------------------------------- validation helpers
def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigError(
            f"{name} must be an integer >= {minimum}, got {value!r}; pass e.g. {name}={max(minimum, 1)}"
        )
    return int(value)


def _check_float(
    name: str, value: Any, minimum: float = 0.0, strict: bool = False, fix: str = ""
) -> float:
    ok = (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )
    if ok:
        ok = float(value) > minimum if strict else float(value) >= minimum
    if not ok:
        rel = ">" if strict else ">="
        raise ConfigError(
            f"{name} must be a finite number {rel} {minimum}, got {value!r}; {fix or f'pass a value {rel} {minimum}'}"
        )
    return float(value)


def _check_mode(mode: Any) -> str:
    if mode not in HVP_MODES:
        raise ConfigError(
            f"mode must be one of {HVP_MODES} (how Hessian-vector products are computed), got {mode!r}"
        )
    return str(mode)


# ---------------------------------------------------------------------- batch helpers
def _check_tensor_batch(batch: Batch) -> None:
    if isinstance(batch, Tensor):
        return
    if not all(isinstance(t, Tensor) for t in batch):
        raise DataError(
            "influence functions cache the training batches and need every element of a batch to be a "
            f"tensor, got types {[type(t).__name__ for t in batch]}; make the DataLoader yield tensors only"
        )


def _take(batch: Batch, index: Tensor | slice) -> Batch:
    """Rows ``index`` of every tensor of ``batch``."""
    if isinstance(batch, Tensor):
        return batch[index]
    rows = [t[index] for t in batch]
    return tuple(rows) if isinstance(batch, tuple) else rows


def _concat(batches: list[Batch]) -> Batch:
    """Concatenate batches of the same structure along the batch dimension."""
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches, dim=0)
    try:
        cols = [torch.cat([b[c] for b in batches], dim=0) for c in range(len(first))]
    except (RuntimeError, IndexError, TypeError) as exc:
        raise DataError(
            f"the cached training batches do not share one structure ({exc}); make every batch of the "
            "cache loader a tuple of tensors with the same trailing shapes"
        ) from exc
    return tuple(cols) if isinstance(first, tuple) else cols


#: Fold broadcast ``bmm`` calls (:func:`~tdabench.func.batching.fold_broadcast_bmm`) only when
#: samples x vectors of one batched HVP reach this: below it the products are tiny and the
#: dispatch mode's per-op Python overhead costs more than it saves (LiSSA's mini-batches).
_FOLD_MIN_WORK = 16384


def _batch_hvp(
    func: Callable[[Tensor], Tensor], flat: Tensor, mode: str, samples: int | None = None
) -> Matvec:
    """Batched Hessian-vector product of a scalar ``func`` at ``flat``: ``(k, d) -> (k, d)``.

    ``rev-rev`` differentiates the gradient in reverse mode once (``vjp`` of ``grad``) and
    replays it for every row; ``rev-fwd`` pushes every row forward through the gradient
    (``jvp`` of ``grad``). One row runs without ``vmap``; more rows run under
    :func:`~tdabench.func.batching.fold_broadcast_bmm` (one wide GEMM per shared data matrix)
    unless ``samples`` (the number of samples ``func`` sums over, if known) times the rows is
    below ``_FOLD_MIN_WORK``.
    """

    def fold(k: int):  # type: ignore[no-untyped-def]
        small = samples is not None and samples * k < _FOLD_MIN_WORK
        return fold_broadcast_bmm(1 if small else k)

    if mode == "rev-rev":
        _, vjp_fn = vjp(grad(func), flat)
        batched = vmap(vjp_fn)

        def mv(V: Tensor) -> Tensor:
            if V.shape[0] == 1:  # one vector (Arnoldi): plain products, no vmap overhead
                return vjp_fn(V[0])[0].unsqueeze(0)
            with fold(V.shape[0]):
                return batched(V)[0]

        return mv

    def one(v: Tensor) -> Tensor:
        return jvp(grad(func), (flat,), (v,))[1]

    batched_fwd = vmap(one, randomness="same")

    def mv_fwd(V: Tensor) -> Tensor:
        if V.shape[0] == 1:
            return one(V[0]).unsqueeze(0)
        with fold(V.shape[0]):
            return batched_fwd(V)

    return mv_fwd


def _rechunk(batches: list[Batch], size: int) -> list[Batch]:
    """The samples of ``batches`` regrouped into consecutive chunks of at most ``size``."""
    pool = _concat(batches)
    n = sum(batch_size_of(b) for b in batches)
    return [_take(pool, slice(s, min(n, s + size))) for s in range(0, n, size)]


class _MeanHessian:
    """``V -> H V`` for the Hessian of the mean training loss over fixed chunks of samples.

    In ``rev-rev`` mode each chunk's gradient is linearised once (``vjp`` of ``grad``, its
    graph kept) and replayed for every product, so iterative solvers (CG, Arnoldi) pay the
    forward/backward of the training set once per checkpoint instead of once per iteration.
    """

    def __init__(self, attributor: _IFAttributorBase, index: int, chunks: list[Batch], n: int, mode: str) -> None:
        flat = attributor._params(index)
        self.n = n
        self.ops = [
            _batch_hvp(attributor.task.summed_loss(c, index, attributor.layer_name, device=attributor.device), flat, mode)
            for c in chunks
        ]

    def __call__(self, V: Tensor) -> Tensor:
        out = self.ops[0](V)
        for op in self.ops[1:]:
            out = out + op(V)
        return out / self.n


# ---------------------------------------------------------------------- base class
class _IFAttributorBase(BaseAttributor):
    """Shared machinery: caching the training data, per-checkpoint operators, streaming."""

    requires_cache = True

    #: Largest number of right-hand sides pushed through one iterative solver run; more
    #: test (or train) gradients are solved in chunks of this many rows. ``None`` (default)
    #: picks as many rows as keep the solver's vectors (about 6 per row, ``d`` entries each)
    #: within :attr:`solver_memory_bytes`, between 1 and 1024. Lower it if the batched
    #: Hessian-vector products run out of memory (each row also carries activations).
    rhs_chunk_size: int | None = None
    #: Memory budget of the solver state used when ``rhs_chunk_size`` is ``None`` (1 GiB).
    solver_memory_bytes: int = 2**30
    #: Training samples per Hessian-vector-product chunk: the cached batches are regrouped
    #: into chunks of this size whatever the loader's batch size (fewer, larger products).
    #: Lower it if the products run out of memory.
    hvp_batch_size: int = 1024

    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device)
        self._train_batches: list[Batch] = []
        self._n_cached = 0
        self._pool: Batch | None = None
        self._hessians: dict[int, _MeanHessian] = {}

    # ----------------------------------------------------------------- operators
    def _hvp_mean(
        self, index: int, batches: Iterable[Batch], n: int, mode: str, V: Tensor
    ) -> Tensor:
        """``H V`` row-wise for the Hessian of the mean loss over ``batches`` (``n`` samples)."""
        flat = self._params(index)
        out = torch.zeros_like(V)
        for batch in batches:
            f = self.task.summed_loss(batch, index, self.layer_name, device=self.device)
            out = out + _batch_hvp(f, flat, mode, samples=batch_size_of(batch))(V)
        return out / n

    def _mean_hessian(self, index: int) -> _MeanHessian:
        """The linearised mean-loss Hessian of checkpoint ``index`` over all cached samples
        (only the current checkpoint's graphs are kept)."""
        if index not in self._hessians:
            self._hessians = {
                index: _MeanHessian(self, index, self._train_batches, self._n_cached, getattr(self, "mode", "rev-rev"))
            }
        return self._hessians[index]

    def _prepare(self, index: int) -> None:  # pragma: no cover - overridden
        """Build the inverse-Hessian operator of checkpoint ``index`` from the cached data."""
        raise NotImplementedError

    def _solve(self, index: int, V: Tensor) -> Tensor:  # pragma: no cover - overridden
        """Rows of ``(H + λI)^{-1} V`` for checkpoint ``index``; ``V`` is ``(k, d)``."""
        raise NotImplementedError

    def _ihvp(self, index: int, V: Tensor) -> Tensor:
        """:meth:`_solve` in chunks of :attr:`rhs_chunk_size` rows; checks finiteness."""
        chunk = self._chunk_rows()
        parts = [self._solve(index, V[s : s + chunk]) for s in range(0, V.shape[0], chunk)]
        X = torch.cat(parts, dim=0)
        return check_finite(
            X,
            f"inverse-Hessian-vector product ({type(self).__name__}, checkpoint {index})",
            fix="the Hessian is (near) singular or the solver diverged: pass regularization > 0 "
            "(LiSSA: raise scaling or damping)",
        )

    def _test_factors(self, index: int, g_test: Tensor) -> tuple[Tensor | None, Tensor]:
        """``(P, R)`` with scores ``G_train @ P @ Rᵀ`` (``P = None``: ``G_train @ Rᵀ``), i.e.
        ``P Rᵀ = (H + λI)^{-1} G_testᵀ``; by default ``P = None`` and ``R`` = :meth:`_ihvp`."""
        return None, self._ihvp(index, g_test)

    def _chunk_rows(self) -> int:
        if self.rhs_chunk_size is not None:
            return max(1, int(self.rhs_chunk_size))
        per_row = 6 * self.spec.dim * torch.empty((), dtype=self.dtype).element_size()
        return int(min(1024, max(1, self.solver_memory_bytes // max(per_row, 1))))

    # ----------------------------------------------------------------- API
    def cache(self, full_train_loader: Iterable[Batch]) -> None:
        """Keep the training batches on ``device`` and prepare the inverse-Hessian operator of
        every checkpoint.

        Args:
            full_train_loader: loader over the training set whose mean loss defines ``H``;
                batches are tuples of tensors (or tensors) with a leading batch dimension.
                How it is batched does not change the result.

        Raises:
            DataError: the loader is empty or yields non-tensor elements.
            NonFiniteError: a training loss is NaN/inf at some checkpoint.
            CheckpointError: a checkpoint does not fit the model.
        """
        start = time.perf_counter()
        self._cached = False
        batches: list[Batch] = []
        n = 0
        for batch in tqdm(
            self._batches(full_train_loader, "cache (full training) loader"),
            desc="IF cache: data",
            disable=None,
            leave=False,
        ):
            _check_tensor_batch(batch)
            b = batch_size_of(batch)
            if b == 0:
                continue
            batches.append(batch)
            n += b
        if n == 0:
            raise DataError(
                "the cache (full training) loader holds no sample; pass a DataLoader over the training set"
            )
        self._train_batches = _rechunk(batches, max(1, int(self.hvp_batch_size)))
        self._n_cached = n
        self._pool = None
        self._hessians: dict[int, _MeanHessian] = {}
        for k in range(self.task.num_checkpoints):
            flat = self._params(k)
            for bi, batch in enumerate(batches):
                vals = self.task.per_sample_values(flat, batch, "loss", k, self.layer_name)
                check_finite(
                    vals,
                    f"training loss at checkpoint {k}, cache batch {bi}",
                    fix="check the checkpoint, the data (NaN inputs?) and the loss function",
                )
            self._prepare(k)
        self._cached = True
        logger.info(
            "%s cached %d samples in %d batches for %d checkpoint(s) in %.2fs",
            type(self).__name__,
            n,
            len(batches),
            self.task.num_checkpoints,
            time.perf_counter() - start,
        )

    def attribute(self, train_loader: Iterable[Batch], test_loader: Iterable[Batch]) -> Tensor:
        """Influence scores of every training sample on every test sample.

        The test side is transformed once per checkpoint (target gradients, then one batched
        inverse-HVP), and the training loader is streamed once per checkpoint.

        Args:
            train_loader: training samples to score (need not be the cache loader).
            test_loader: test samples.

        Returns:
            Tensor ``(n_train, n_test)`` on ``device``, averaged over checkpoints; high = the
            training sample helps the test sample.
        """
        self._require_cache()
        total: Tensor | None = None
        K = self.task.num_checkpoints
        for k in range(K):
            g_test = self._all_grads(test_loader, "target", k, "test loader")
            left, x_test = self._test_factors(k, g_test)
            blocks = [
                (g_train if left is None else g_train @ left) @ x_test.T
                for g_train in tqdm(
                    self._grads(train_loader, "loss", k, "train loader"),
                    desc=f"IF attribute (ckpt {k})",
                    disable=None,
                    leave=False,
                )
            ]
            scores = torch.cat(blocks, dim=0)
            total = self._accumulate(total, scores, "train loader")
        assert total is not None
        return total / K

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """Self-influence ``∇t(z_i)ᵀ (H + λI)^{-1} ∇L(z_i)`` of each training sample.

        Equals the diagonal of ``attribute(train_loader, train_loader)`` (the target
        gradient plays the test side, as there). Works batch by batch, so any number of
        batches is fine.

        Returns:
            Tensor ``(n_train,)``, averaged over checkpoints.
        """
        self._require_cache()
        total: Tensor | None = None
        K = self.task.num_checkpoints
        same = self.task.target_func is self.task.loss_func
        for k in range(K):
            flat = self._params(k)
            parts = []
            for batch in tqdm(
                self._batches(train_loader, "train loader"),
                desc=f"IF self-attribute (ckpt {k})",
                disable=None,
                leave=False,
            ):
                g_loss = self.task.per_sample_grads(flat, batch, "loss", k, self.layer_name)
                g_tgt = (
                    g_loss
                    if same
                    else self.task.per_sample_grads(flat, batch, "target", k, self.layer_name)
                )
                parts.append((g_loss * self._ihvp(k, g_tgt)).sum(dim=1))
            total = self._accumulate(total, torch.cat(parts), "train loader")
        assert total is not None
        return total / K

    @staticmethod
    def _accumulate(total: Tensor | None, scores: Tensor, what: str) -> Tensor:
        if total is None:
            return scores
        if total.shape != scores.shape:
            raise DataError(
                f"the {what} yielded {scores.shape[0]} samples on one pass and {total.shape[0]} on another; "
                "with several checkpoints the loaders are iterated once per checkpoint: pass re-iterable "
                "DataLoaders (not generators) in a fixed order"
            )
        return total + scores

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out["num_checkpoints"] = self.task.num_checkpoints
        return out


# ---------------------------------------------------------------------- explicit
class IFAttributorExplicit(_IFAttributorBase):
    """Influence functions with the dense Hessian, factorised once per checkpoint.

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters (the Hessian is then the sub-block of those
            parameters, the others held fixed); ``None`` uses all.
        device: where the Hessian is formed and solved.
        regularization: ``λ >= 0`` added to the Hessian's diagonal.
        max_dense_bytes: largest dense ``d x d`` Hessian allowed, in bytes; ``None`` means
            the default of 4 GiB (:data:`~tdabench.func.solvers.DEFAULT_MAX_DENSE_BYTES`).
            Larger problems raise :class:`~tdabench.errors.MemoryLimitError` at construction.
            One factor of this size is kept per checkpoint, and factorising briefly needs
            about twice it.

    The Hessian is assembled from Hessian-vector products (reverse-over-reverse, the
    gradient graph of each cached batch built once) applied to the identity in chunks.
    A positive-definite ``H + λI`` is Cholesky-factorised; otherwise an LU factorisation is
    used (a warning is logged: the IF of a non-convex point is then not a LOO estimate).
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        regularization: float = 0.0,
        max_dense_bytes: int | None = None,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device)
        self.regularization = _check_float("regularization", regularization, 0.0)
        if max_dense_bytes is not None:
            max_dense_bytes = _check_int("max_dense_bytes", max_dense_bytes, 1)
        self.max_dense_bytes = max_dense_bytes
        check_dense_size(self.spec.dim, self.dtype, max_dense_bytes)
        self._factors: dict[int, tuple[str, Tensor, Tensor | None]] = {}

    def _prepare(self, index: int) -> None:
        d = self.spec.dim
        check_dense_size(d, self.dtype, self.max_dense_bytes)
        flat = self._params(index)
        H = torch.zeros(d, d, dtype=flat.dtype, device=self.device)
        for batch in tqdm(
            self._train_batches,
            desc=f"IF explicit Hessian (ckpt {index})",
            disable=None,
            leave=False,
        ):
            f = self.task.summed_loss(batch, index, self.layer_name, device=self.device)
            dense_from_matvec(_batch_hvp(f, flat, "rev-rev"), d, flat.dtype, self.device, out=H)
        check_finite(
            H,
            f"explicit Hessian at checkpoint {index}",
            fix="check the model and data (float64 helps)",
        )
        H = H.add(H.T).mul_(0.5 / self._n_cached)  # symmetrised mean
        if self.regularization:
            H.diagonal().add_(self.regularization)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            del H
            self._factors[index] = ("chol", L, None)
            return
        del L
        logger.warning(
            "H + %.3g I at checkpoint %d is not positive definite; using an LU solve (raise regularization "
            "for a convex local model)",
            self.regularization,
            index,
        )
        LU, piv, info = torch.linalg.lu_factor_ex(H)
        if int(info) != 0:
            raise NonFiniteError(
                f"the {d}x{d} Hessian at checkpoint {index} is singular; pass regularization > 0 (e.g. 1e-3)"
            )
        self._factors[index] = ("lu", LU, piv)

    def _solve(self, index: int, V: Tensor) -> Tensor:
        kind, F, piv = self._factors[index]
        if kind == "chol":
            return torch.cholesky_solve(V.T, F).T
        assert piv is not None
        return torch.linalg.lu_solve(F, piv, V.T).T

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out.update(
            regularization=self.regularization,
            max_dense_bytes=self.max_dense_bytes
            if self.max_dense_bytes is not None
            else DEFAULT_MAX_DENSE_BYTES,
        )
        return out


# ---------------------------------------------------------------------- CG
class IFAttributorCG(_IFAttributorBase):
    """Influence functions with batched conjugate gradient.

    Each CG iteration applies ``H`` to all right-hand sides at once, streaming over the
    cached training batches (kept on ``device``).

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters; ``None`` uses all.
        device: where gradients, HVPs and the solve run.
        max_iter: maximal number of CG iterations (>= 1).
        tol: relative residual tolerance (>= 0): a right-hand side ``b`` stops once
            ``||b - (H + λI) x|| <= tol * ||b||``; 0 runs all ``max_iter`` iterations.
        mode: ``"rev-rev"`` (reverse-over-reverse) or ``"rev-fwd"`` (forward-over-reverse)
            Hessian-vector products.
        regularization: ``λ >= 0`` added to the Hessian's diagonal (CG needs ``H + λI``
            positive definite).
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        max_iter: int = 10,
        tol: float = 1e-7,
        mode: str = "rev-rev",
        regularization: float = 0.0,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device)
        self.max_iter = _check_int("max_iter", max_iter, 1)
        self.tol = _check_float("tol", tol, 0.0)
        self.mode = _check_mode(mode)
        self.regularization = _check_float("regularization", regularization, 0.0)

    def _prepare(self, index: int) -> None:
        pass  # the operator is the cached batches themselves

    def _solve(self, index: int, V: Tensor) -> Tensor:
        def matvec(P: Tensor) -> Tensor:
            return self._mean_hessian(index)(P)

        return conjugate_gradient(
            matvec, V, max_iter=self.max_iter, tol=self.tol, regularization=self.regularization
        )

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out.update(
            max_iter=self.max_iter, tol=self.tol, mode=self.mode, regularization=self.regularization
        )
        return out


# ---------------------------------------------------------------------- LiSSA
class IFAttributorLiSSA(_IFAttributorBase):
    """Influence functions with the LiSSA stochastic recursion.

    Step ``t`` uses the Hessian of the mean loss on ``batch_size`` cached samples drawn
    without replacement by a generator seeded from ``(seed, checkpoint index)``; every
    solve restarts that generator, so results are reproducible and do not depend on how
    the right-hand sides are chunked. The estimate converges to
    ``(H + damping * scaling * I)^{-1} v``.

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters; ``None`` uses all.
        device: where gradients, HVPs and the recursion run.
        batch_size: samples per recursion step (>= 1, at most the number cached;
            ``batch_size = n`` makes the recursion deterministic).
        num_repeat: independent recursions averaged (>= 1).
        recursion_depth: steps per recursion (>= 1).
        damping: in ``[0, 1)``; shrinks the previous iterate each step.
        scaling: ``> 0``; must exceed half the largest Hessian eigenvalue for convergence.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Hessian-vector products.
        seed: seed of the mini-batch sampler.
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        batch_size: int = 1,
        num_repeat: int = 1,
        recursion_depth: int = 5000,
        damping: float = 0.0,
        scaling: float = 50.0,
        mode: str = "rev-rev",
        seed: int = 0,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device)
        self.batch_size = _check_int("batch_size", batch_size, 1)
        self.num_repeat = _check_int("num_repeat", num_repeat, 1)
        self.recursion_depth = _check_int("recursion_depth", recursion_depth, 1)
        self.damping = _check_float("damping", damping, 0.0)
        if self.damping >= 1.0:
            raise ConfigError(
                f"damping must be in [0, 1), got {damping!r}; pass e.g. damping=0.001"
            )
        self.scaling = _check_float(
            "scaling",
            scaling,
            0.0,
            strict=True,
            fix="pass a value above half the largest Hessian eigenvalue, e.g. scaling=50",
        )
        self.mode = _check_mode(mode)
        self.seed = _check_int("seed", seed, 0)

    def _prepare(self, index: int) -> None:
        if self.batch_size > self._n_cached:
            raise ConfigError(
                f"LiSSA batch_size={self.batch_size} exceeds the {self._n_cached} cached training samples; "
                f"pass batch_size <= {self._n_cached}"
            )
        if self._pool is None:
            self._pool = _concat(self._train_batches)

    def _solve(self, index: int, V: Tensor) -> Tensor:
        gen = torch.Generator(device="cpu").manual_seed((self.seed * 1_000_003 + index) % 2**63)
        pool = self._pool
        n, b = self._n_cached, self.batch_size

        def sampler(_step: int) -> Matvec:
            idx = torch.randperm(n, generator=gen)[:b].to(self.device)
            batch = _take(pool, idx)
            return lambda P: self._hvp_mean(index, [batch], b, self.mode, P)

        return lissa_recursion(
            sampler,
            V,
            recursion_depth=self.recursion_depth,
            damping=self.damping,
            scaling=self.scaling,
            num_repeat=self.num_repeat,
        )

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out.update(
            batch_size=self.batch_size,
            num_repeat=self.num_repeat,
            recursion_depth=self.recursion_depth,
            damping=self.damping,
            scaling=self.scaling,
            mode=self.mode,
            seed=self.seed,
        )
        return out


# ---------------------------------------------------------------------- Arnoldi
class IFAttributorArnoldi(_IFAttributorBase):
    """Influence functions with a low-rank Arnoldi eigenbasis of the Hessian.

    At :meth:`cache`, Arnoldi (seeded start vector, full re-orthogonalisation) runs on the
    Hessian of the mean loss over the first ``max(1, floor(precompute_data_ratio * n))``
    cached samples, keeping the ``proj_dim`` eigenpairs of largest magnitude;
    ``(H + λI)^{-1} v`` is then ``U diag(1 / (values + λ)) Uᵀ v`` (zero outside the basis).

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters; ``None`` uses all.
        device: where HVPs and the basis live.
        precompute_data_ratio: fraction in ``(0, 1]`` of the cached samples used for the basis.
        proj_dim: number of eigenpairs kept (>= 1; at most ``max_iter``).
        max_iter: Krylov iterations (>= 1), i.e. Hessian-vector products per checkpoint.
        norm_constant: ``> 0``; ``H`` is divided by it during the iteration (range only).
        tol: ``>= 0``; stop when the Krylov space is invariant to this tolerance, and drop
            eigenvalues below ``tol`` times the largest.
        regularization: ``λ >= 0`` added to the kept eigenvalues.
        seed: seed of the Arnoldi start vector.
    """

    #: Training samples per Hessian-vector-product chunk. Arnoldi multiplies one vector at a
    #: time, so replaying a chunk needs only about one forward pass of activations (the
    #: linearised graphs of all chunks are kept either way): chunks are 8x those of the other
    #: methods (fewer per-product overheads). Lower it if the products run out of memory.
    hvp_batch_size: int = 8192

    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        precompute_data_ratio: float = 1.0,
        proj_dim: int = 100,
        max_iter: int = 100,
        norm_constant: float = 1.0,
        tol: float = 1e-7,
        regularization: float = 0.0,
        seed: int = 0,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device)
        r = _check_float("precompute_data_ratio", precompute_data_ratio, 0.0, strict=True)
        if r > 1.0:
            raise ConfigError(
                f"precompute_data_ratio must be in (0, 1], got {precompute_data_ratio!r}; pass e.g. 1.0"
            )
        self.precompute_data_ratio = r
        self.proj_dim = _check_int("proj_dim", proj_dim, 1)
        self.max_iter = _check_int("max_iter", max_iter, 1)
        self.norm_constant = _check_float("norm_constant", norm_constant, 0.0, strict=True)
        self.tol = _check_float("tol", tol, 0.0)
        self.regularization = _check_float("regularization", regularization, 0.0)
        self.seed = _check_int("seed", seed, 0)
        if self.max_iter < self.proj_dim:
            logger.warning(
                "IFAttributorArnoldi: max_iter=%d < proj_dim=%d keeps at most %d eigenpairs",
                self.max_iter,
                self.proj_dim,
                self.max_iter,
            )
        self._bases: dict[int, EigenBasis] = {}

    def _precompute_batches(self) -> tuple[list[Batch], int]:
        m = max(1, math.floor(self.precompute_data_ratio * self._n_cached + 1e-9))
        out: list[Batch] = []
        seen = 0
        for batch in self._train_batches:
            if seen >= m:
                break
            b = batch_size_of(batch)
            take = min(b, m - seen)
            out.append(batch if take == b else _take(batch, slice(0, take)))
            seen += take
        return out, m

    def _prepare(self, index: int) -> None:
        batches, m = self._precompute_batches()
        matvec = _MeanHessian(self, index, batches, m, "rev-rev")

        basis = arnoldi_basis(
            matvec,
            self.spec.dim,
            proj_dim=self.proj_dim,
            max_iter=self.max_iter,
            tol=self.tol,
            norm_constant=self.norm_constant,
            seed=self.seed,
            dtype=self.dtype,
            device=self.device,
        )
        if bool((basis.values + self.regularization <= 0).any()):
            logger.warning(
                "Arnoldi basis at checkpoint %d has eigenvalues <= -regularization; the inverse is "
                "indefinite or unbounded: raise regularization",
                index,
            )
        self._bases[index] = basis
        logger.info(
            "Arnoldi checkpoint %d: kept %d eigenpairs from %d samples",
            index,
            basis.values.numel(),
            m,
        )

    def _solve(self, index: int, V: Tensor) -> Tensor:
        return self._bases[index].inverse_apply(V, self.regularization)

    def _test_factors(self, index: int, g_test: Tensor) -> tuple[Tensor | None, Tensor]:
        # (H + λI)^{-1} G_testᵀ = U C^T with C = G_test U diag(1 / (values + λ)): scoring
        # through the rank-r basis costs n_train·d·r instead of n_train·d·n_test.
        basis = self._bases[index]
        if basis.values.numel() >= min(g_test.shape[0], self.spec.dim):
            return super()._test_factors(index, g_test)
        coeff = (g_test @ basis.vectors) / (basis.values + self.regularization)
        check_finite(
            coeff,
            f"inverse-Hessian-vector product ({type(self).__name__}, checkpoint {index})",
            fix="the Hessian is (near) singular or the solver diverged: pass regularization > 0",
        )
        return basis.vectors, coeff

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out.update(
            precompute_data_ratio=self.precompute_data_ratio,
            proj_dim=self.proj_dim,
            max_iter=self.max_iter,
            norm_constant=self.norm_constant,
            tol=self.tol,
            regularization=self.regularization,
            seed=self.seed,
        )
        return out
