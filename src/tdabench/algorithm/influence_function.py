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

**Curvature.** ``hessian="exact"`` (default, as dattri) uses the Hessian above;
``hessian="ggn"`` replaces it by the generalised Gauss-Newton matrix
``G = (1/n) Σ_i J_iᵀ H_i J_i`` (:class:`~tdabench.func.curvature.GaussNewton`), positive
semi-definite and usually a better local model of a non-convex network. The GGN needs the loss
split into model output and output loss: ``ggn_output="cross_entropy"`` / ``"mse"`` / an
:class:`~tdabench.func.curvature.OutputLoss`, or ``loss_func.ggn_output``; :meth:`cache`
checks that the split reproduces ``loss_func`` on the first cached samples.

**One maths stack.** Each class is an adapter: a curvature operator of
:mod:`tdabench.func.curvature` over the cached training chunks, a solver of
:mod:`tdabench.func.solvers` (injectable with ``solver=``) and per-sample gradients. Memory
(right-hand-side chunks, the dense-matrix limit) is sized by the planner
(:func:`tdabench.memory.planner_for`, ``memory_budget=``).

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

import copy
import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tdabench.algorithm.arguments import (
    ArnoldiArguments,
    IFCGArguments,
    IFExplicitArguments,
    LiSSAArguments,
    MethodArguments,
)
from tdabench.algorithm.base import BaseAttributor, accumulate_scores, arguments_from
from tdabench.errors import ConfigError, DataError, NotCachedError
from tdabench.func.curvature import (
    CurvatureOperator,
    ExactHessian,
    GaussNewton,
    OutputLoss,
    resolve_output_loss,
)
from tdabench.func.solvers import (
    ArnoldiSolver,
    CGSolver,
    DenseSolver,
    IHVPSolver,
    LiSSASolver,
    check_dense_size,
)
from tdabench.func.utils import (
    Batch,
    batch_size_of,
    check_finite,
    concat_batches,
    rechunk_batches,
    take_rows,
)
from tdabench.task import AttributionTask, LayerName

__all__ = [
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
]

logger = logging.getLogger(__name__)

#: Largest number of right-hand sides of one solver run when sized automatically.
_MAX_RHS_ROWS = 1024
#: Share of the memory budget for the solver's vectors (about 6 per right-hand side).
_SOLVER_FRACTION = 0.1
#: Share of the memory budget for the test side of ``attribute`` (gradients + solver vectors).
_TEST_FRACTION = 0.25
#: Samples used to check that a declared GGN output loss reproduces ``loss_func``.
_GGN_CHECK_SAMPLES = 32


_RELATIF_METHODS = (None, "l", "theta")


def _check_relatif(relatif_method: str | None) -> str | None:
    if relatif_method not in _RELATIF_METHODS:
        raise ConfigError(
            f"Unknown relatif_method {relatif_method!r}; pass None, 'l' (divide by "
            "sqrt(g_i^T H^-1 g_i)) or 'theta' (divide by ||H^-1 g_i||)"
        )
    return relatif_method


def _check_tensor_batch(batch: Batch) -> None:
    if isinstance(batch, Tensor):
        return
    if not all(isinstance(t, Tensor) for t in batch):
        raise DataError(
            "influence functions cache the training batches and need every element of a batch to be a "
            f"tensor, got types {[type(t).__name__ for t in batch]}; make the DataLoader yield tensors only"
        )


class _SampledCurvature:
    """LiSSA's view of the cached pool: ``sample(gen, b)`` is the curvature of ``b`` samples
    drawn without replacement (``torch.randperm`` with ``gen``)."""

    def __init__(
        self, pool: Batch, n: int, build: Callable[[Batch, int], CurvatureOperator]
    ) -> None:
        self.pool, self.n, self.build = pool, n, build

    def sample(self, gen: torch.Generator, b: int) -> CurvatureOperator:
        idx = torch.randperm(self.n, generator=gen)[:b]
        first = self.pool if isinstance(self.pool, Tensor) else self.pool[0]
        return self.build(take_rows(self.pool, idx.to(first.device)), b)


