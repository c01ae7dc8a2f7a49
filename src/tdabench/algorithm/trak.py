"""TRAK: attribution with randomly projected after-kernel features (Park et al., 2023).

For every checkpoint ``k`` of the task (an ensemble of independently trained models, or
one model), with ``f`` the task's ``target_func`` (the "model output function", e.g. the
margin ``log p / (1 - p)``) and ``P_k`` a random projection with seed ``seed + k``:

- ``Phi_k``: rows ``P_k grad f(train_i)`` for the *full* training set (``cache``),
- ``X_k = (Phi_k^T Phi_k + lambda I)^{-1}``  (``proj_dim x proj_dim``; with ``lambda = 0``
  and a singular kernel, its pseudo-inverse: the limit ``lambda -> 0+`` of the scores),
- ``Q_k = diag(1 - p_k(train_i))`` with ``p`` from ``correct_probability_func``.

Scores, following Algorithm 1 of the TRAK paper (and the reference library), average the
kernel term and the ``Q`` term over checkpoints separately::

    score[i, j] = [ mean_k  phi_k(train_i) X_k phi_k(test_j) ]  *  [ mean_k (1 - p_k(train_i)) ]

(With one checkpoint this is exactly ``Phi_test X Phi_train^T Q`` transposed.) The result
is returned as ``(n_train, n_test)``: unlike the reference's TRAK, ``attribute`` takes
``(train_loader, test_loader)`` in that order, like every attributor here. A positive
score means the training sample raises the test sample's output ``f`` (helps it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tdabench.algorithm.arguments import TRAK_DEFAULT_PROJECTOR, TRAKArguments
from tdabench.algorithm.base import BaseAttributor
from tdabench.errors import ConfigError, DataError, NonFiniteError, NotCachedError
from tdabench.func.projection import Projector, ProjectorSet, resolve_projector_kwargs
from tdabench.func.utils import Batch, check_finite, per_sample_values, same_samples
from tdabench.task import AttributionTask, LayerName

__all__ = ["TRAKAttributor"]

logger = logging.getLogger(__name__)

_PROB_TOL = 1e-6


class TRAKAttributor(BaseAttributor):
    """TRAK with a random projection per checkpoint.

    Args:
        task: the task; ``target_func`` is the model output function ``f`` whose
            gradients are projected (train and test side); each checkpoint is one model of
            the ensemble.
        correct_probability_func: ``p(params, data) -> scalar``, the probability of the
            true class (evaluated per sample, like ``loss_func``); must lie in ``[0, 1]``.
        projector_kwargs: keys among ``proj_dim`` (default 512), ``proj_type`` (default
            ``"gaussian"``; ``"sparse"`` for a CountSketch, which projects in ``O(d)`` per
            sample instead of ``O(d k)`` and gave the same LDS on the MNIST benchmarks,
            see benchmarks/projection_quality.py; ``"identity"`` for no projection), ``seed`` (default 0;
            checkpoint ``k`` uses ``seed + k``), ``max_chunk_bytes``. ``None`` uses the defaults.
        layer_name: restrict gradients to these parameters.
        device: where gradients, solves and scores live (scores are returned there).
        regularization: ``lambda >= 0`` added to ``Phi^T Phi``. With ``lambda = 0`` and a
            singular kernel (fewer independent training samples than ``proj_dim``) the
            pseudo-inverse is used (the limit ``lambda -> 0+``, logged as a warning).
        memory_budget: bytes (or ``"8GiB"``, or a fraction of the device) the method may hold;
            gradient pieces and projection chunks are sized from it (results do not depend on it).
    """

    requires_cache = True

    def __init__(
        self,
        task: AttributionTask,
        correct_probability_func: Callable[[dict[str, Tensor], Batch], Tensor],
        projector_kwargs: Mapping[str, Any] | None = None,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        regularization: float = 0.0,
        memory_budget: int | float | str | None = None,
    ) -> None:
        super().__init__(task, layer_name, device, memory_budget)
        if not callable(correct_probability_func):
            raise ConfigError("correct_probability_func must be callable as p(params, data)")
        self.arguments = TRAKArguments(
            projector_kwargs=projector_kwargs,
            layer_name=layer_name,
            regularization=regularization,
            memory_budget=memory_budget,
        )
        reg = self.arguments.regularization
        self.correct_probability_func = correct_probability_func
        self.regularization = reg
        self.projector_kwargs = resolve_projector_kwargs(projector_kwargs, TRAK_DEFAULT_PROJECTOR)
        self._xtx_inv: list[Tensor] = []
        self.num_cached_train = 0
        self._projectors: ProjectorSet | None = None

    # ------------------------------------------------------------------ helpers
    def _projector(self, index: int) -> Projector:
        # one set per attributor: cache() and attribute() share the drawn matrices
        if self._projectors is None:
            self._projectors = ProjectorSet(
                self.projector_kwargs,
                self.spec.dim,
                self.device,
                self.dtype,
                memory_budget=self.memory_budget,
            )
        proj = self._projectors.get(index)
        assert proj is not None
        return proj

    def _prob_func(self, index: int) -> Callable[[Tensor, Batch], Tensor]:
        spec = self.spec
        fixed = {
            n: t.to(self.device)
            for n, t in self.task.get_params(index).items()
            if n not in spec.names
        }
        user = self.task.adapt(self.correct_probability_func, "correct_probability_func")

        def f(flat: Tensor, data: Batch) -> Tensor:
            params = dict(fixed)
            params.update(spec.unflatten(flat))
            return user(params, data)

        return f

    def _phi(self, flat: Tensor, batch: Batch, index: int, projector: Projector) -> Tensor:
        return self._projected_grads(flat, batch, "target", index, projector)

    def _one_minus_p(self, flat: Tensor, batch: Batch, index: int) -> Tensor:
        p = per_sample_values(self._prob_func(index), flat, batch)
        check_finite(
            p, "correct_probability_func output", "return finite probabilities of the true class"
        )
        if bool(((p < -_PROB_TOL) | (p > 1 + _PROB_TOL)).any()):
            raise ConfigError(
                f"correct_probability_func returned values outside [0, 1] (min {float(p.min()):.4g}, "
                f"max {float(p.max()):.4g}); it must return the probability of the true class, not a logit"
            )
        return (1.0 - p).to(self.dtype)

    def _train_terms(self, loader: Iterable[Batch], index: int, projector: Projector, what: str):
        """Yield ``(phi (B, k), 1 - p (B,))`` per batch of ``loader`` at checkpoint ``index``
        (``loader`` may be a :class:`~tdabench.algorithm.base.ReplayLoader`)."""
        flat = self._params(index)
        batches = tqdm(
            self._batches(loader, what), desc=f"TRAK ckpt {index}", disable=None, leave=False
        )
        for batch in batches:
            yield self._phi(flat, batch, index, projector), self._one_minus_p(flat, batch, index)

    @staticmethod
    def _hash_batch(h: Any, batch: Batch) -> None:
        """Add every tensor of ``batch`` (shape, dtype and content) to the hash ``h``."""
        for t in batch if isinstance(batch, (tuple, list)) else (batch,):
            if isinstance(t, Tensor):
                c = t.detach().cpu().contiguous()
                h.update(str((tuple(c.shape), str(c.dtype))).encode())
                h.update(
                    c.numpy().tobytes()
                    if c.dtype != torch.bfloat16
                    else c.float().numpy().tobytes()
                )

    def _fingerprint(self, loader: Iterable[Batch]) -> str:
        """Content hash of every tensor the loader yields (order and shapes included)."""
        h = hashlib.sha256()
        for batch in self._batches(loader, "train loader"):
            self._hash_batch(h, batch)
        return h.hexdigest()

    def _train_terms_all(
        self, loader: Iterable[Batch], index: int, projector: Projector, is_cached: bool
    ) -> tuple[Tensor, Tensor]:
        """``(Phi (n, k), 1 - p (n,))`` of ``loader``: the cached ones when ``is_cached`` (the
        loader has the content of the cache loader)."""
        if is_cached:
            phi, q = self._train_features[index]
            return phi, q.clone()  # callers accumulate into q in place
        phis, qs = [], []
        for phi, q in self._train_terms(loader, index, projector, "train loader"):
            phis.append(phi)
            qs.append(q)
        return torch.cat(phis), torch.cat(qs)

    def _ensemble_mean(
        self,
        train_loader: Iterable[Batch],
        kernel_term: Callable[[int, Tensor, Projector, Tensor], Tensor],
    ) -> tuple[Tensor, Tensor]:
        """``(mean_k kernel_term_k, mean_k (1 - p_k))`` over the checkpoints (TRAK's Algorithm 1
        ensemble), in float64; ``kernel_term(index, inv, projector, phi_train)``."""
        kernel: Tensor | None = None
        q_sum: Tensor | None = None
        train_loader = self._replay(train_loader, "train loader")
        # one content check per call (it reads the loader once; replayed below if it differs)
        is_cached = (
            getattr(self, "_train_features", None) is not None
            and self._fingerprint(train_loader) == self._train_fingerprint
        )
        for index, inv in enumerate(self._xtx_inv):
            projector = self._projector(index)
            phi, q_term = self._train_terms_all(train_loader, index, projector, is_cached)
            k_term = kernel_term(index, inv, projector, phi)
            if kernel is None:
                kernel, q_sum = k_term, q_term
            elif kernel.shape != k_term.shape:
                raise DataError(
                    "the loaders yielded a different number of samples on a later checkpoint; fix their order/size"
                )
            else:
                kernel += k_term
                q_sum += q_term
        assert kernel is not None and q_sum is not None
        m = len(self._xtx_inv)
        return kernel.div_(m), q_sum.to(torch.float64) / m

    def _dattri_forms(
        self, train: Any, test: Any, test_kw: Any, train_kw: Any
    ) -> tuple[Iterable[Batch], Iterable[Batch]]:
        """``(train, test)`` from tdabench's or dattri's call forms (see :meth:`attribute`)."""
        if (test_kw is not None and test is not None) or (
            train_kw is not None and train is not None and test is not None
        ):
            raise ConfigError(
                "a loader was given both by position and by keyword; use attribute(train, test)"
            )
        if test_kw is not None:  # dattri's keywords (or attribute(test_dataloader=...))
            test, train = test_kw, train_kw if train_kw is not None else train
            if not self._cached and train is not None:  # unambiguous roles: cache on demand
                self.cache(train)
        elif not self._cached and train is not None and test is not None:
            if same_samples(train, test):  # roles interchangeable: cache on demand
                self.cache(train)
                return train, test
            raise NotCachedError(
                "TRAKAttributor.attribute(a, b) needs cache(train_loader) first; without a cache the "
                "roles of a and b are ambiguous (tdabench's order is (train, test), dattri's "
                "positional order is (test, train)): call cache(train_loader) and then "
                "attribute(train_loader, test_loader) or attribute(test_loader), or pass "
                "attribute(test_dataloader=..., train_dataloader=...)"
            )
        elif test is None and train is not None:  # dattri's attribute(test_loader) after cache()
            self._require_cache()
            train, test = None, train
        if test is None:
            raise ConfigError("attribute needs a test loader: attribute(train_loader, test_loader)")
        if train is None:
            self._require_cache()
            return self._cached_train_loader, test
        if self._cached and train is not None and test is not None:
            fp_train = self._fingerprint(self._replay(train, "train loader"))
            if (
                fp_train != self._train_fingerprint
                and self._fingerprint(self._replay(test, "test loader")) == self._train_fingerprint
            ):
                raise ConfigError(
                    "attribute(a, b) got the cached training set second: tdabench's order is "
                    "attribute(train_loader, test_loader) (dattri's positional order is "
                    "(test, train)); call attribute(train_loader, test_loader), "
                    "attribute(test_loader) or attribute(test_dataloader=..., train_dataloader=...)"
                )
        return train, test

    # ------------------------------------------------------------------ API
    def _kernel_inverse(self, xtx: Tensor, index: int, count: int) -> Tensor:
        """``(xtx + lambda I)^{-1}`` (float64, Cholesky) of a ``(k, k)`` kernel.

        A kernel singular to float64 precision (its Cholesky pivots span more than
        ``1 / (k * eps)``) is inverted by :meth:`_minimum_norm_inverse` when ``lambda = 0``
        and refused when ``lambda > 0`` (then ``lambda`` is below the kernel's precision).
        """
        k = xtx.shape[0]
        xtx.diagonal().add_(self.regularization)
        chol, info = torch.linalg.cholesky_ex(xtx)
        diag = chol.diagonal()
        if (
            int(info) != 0
            or float(diag.min() / diag.max()) ** 2 < k * torch.finfo(torch.float64).eps
        ):
            if self.regularization == 0:
                return self._minimum_norm_inverse(xtx, index, count)
            raise ConfigError(
                f"Phi^T Phi + {self.regularization} I of checkpoint {index} is singular to float64 "
                f"precision ({count} training samples, {k} projected dimensions): regularization "
                f"{self.regularization} is below the kernel's precision; raise it, or set 0 for the "
                "minimum-norm (pseudo-inverse) solution"
            )
        inv = torch.cholesky_inverse(chol)
        if not bool(torch.isfinite(inv).all()):
            raise NonFiniteError(
                f"the TRAK kernel inverse of checkpoint {index} is not finite; set regularization > 0"
            )
        return inv

    @staticmethod
    def _minimum_norm_inverse(xtx: Tensor, index: int, count: int) -> Tensor:
        """Pseudo-inverse of a singular PSD kernel ``xtx`` ``(k, k)`` (float64, by ``eigh``;
        eigenvalues at most ``k * eps * max`` count as zero), logged as a warning.

        For every training feature row ``phi`` (a row of ``Phi``, so in the range of
        ``Phi^T Phi``) ``phi (Phi^T Phi + lambda I)^{-1} v -> phi (Phi^T Phi)^+ v`` as
        ``lambda -> 0+``: the scores are the limit of the regularized ones (the minimum-norm
        least-squares solution), where the reference library solves the singular system.
        """
        k = xtx.shape[0]
        evals, evecs = torch.linalg.eigh(xtx)
        top = float(evals.max().clamp(min=0.0))
        keep = evals > k * torch.finfo(torch.float64).eps * top
        rank = int(keep.sum())
        logger.warning(
            "TRAK: Phi^T Phi of checkpoint %d is singular (%d training samples, %d projected "
            "dimensions, rank %d); using its pseudo-inverse, the minimum-norm solution (the limit "
            "of regularization -> 0+). Set regularization > 0 (or proj_dim < %d) for a "
            "well-conditioned kernel",
            index,
            count,
            k,
            rank,
            count,
        )
        basis = evecs[:, keep]
        return (basis / evals[keep]) @ basis.T

    def cache(self, full_train_loader: Iterable[Batch]) -> None:
        """Compute ``(Phi_k^T Phi_k + lambda I)^{-1}`` for every checkpoint from the full
        training set (``proj_dim x proj_dim`` each, accumulated and inverted in float64 by
        Cholesky). ``attribute`` forms ``X_k phi_k(test)`` in float64 and multiplies it with the
        training features in their own dtype (the model's), accumulating the ensemble in float64;
        ``self_attribute`` works in float64. Scores are cast back to the model dtype.

        A kernel singular to float64 precision (fewer independent training samples than
        ``proj_dim``) with ``regularization = 0`` is pseudo-inverted: the minimum-norm solution,
        the limit ``regularization -> 0+`` of the scores, with a logged warning.

        Raises:
            ConfigError: if ``regularization > 0`` is too small for a kernel singular to float64
                precision (its Cholesky pivots span more than ``1 / (proj_dim * eps)``).
        """
        inverses = []
        features: list[tuple[Tensor, Tensor]] = []
        n = None
        data = self._replay(full_train_loader, "full train loader")
        hasher = hashlib.sha256()

        def hashed(batches: Iterable[Batch]) -> Iterable[Batch]:
            for batch in batches:
                self._hash_batch(hasher, batch)
                yield batch

        for index in range(self.task.num_checkpoints):
            projector = self._projector(index)
            k = projector.proj_dim
            xtx = torch.zeros(k, k, dtype=torch.float64, device=self.device)
            count = 0
            phis, qs = [], []
            # the content hash is taken on the first pass (the same bytes _fingerprint reads)
            for phi, q in self._train_terms(
                hashed(data) if index == 0 else data, index, projector, "full train loader"
            ):
                phis.append(phi)
                qs.append(q)
                phi = phi.to(torch.float64)
                xtx.addmm_(phi.T, phi)
                count += phi.shape[0]
            features.append((torch.cat(phis), torch.cat(qs)))
            if n is not None and count != n:
                raise DataError(
                    "the full train loader yielded a different number of samples on a later pass; fix its size"
                )
            n = count
            inverses.append(self._kernel_inverse(xtx, index, count))
        self._xtx_inv = inverses
        # The cached training features are reused when attribute()/self_attribute() get a
        # train loader with the same content (n x proj_dim per checkpoint kept in memory).
        self._train_features = features
        self._train_fingerprint = hasher.hexdigest()
        self._cached_train_loader = data
        self.num_cached_train = int(n or 0)
        self._cached = True

    def attribute(
        self,
        train_loader: Iterable[Batch] | None = None,
        test_loader: Iterable[Batch] | None = None,
        *,
        test_dataloader: Iterable[Batch] | None = None,
        train_dataloader: Iterable[Batch] | None = None,
    ) -> Tensor:
        """TRAK scores ``(n_train, n_test)``, as every tdabench method: ``attribute(train, test)``.

        dattri's forms are accepted too, with the same result: ``attribute(test_loader)`` after
        :meth:`cache` (the cached training set is scored) and the keywords
        ``attribute(test_dataloader=..., train_dataloader=...)``. Two positional loaders are
        always ``(train, test)``; if the *second* one is the cached training set and the first is
        not (dattri's positional order ``(test, train)``), a :class:`ConfigError` names the
        difference instead of returning scores of the swapped roles.

        Args:
            train_loader: training samples to score (fixed order; any subset of the cached set).
            test_loader: test samples.
            test_dataloader: dattri's keyword for ``test_loader``.
            train_dataloader: dattri's keyword for ``train_loader``.

        Returns:
            Tensor ``(n_train, n_test)`` on ``device``.

        Raises:
            NotCachedError: before :meth:`cache` (dattri's one-loader form needs the cache).
            ConfigError: dattri's positional order, or a loader given twice.
        """
        train_loader, test_loader = self._dattri_forms(
            train_loader, test_loader, test_dataloader, train_dataloader
        )
        self._require_cache()
        test_loader = self._replay(test_loader, "test loader")

        def kernel_term(index: int, inv: Tensor, projector: Projector, phi: Tensor) -> Tensor:
            flat = self._params(index)
            test = torch.cat(
                [
                    self._phi(flat, b, index, projector)
                    for b in self._batches(test_loader, "test loader")
                ]
            ).to(torch.float64)
            y = inv @ test.T  # (k, n_test) in float64; inv is symmetric
            if phi.dtype == torch.float64:
                return phi @ y
            # the O(n_train * n_test * k) product runs in the features' dtype (float32 GEMMs are
            # several times faster than float64 ones); X phi_test is formed in float64 first
            return (phi @ y.to(phi.dtype)).to(torch.float64)

        kernel, q = self._ensemble_mean(train_loader, kernel_term)
        scores = kernel.mul_(q.unsqueeze(1))
        return check_finite(scores.to(self.dtype), "TRAK scores")

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """``mean_k phi_k(i) X_k phi_k(i)  *  mean_k (1 - p_k(i))``: the diagonal of
        ``attribute(train, train)``; ``(n_train,)`` on ``device``."""
        self._require_cache()

        def kernel_term(index: int, inv: Tensor, projector: Projector, phi: Tensor) -> Tensor:
            phi = phi.to(torch.float64)
            return ((phi @ inv) * phi).sum(dim=1)

        kernel, q = self._ensemble_mean(train_loader, kernel_term)
        scores = kernel.mul_(q)
        return check_finite(scores.to(self.dtype), "TRAK self-influence")

    def hyperparameters(self) -> dict[str, Any]:
        """Resolved arguments (JSON-able), for the scores' provenance metadata."""
        out = {"method": type(self).__name__, **self.arguments.result_dict()}
        out.update(
            projector_kwargs=dict(self.projector_kwargs or {}),
            regularization=self.regularization,
            num_checkpoints=self.task.num_checkpoints,
            ensemble="mean kernel x mean (1 - p)",
        )
        return out