# ---------------------------------------------------------------------- base class
class _IFAttributorBase(BaseAttributor):
    """Shared machinery: caching the training data, per-checkpoint curvature and solver, streaming."""

    requires_cache = True

    #: Largest number of right-hand sides pushed through one solver run; more test (or train)
    #: gradients are solved in chunks of this many rows. ``None`` (default) picks as many rows
    #: as keep the solver's vectors (about 6 per row, ``d`` entries each) within
    #: :attr:`solver_memory_bytes`, between 1 and 1024.
    rhs_chunk_size: int | None = None
    #: Memory of the solver state when ``rhs_chunk_size`` is ``None``; ``None`` (default) is a
    #: tenth of the memory planner's budget.
    solver_memory_bytes: int | None = None
    #: Training samples per Hessian-vector-product chunk: the cached batches are regrouped
    #: into chunks of this size whatever the loader's batch size (fewer, larger products).
    #: Lower it if the products run out of memory.
    hvp_batch_size: int = 1024
    #: HVP mode of the methods that do not take ``mode``.
    mode: str = "rev-rev"
    #: Prepare every checkpoint's solver in :meth:`cache` (a factor or basis) rather than lazily.
    prepare_at_cache: bool = False
    #: ``attribute``/``self_attribute`` before :meth:`cache` cache the training loader (dattri).
    cache_on_demand: bool = True

    def __init__(
        self,
        task: AttributionTask,
        arguments: MethodArguments,
        device: str | torch.device = "cpu",
        solver: IHVPSolver | None = None,
    ) -> None:
        super().__init__(
            task,
            layer_name=arguments.layer_name,
            device=device,
            memory_budget=arguments.memory_budget,
        )
        self.arguments = arguments
        for name, value in vars(arguments).items():
            setattr(self, name, value)
        if solver is not None and not isinstance(solver, IHVPSolver):
            raise ConfigError(
                f"solver must be an IHVPSolver of tdabench.func.solvers, got {type(solver).__name__}"
            )
        self._injected = solver
        self.output_loss: OutputLoss | None = (
            resolve_output_loss(arguments.ggn_output, task.loss_func)
            if arguments.hessian == "ggn"
            else None
        )
        self._train_batches: list[Batch] = []
        self._n_cached = 0
        self._pool: Batch | None = None
        self._solvers: dict[int, IHVPSolver] = {}

    # ----------------------------------------------------------------- operators
    def _curvature(
        self,
        index: int,
        batches: list[Batch],
        n: int,
        mode: str,
        keep: bool = True,
        samples: bool = False,
    ) -> CurvatureOperator:
        """The curvature (``hessian=``) of the mean loss over ``batches`` (``n`` samples) at
        checkpoint ``index``."""
        flat = self._params(index)
        if self.output_loss is None:
            funcs = [
                self.task.summed_loss(b, index, self.layer_name, device=self.device)
                for b in batches
            ]
            sizes = [batch_size_of(b) for b in batches] if samples else None
            return ExactHessian(funcs, flat, n, mode, samples=sizes, keep=keep)
        out = self._flat_output(index)
        out_fns = [(lambda f, b=b: out(f, b)) for b in batches]
        targets = [self.output_loss.target(b) for b in batches]
        return GaussNewton(out_fns, targets, self.output_loss, flat, n, mode, keep=keep)

    def _flat_output(self, index: int) -> Callable[[Tensor, Batch], Tensor]:
        loss = self.output_loss
        assert loss is not None
        func = loss.output_func or (
            lambda params, batch: self.task.forward(params, batch[loss.input_index])
        )
        return self.task.flat_call(func, index, self.layer_name, self.device)

    def _check_output_loss(self) -> None:
        """Refuse a declared GGN output loss that does not reproduce ``loss_func``."""
        loss = self.output_loss
        if loss is None:
            return
        batch = take_rows(self._train_batches[0], slice(0, _GGN_CHECK_SAMPLES))
        flat = self._params(0)
        ours = loss.per_sample(self._flat_output(0)(flat, batch), loss.target(batch)).detach()
        theirs = self.task.per_sample_values(flat, batch, "loss", 0, self.layer_name).detach()
        if not torch.allclose(
            ours, theirs, rtol=1e-4, atol=1e-6 * float(theirs.abs().max()) + 1e-12
        ):
            raise ConfigError(
                f"hessian='ggn' with output loss {loss.kind!r} does not reproduce loss_func (max difference "
                f"{float((ours - theirs).abs().max()):.3g} on the first samples); pass ggn_output=OutputLoss(...) "
                "matching the loss (output_func, target_index), move an L2 penalty into regularization, "
                "or use hessian='exact'"
            )

    def _operator(self, index: int) -> Any:  # pragma: no cover - overridden
        """The operator the method's solver works on at checkpoint ``index``."""
        raise NotImplementedError

    def _make_solver(self, index: int) -> IHVPSolver:  # pragma: no cover - overridden
        """The method's own solver for checkpoint ``index``."""
        raise NotImplementedError

    def _solver_for(self, index: int) -> IHVPSolver:
        """The prepared solver of checkpoint ``index`` (solvers that keep calling their operator
        are kept for the current checkpoint only: they hold its linearised graphs)."""
        if index not in self._solvers:
            solver = (
                copy.copy(self._injected)
                if self._injected is not None
                else self._make_solver(index)
            )
            solver.prepare(self._operator(index), self.planner)
            if solver.holds_operator:
                self._solvers = {k: s for k, s in self._solvers.items() if not s.holds_operator}
            self._solvers[index] = solver
            self._after_prepare(index, solver)
        return self._solvers[index]

    def _after_prepare(self, index: int, solver: IHVPSolver) -> None:
        """Hook after a solver was prepared (logging, checks)."""

    def _ihvp(self, index: int, V: Tensor) -> Tensor:
        """Rows of ``(H + λI)^{-1} V`` in chunks of :meth:`_chunk_rows` rows; checks finiteness."""
        solver = self._solver_for(index)
        chunk = self._chunk_rows()
        parts = [solver.solve(V[s : s + chunk]) for s in range(0, V.shape[0], chunk)]
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
        if self.solver_memory_bytes is not None:
            return int(min(_MAX_RHS_ROWS, max(1, int(self.solver_memory_bytes) // max(per_row, 1))))
        return self.planner.rows(per_row, fraction=_SOLVER_FRACTION, maximum=_MAX_RHS_ROWS)

    def _validate_cache(self) -> None:
        """Checks of the cached data before any solver is prepared (overridden)."""

    # ----------------------------------------------------------------- API
    def cache(self, full_train_loader: Iterable[Batch]) -> None:
        """Keep the training batches on ``device`` and prepare the inverse-curvature operator of
        every checkpoint.

        Args:
            full_train_loader: loader over the training set whose mean loss defines ``H``;
                batches are tuples of tensors (or tensors) with a leading batch dimension.
                How it is batched does not change the result.

        Raises:
            DataError: the loader is empty or yields non-tensor elements.
            NonFiniteError: a training loss is NaN/inf at some checkpoint.
            CheckpointError: a checkpoint does not fit the model.
            ConfigError: a declared GGN output loss does not reproduce ``loss_func``.
        """
        start = time.perf_counter()
        self._cached = False
        batches = self._read_cache_loader(full_train_loader)
        self._train_batches = rechunk_batches(batches, max(1, int(self.hvp_batch_size)))
        self._pool = None
        self._solvers = {}
        self._check_output_loss()
        self._validate_cache()
        for k in range(self.task.num_checkpoints):
            flat = self._params(k)
            for bi, batch in enumerate(batches):
                vals = self.task.per_sample_values(flat, batch, "loss", k, self.layer_name)
                check_finite(
                    vals,
                    f"training loss at checkpoint {k}, cache batch {bi}",
                    fix="check the checkpoint, the data (NaN inputs?) and the loss function",
                )
            if self.prepare_at_cache:
                self._solver_for(k)  # factor / basis now: the method's cost belongs to cache
        self._cached = True
        logger.info(
            "%s cached %d samples in %d batches for %d checkpoint(s) in %.2fs",
            type(self).__name__,
            self._n_cached,
            len(batches),
            self.task.num_checkpoints,
            time.perf_counter() - start,
        )

    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """``(H + λI)^{-1} v`` for every row ``v`` of ``test_rep`` at checkpoint ``ckpt_idx``
        (dattri's name for the test-side transform of an inner-product attributor).

        Args:
            ckpt_idx: the checkpoint whose cached curvature is inverted.
            test_rep: ``(k, d)`` vectors over the parameters of :attr:`layer_name` (``d`` =
                their total size, in the model's parameter order).

        Returns:
            ``(k, d)``: the inverse-curvature products, on ``device`` in the task's dtype.

        Raises:
            NotCachedError: before :meth:`cache`. ConfigError: ``ckpt_idx`` out of range.
            ShapeError: ``test_rep`` is not ``(k, d)``.
        """
        if not self._cached:
            raise NotCachedError(
                f"{type(self).__name__}.transform_test_rep needs the cached curvature: "
                "call attributor.cache(train_loader) first"
            )
        return self._ihvp(self._checkpoint_index(ckpt_idx), self._test_rep(test_rep))

    def _read_cache_loader(self, loader: Iterable[Batch]) -> list[Batch]:
        batches: list[Batch] = []
        n = 0
        for batch in tqdm(
            self._batches(loader, "cache (full training) loader"),
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
        self._n_cached = n
        return batches

    def attribute(
        self,
        train_loader: Iterable[Batch],
        test_loader: Iterable[Batch],
        relatif_method: str | None = None,
    ) -> Tensor:
        """Influence scores of every training sample on every test sample.

        The test side is transformed once per checkpoint (target gradients, then one batched
        inverse-HVP), and the training loader is streamed once per checkpoint. Called before
        :meth:`cache`, the training loader is cached as the full training set first (dattri's
        behaviour; logged as a warning), except by :class:`IFAttributorArnoldi`.

        Args:
            train_loader: training samples to score (need not be the cache loader).
            test_loader: test samples.
            relatif_method: RelatIF normalisation of each training row (dattri's third
                argument), per checkpoint: ``None`` (none), ``"theta"`` (divide by
                ``max(||(H + λI)^{-1} ∇L(z_i)||, 1e-12)``) or ``"l"`` (divide by
                ``sqrt(max(∇t(z_i)ᵀ (H + λI)^{-1} ∇L(z_i), 1e-12))``). dattri 0.3.0's Arnoldi
                silently ignores it; ours applies it with the Arnoldi inverse.

        Returns:
            Tensor ``(n_train, n_test)`` on ``device``, averaged over checkpoints; high = the
            training sample helps the test sample.

        Raises:
            ConfigError: an unknown ``relatif_method``.
            NotCachedError: :class:`IFAttributorArnoldi` before :meth:`cache`.
        """
        relatif = _check_relatif(relatif_method)
        self._cache_on_demand(train_loader)
        total: Tensor | None = None
        K = self.task.num_checkpoints
        parts = self._test_parts(test_loader)
        for k in range(K):
            # one part unless the test gradients exceed their budget share
            columns = [self._score_part(k, part, train_loader, relatif) for part in parts]
            total = accumulate_scores(total, torch.cat(columns, dim=1), "train loader")
        assert total is not None
        return total / K

    def _score_part(
        self, k: int, part: Iterable[Batch], train_loader: Iterable[Batch], relatif: str | None
    ) -> Tensor:
        """Scores ``(n_train, n_part)`` of one part of the test loader at checkpoint ``k``."""
        g_test = self._all_grads(part, "target", k, "test loader")
        left, x_test = self._test_factors(k, g_test)
        blocks = []
        for batch, g_train in self._batch_grads(
            train_loader, "loss", k, "train loader", f"IF attribute (ckpt {k})"
        ):
            block = (g_train if left is None else g_train @ left) @ x_test.T
            if relatif is not None:
                block = block / self._relatif_denominator(k, batch, g_train, relatif).unsqueeze(1)
            blocks.append(block)
        return torch.cat(blocks, dim=0)

    def _relatif_denominator(self, k: int, batch: Batch, g_loss: Tensor, relatif: str) -> Tensor:
        """RelatIF's per-row denominator ``(B,)`` of the training rows ``g_loss`` ``(B, d)``."""
        x = self._ihvp(k, g_loss)
        if relatif == "theta":
            return x.norm(dim=1).clamp_min(1e-12)
        g_tgt = self._target_grads(k, batch, g_loss)
        return (g_tgt * x).sum(dim=1).clamp_min(1e-12).sqrt()

    def _target_grads(self, k: int, batch: Batch, g_loss: Tensor) -> Tensor:
        """Target gradients ``(B, d)`` of ``batch`` (``g_loss`` when the target is the loss)."""
        if self.task.target_func is self.task.loss_func:
            return g_loss
        return self.task.per_sample_grads(self._params(k), batch, "target", k, self.layer_name)

    def _cache_on_demand(self, train_loader: Iterable[Batch]) -> None:
        """dattri's behaviour when ``cache`` was not called: the training loader is cached as the
        full training set (warned). Methods that cannot (``cache_on_demand = False``) raise."""
        if self._cached:
            return
        if not self.cache_on_demand:
            self._require_cache()
        logger.warning(
            "%s: attribute/self_attribute called before cache(); caching the train loader as the "
            "full training set (as dattri does). Call cache(full_train_loader) to choose it.",
            type(self).__name__,
        )
        self.cache(train_loader)

    def _test_parts(self, test_loader: Iterable[Batch]) -> list[Iterable[Batch]]:
        """The test loader as groups of whole batches whose gradients (and solver vectors) fit
        :data:`_TEST_FRACTION` of the memory budget: one group (the loader itself) when they all
        fit, so the training gradients are computed once per checkpoint; otherwise the training
        loader is streamed once per group (time traded for memory, logged)."""
        per_row = 8 * self.spec.dim * torch.empty((), dtype=self.dtype).element_size()
        rows = self.planner.rows(per_row, fraction=_TEST_FRACTION)
        parts: list[list[Batch]] = [[]]
        count = 0
        for batch in self._batches(test_loader, "test loader"):
            n = batch_size_of(batch)
            if parts[-1] and count + n > rows:
                parts.append([])
                count = 0
            parts[-1].append(batch)
            count += n
        if len(parts) > 1:
            logger.info(
                "IF test gradients exceed the memory budget: %d test parts of <= %d rows, the "
                "training loader is streamed once per part",
                len(parts),
                rows,
            )
        return list(parts)

    def self_attribute(
        self, train_loader: Iterable[Batch], relatif_method: str | None = None
    ) -> Tensor:
        """Self-influence ``∇t(z_i)ᵀ (H + λI)^{-1} ∇L(z_i)`` of each training sample.

        Equals the diagonal of ``attribute(train_loader, train_loader, relatif_method)`` (the
        target gradient plays the test side, as there). Works batch by batch, so any number of
        batches is fine. Caches on demand as :meth:`attribute`.

        Args:
            train_loader: training samples.
            relatif_method: ``None``, ``"theta"`` or ``"l"``, as in :meth:`attribute`.

        Returns:
            Tensor ``(n_train,)``, averaged over checkpoints.
        """
        relatif = _check_relatif(relatif_method)
        self._cache_on_demand(train_loader)
        total: Tensor | None = None
        K = self.task.num_checkpoints
        for k in range(K):
            parts = []
            for batch, g_loss in self._batch_grads(
                train_loader, "loss", k, "train loader", f"IF self-attribute (ckpt {k})"
            ):
                own = (g_loss * self._ihvp(k, self._target_grads(k, batch, g_loss))).sum(dim=1)
                if relatif is not None:
                    own = own / self._relatif_denominator(k, batch, g_loss, relatif)
                parts.append(own)
            total = accumulate_scores(total, torch.cat(parts), "train loader")
        assert total is not None
        return total / K

    def hyperparameters(self) -> dict[str, Any]:
        out = {"method": type(self).__name__, **self.arguments.result_dict()}
        out["num_checkpoints"] = self.task.num_checkpoints
        if self._injected is not None:
            out.update(self._injected.describe())
        return out


# ---------------------------------------------------------------------- explicit
class IFAttributorExplicit(_IFAttributorBase):
    """Influence functions with the dense curvature matrix, factorised once per checkpoint.

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters (the Hessian is then the sub-block of those
            parameters, the others held fixed); ``None`` uses all.
        device: where the matrix is formed and solved.
        regularization: ``λ >= 0`` added to the diagonal.
        max_dense_bytes: largest dense ``d x d`` matrix allowed, in bytes; ``None`` means the
            memory planner's budget (``memory_budget``). Larger problems raise
            :class:`~tdabench.errors.MemoryLimitError` at construction. One factor of this
            size is kept per checkpoint, and factorising briefly needs about twice it.
        hessian: ``"exact"`` (the Hessian) or ``"ggn"`` (the Gauss-Newton matrix).
        ggn_output: the output loss of the GGN (see the module docstring).
        solver: an :class:`~tdabench.func.solvers.IHVPSolver` replacing the dense solve.
        memory_budget: bytes (or ``"8GiB"``, or a fraction of the device) the method may hold.

    The matrix is assembled from curvature-vector products (reverse-over-reverse, the graph of
    each cached chunk built once) applied to the identity in chunks. A positive-definite
    ``H + λI`` is Cholesky-factorised; otherwise an LU factorisation is used (a warning is
    logged: the IF of a non-convex point is then not a LOO estimate).
    """

    prepare_at_cache = True

    # Spelled out: dattri's constructor signature, then tdabench's keywords (hessian=, solver=, ...).
    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        regularization: float = 0.0,
        max_dense_bytes: int | None = None,
        hessian: str = "exact",
        ggn_output: str | OutputLoss | None = None,
        solver: IHVPSolver | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        super().__init__(task, arguments_from(IFExplicitArguments, locals()), device, solver)
        if solver is None:
            check_dense_size(self.spec.dim, self.dtype, max_dense_bytes, planner=self.planner)

    def _operator(self, index: int) -> CurvatureOperator:
        return self._curvature(index, self._train_batches, self._n_cached, "rev-rev", keep=False)

    def _make_solver(self, index: int) -> IHVPSolver:
        return DenseSolver(self.regularization, self.max_dense_bytes)


# ---------------------------------------------------------------------- CG
class IFAttributorCG(_IFAttributorBase):
    """Influence functions with batched conjugate gradient.

    Each CG iteration applies the curvature to all right-hand sides at once, streaming over
    the cached training chunks (kept on ``device``, their graphs linearised once).

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters; ``None`` uses all.
        device: where gradients, products and the solve run.
        max_iter: maximal number of CG iterations (>= 1).
        tol: relative residual tolerance (>= 0): a right-hand side ``b`` stops once
            ``||b - (H + λI) x|| <= tol * ||b||``; 0 runs all ``max_iter`` iterations.
        mode: ``"rev-rev"`` (reverse-over-reverse) or ``"rev-fwd"`` (forward-over-reverse)
            products.
        regularization: ``λ >= 0`` added to the diagonal (CG needs ``H + λI`` positive
            definite; the GGN is positive semi-definite, so any ``λ > 0`` does).
        hessian: ``"exact"`` or ``"ggn"``.
        ggn_output: the output loss of the GGN (see the module docstring).
        solver: an :class:`~tdabench.func.solvers.IHVPSolver` replacing CG.
        memory_budget: bytes the method may hold (see :func:`tdabench.memory.planner_for`).
    """

    # Spelled out: dattri's constructor signature, then tdabench's keywords (hessian=, solver=, ...).
    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        max_iter: int = 10,
        tol: float = 1e-7,
        mode: str = "rev-rev",
        regularization: float = 0.0,
        hessian: str = "exact",
        ggn_output: str | OutputLoss | None = None,
        solver: IHVPSolver | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        super().__init__(task, arguments_from(IFCGArguments, locals()), device, solver)

    def _operator(self, index: int) -> CurvatureOperator:
        return self._curvature(index, self._train_batches, self._n_cached, self.mode)

    def _make_solver(self, index: int) -> IHVPSolver:
        return CGSolver(self.max_iter, self.tol, self.regularization)


# ---------------------------------------------------------------------- LiSSA
class IFAttributorLiSSA(_IFAttributorBase):
    """Influence functions with the LiSSA stochastic recursion.

    Step ``t`` uses the curvature of the mean loss on ``batch_size`` cached samples drawn
    without replacement by a generator seeded from ``(seed, checkpoint index)``; every
    solve restarts that generator, so results are reproducible and do not depend on how
    the right-hand sides are chunked. The estimate converges to
    ``(H + damping * scaling * I)^{-1} v``.

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters; ``None`` uses all.
        device: where gradients, products and the recursion run.
        batch_size: samples per recursion step (>= 1, at most the number cached;
            ``batch_size = n`` makes the recursion deterministic).
        num_repeat: independent recursions averaged (>= 1).
        recursion_depth: steps per recursion (>= 1).
        damping: in ``[0, 1)``; shrinks the previous iterate each step.
        scaling: ``> 0``; must exceed half the largest eigenvalue for convergence.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` products.
        seed: seed of the mini-batch sampler.
        hessian: ``"exact"`` or ``"ggn"``.
        ggn_output: the output loss of the GGN (see the module docstring).
        solver: an :class:`~tdabench.func.solvers.IHVPSolver` replacing LiSSA.
        memory_budget: bytes the method may hold.
    """

    # Spelled out: dattri's constructor signature, then tdabench's keywords (hessian=, solver=, ...).
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
        hessian: str = "exact",
        ggn_output: str | OutputLoss | None = None,
        solver: IHVPSolver | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        super().__init__(task, arguments_from(LiSSAArguments, locals()), device, solver)

    def _validate_cache(self) -> None:
        if self.batch_size > self._n_cached:
            raise ConfigError(
                f"LiSSA batch_size={self.batch_size} exceeds the {self._n_cached} cached training samples; "
                f"pass batch_size <= {self._n_cached}"
            )

    def _operator(self, index: int) -> _SampledCurvature:
        if self._pool is None:
            self._pool = concat_batches(self._train_batches)

        def build(batch: Batch, b: int) -> CurvatureOperator:
            return self._curvature(index, [batch], b, self.mode, samples=True)

        return _SampledCurvature(self._pool, self._n_cached, build)

    def _make_solver(self, index: int) -> IHVPSolver:
        return LiSSASolver(
            self.batch_size,
            self.num_repeat,
            self.recursion_depth,
            self.damping,
            self.scaling,
            seed=(self.seed * 1_000_003 + index) % 2**63,
        )


# ---------------------------------------------------------------------- Arnoldi
class IFAttributorArnoldi(_IFAttributorBase):
    """Influence functions with a low-rank Arnoldi eigenbasis of the curvature.

    At :meth:`cache`, Arnoldi (seeded start vector, full re-orthogonalisation) runs on the
    curvature of the mean loss over the first ``max(1, floor(precompute_data_ratio * n))``
    cached samples, keeping the ``proj_dim`` eigenpairs of largest magnitude;
    ``(H + λI)^{-1} v`` is then ``U diag(1 / (values + λ)) Uᵀ v`` (zero outside the basis).

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters; ``None`` uses all.
        device: where products and the basis live.
        precompute_data_ratio: fraction in ``(0, 1]`` of the cached samples used for the basis.
        proj_dim: number of eigenpairs kept (>= 1; at most ``max_iter``).
        max_iter: Krylov iterations (>= 1), i.e. products per checkpoint.
        norm_constant: ``> 0``; the matrix is divided by it during the iteration (range only).
        tol: ``>= 0``; stop when the Krylov space is invariant to this tolerance, and drop
            eigenvalues below ``tol`` times the largest.
        regularization: ``λ >= 0`` added to the kept eigenvalues.
        seed: seed of the Arnoldi start vector.
        hessian: ``"exact"`` or ``"ggn"``.
        ggn_output: the output loss of the GGN (see the module docstring).
        residual: keep the part of each gradient outside the basis, divided by
            ``regularization`` (needs ``regularization > 0``): the exact inverse of the rank-r
            truncation plus ``λI`` instead of dattri's projection onto the basis.
        solver: an :class:`~tdabench.func.solvers.IHVPSolver` replacing Arnoldi.
        memory_budget: bytes the method may hold.
    """

    #: Training samples per product chunk. Arnoldi multiplies one vector at a time, so
    #: replaying a chunk needs only about one forward pass of activations (the linearised
    #: graphs of all chunks are kept either way): chunks are 8x those of the other methods.
    hvp_batch_size: int = 8192
    prepare_at_cache = True
    cache_on_demand = False  # dattri's Arnoldi refuses too (ValueError)

    # Spelled out: dattri's constructor signature, then tdabench's keywords (hessian=, solver=, ...).
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
        hessian: str = "exact",
        ggn_output: str | OutputLoss | None = None,
        residual: bool = False,
        solver: IHVPSolver | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        super().__init__(task, arguments_from(ArnoldiArguments, locals()), device, solver)
        if self.max_iter < self.proj_dim:
            logger.warning(
                "IFAttributorArnoldi: max_iter=%d < proj_dim=%d keeps at most %d eigenpairs",
                self.max_iter,
                self.proj_dim,
                self.max_iter,
            )

    def _require_cache(self) -> None:
        if not self._cached:
            raise NotCachedError(
                "The Arnoldi projector has not been cached: IFAttributorArnoldi.attribute/"
                "self_attribute needs cache(full_train_loader) first; call attributor.cache(train_loader)"
            )

    def _precompute_batches(self) -> tuple[list[Batch], int]:
        m = max(1, math.floor(self.precompute_data_ratio * self._n_cached + 1e-9))
        out: list[Batch] = []
        seen = 0
        for batch in self._train_batches:
            if seen >= m:
                break
            b = batch_size_of(batch)
            take = min(b, m - seen)
            out.append(batch if take == b else take_rows(batch, slice(0, take)))
            seen += take
        return out, m

    def _operator(self, index: int) -> CurvatureOperator:
        batches, m = self._precompute_batches()
        return self._curvature(index, batches, m, "rev-rev")

    def _make_solver(self, index: int) -> IHVPSolver:
        return ArnoldiSolver(
            self.proj_dim,
            self.max_iter,
            self.tol,
            self.norm_constant,
            self.seed,
            self.regularization,
            self.residual,
        )

    def _after_prepare(self, index: int, solver: IHVPSolver) -> None:
        basis = getattr(solver, "basis", None)
        if basis is None:
            return
        if bool((basis.values + self.regularization <= 0).any()):
            logger.warning(
                "Arnoldi basis at checkpoint %d has eigenvalues <= -regularization; the inverse is "
                "indefinite or unbounded: raise regularization",
                index,
            )
        logger.info("Arnoldi checkpoint %d: kept %d eigenpairs", index, basis.values.numel())

    def _test_factors(self, index: int, g_test: Tensor) -> tuple[Tensor | None, Tensor]:
        # (H + λI)^{-1} G_testᵀ = U C^T with C = G_test U diag(1 / (values + λ)): scoring
        # through the rank-r basis costs n_train·d·r instead of n_train·d·n_test.
        basis = getattr(self._solver_for(index), "basis", None)
        if (
            basis is None
            or self.residual
            or basis.values.numel() >= min(g_test.shape[0], self.spec.dim)
        ):
            return super()._test_factors(index, g_test)
        coeff = (g_test @ basis.vectors) / (basis.values + self.regularization)
        check_finite(
            coeff,
            f"inverse-Hessian-vector product ({type(self).__name__}, checkpoint {index})",
            fix="the Hessian is (near) singular or the solver diverged: pass regularization > 0",
        )
        return basis.vectors, coeff


_ELSEWHERE = {
    "IFAttributorEKFAC": "tdabench.algorithm.ekfac",
    "IFAttributorKFAC": "tdabench.algorithm.ekfac",
    "IFAttributorDataInf": "tdabench.algorithm.datainf",
}


def __getattr__(name: str) -> Any:
    """dattri's ``algorithm.influence_function`` also exports EK-FAC and DataInf (lazy: no cycle)."""
    if name in _ELSEWHERE:
        import importlib

        return getattr(importlib.import_module(_ELSEWHERE[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
