"""DataInf: influence functions with a closed-form, per-layer inverse of the damped Fisher.

For each layer ``l`` (the parameters of one module) DataInf replaces the inverse of the damped
empirical Fisher ``F_l + λ_l I``, ``F_l = (1/n) Σ_i g_il g_ilᵀ``, by the mean of the inverses of
its rank-one terms, each of which has a closed form (Sherman-Morrison):

.. math::

    (F_l + λ_l I)^{-1} \\approx M_l = \\frac{1}{n} \\sum_i (g_{il} g_{il}^\\top + λ_l I)^{-1}
        = \\frac{1}{n λ_l} \\sum_i \\Big(I - \\frac{g_{il} g_{il}^\\top}{λ_l + \\|g_{il}\\|^2}\\Big)

(Kwon et al., *DataInf*, ICLR 2024). ``g_il`` is the gradient of the loss of cached training
sample ``i`` with respect to layer ``l``. The score of training sample ``i`` on test sample
``j`` is ``Σ_l ∇_l t(z_j)ᵀ M_l ∇_l L(z_i)``, averaged over checkpoints (same sign convention as
the other influence functions: high = the training sample helps the test sample).

``M_l`` is never formed: applied to test gradients ``V_l`` (rows) it is
``(V_l - ((V_l G_lᵀ) ⊙ c) G_l / n) / λ_l`` with ``c_i = 1 / (λ_l + ||g_il||²)``: two GEMMs
against the cached gradients ``G_l``.

**Damping.** ``regularization > 0`` is ``λ_l`` for every layer, as in dattri. dattri 0.3.0's
default ``regularization=0.0`` divides by zero and returns NaN; here ``0.0`` (the default)
selects the DataInf paper's per-layer rule ``λ_l = regularization_scale * (1 / (n d_l)) Σ_i
||g_il||²`` (``regularization_scale`` = 0.1 as in the paper: a tenth of the mean squared
gradient entry of the layer), which is positive whenever a gradient is non-zero.
``regularization=None`` is dattri's fallback constant 0.1.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tdabench._validate import check_real
from tdabench.algorithm import arguments as _arguments
from tdabench.algorithm.base import BaseAttributor
from tdabench.algorithm.logra import average_over_checkpoints
from tdabench.errors import DataError
from tdabench.func.utils import Batch, batch_size_of, batch_slice, check_finite
from tdabench.memory import MemoryPlanner, planner_for
from tdabench.task import AttributionTask, LayerName

__all__ = ["DataInfArguments", "IFAttributorDataInf", "layer_groups"]

logger = logging.getLogger(__name__)

#: dattri's constant for ``regularization=None``.
DATTRI_NONE_REGULARIZATION = 0.1


@_arguments.register_arguments("IFAttributorDataInf")
@dataclass
class DataInfArguments(_arguments.MethodArguments):
    """Hyper-parameters of :class:`IFAttributorDataInf` (validated on construction).

    Attributes:
        regularization: ``λ_l`` for every layer when ``> 0``; ``0.0`` selects the paper's
            per-layer rule (see the module docstring); ``None`` is dattri's constant 0.1.
        fim_estimate_data_ratio: fraction in ``(0, 1]`` of the cache loader's batches (the
            first ``ceil(ratio · batches)``, in loader order, as dattri) whose samples' gradients
            define ``M_l``.
        regularization_scale: the factor of the paper's rule (0.1), used when
            ``regularization == 0``.
        layer_name: parameters (names or module prefixes) to attribute; ``None`` = all.
        memory_budget: the planner's budget (execution only).
    """

    regularization: float | None = 0.0
    fim_estimate_data_ratio: float = 1.0
    regularization_scale: float = 0.1
    layer_name: Any = None
    memory_budget: Any = None

    def __post_init__(self) -> None:
        if self.regularization is not None:
            self.regularization = check_real(
                "regularization",
                self.regularization,
                0.0,
                fix="pass a value >= 0 (0 = the paper's per-layer rule)",
            )
        self.fim_estimate_data_ratio = check_real(
            "fim_estimate_data_ratio",
            self.fim_estimate_data_ratio,
            0.0,
            strict=True,
            at_most=1.0,
            fix="pass e.g. 1.0",
        )
        self.regularization_scale = check_real(
            "regularization_scale", self.regularization_scale, 0.0, strict=True, fix="pass e.g. 0.1"
        )
        self.layer_name = _arguments._check_layer_name(self.layer_name)
        self.memory_budget = _arguments._check_budget(self.memory_budget)


def layer_groups(names: Iterable[str], numels: Iterable[int]) -> list[tuple[str, int, int]]:
    """Consecutive parameters of one module grouped into layers.

    Args:
        names: parameter names in flat-vector order (``"fc1.weight"``, ``"fc1.bias"``, ...).
        numels: their sizes.

    Returns:
        ``[(module_name, start, stop), ...]``: each layer's slice of the flat vector.
    """
    groups: list[tuple[str, int, int]] = []
    offset = 0
    for name, numel in zip(names, numels, strict=True):
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if groups and groups[-1][0] == module and groups[-1][2] == offset:
            groups[-1] = (module, groups[-1][1], offset + numel)
        else:
            groups.append((module, offset, offset + numel))
        offset += numel
    return groups


class IFAttributorDataInf(BaseAttributor):
    """DataInf influence functions (dattri's ``IFAttributorDataInf``).

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict to these parameters (names or module prefixes); ``None`` uses all.
            Layers are the modules the selected parameters belong to.
        device: where gradients and products run.
        regularization: see :class:`DataInfArguments` (``0.0``: the paper's per-layer rule).
        fim_estimate_data_ratio: fraction of the cache loader's batches used for ``M_l``.
        regularization_scale: factor of the per-layer rule (keyword only, tdabench extension).
        memory_budget: bytes (or ``"2GiB"``) for the planner; ``None`` = the device's.

    The cached training gradients ``(m, d)`` are kept when they fit in half the memory
    budget, and recomputed in row pieces at every :meth:`attribute` otherwise.
    """

    requires_cache = True

    # Spelled out: dattri 0.3.0's constructor signature (positional order and defaults)
    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        regularization: float | None = 0.0,
        fim_estimate_data_ratio: float = 1.0,
        *,
        regularization_scale: float = 0.1,
        memory_budget: int | str | None = None,
    ) -> None:
        super().__init__(task, layer_name=layer_name, device=device)
        self.args = DataInfArguments(
            regularization, fim_estimate_data_ratio, regularization_scale, layer_name, memory_budget
        )
        self.planner: MemoryPlanner = planner_for(self.device, memory_budget)
        self.layers = layer_groups(self.spec.names, self.spec.numels)
        self._fim_batches: list[Batch] = []
        self._m = 0
        self._lambdas: dict[int, Tensor] = {}
        self._stored: tuple[int, Tensor] | None = None  # (checkpoint, G (m, d))

    # ----------------------------------------------------------------- cache
    def cache(self, full_train_loader: Iterable[Batch]) -> None:
        """Select the Fisher samples and compute each layer's ``λ_l`` at every checkpoint.

        Args:
            full_train_loader: loader over the training set; the samples of its first
                ``ceil(fim_estimate_data_ratio * number of batches)`` batches define ``M_l``.

        Raises:
            DataError: the loader holds no sample.
            NonFiniteError: a training gradient is NaN or infinite.
        """
        start = time.perf_counter()
        self._cached = False
        batches = [
            b
            for b in self._batches(full_train_loader, "cache (full training) loader")
            if batch_size_of(b)
        ]
        n = sum(batch_size_of(b) for b in batches)
        if n == 0:
            raise DataError(
                "the cache (full training) loader holds no sample; pass a DataLoader over the training set"
            )
        # dattri's semantics: the ratio counts loader batches (the first ceil(ratio * batches))
        nb = max(1, math.ceil(self.args.fim_estimate_data_ratio * len(batches) - 1e-9))
        self._fim_batches = batches[:nb]
        m = sum(batch_size_of(b) for b in self._fim_batches)
        self._m = m
        self._stored = None
        keep = self.planner.fits(m * self.spec.dim * self._item(), fraction=0.5)
        for k in range(self.task.num_checkpoints):
            sq = torch.zeros(len(self.layers), dtype=torch.float64, device=self.device)
            pieces = []
            for G in self._fim_pieces(k):
                sq += self._layer_sq_norms(G).sum(dim=0).double()
                if keep and k == 0:
                    pieces.append(G)
            self._lambdas[k] = self._resolve_lambdas(sq, m)
            if pieces:
                self._stored = (0, torch.cat(pieces))
        self._cached = True
        logger.info(
            "DataInf cached %d of %d samples, %d layer(s), %d checkpoint(s) in %.2fs",
            m,
            n,
            len(self.layers),
            self.task.num_checkpoints,
            time.perf_counter() - start,
        )

    def _item(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def _resolve_lambdas(self, sq: Tensor, m: int) -> Tensor:
        """``λ_l`` per layer ``(L,)`` from the summed squared gradient norms ``sq`` of ``m`` samples."""
        reg = self.args.regularization
        if reg is None:
            lam = torch.full_like(sq, DATTRI_NONE_REGULARIZATION)
        elif reg > 0:
            lam = torch.full_like(sq, float(reg))
        else:
            dims = torch.tensor(
                [b - a for _, a, b in self.layers], dtype=sq.dtype, device=sq.device
            )
            lam = self.args.regularization_scale * sq / (m * dims)
            if bool((lam <= 0).any()):
                zero = [self.layers[i][0] for i in torch.nonzero(lam <= 0).flatten().tolist()]
                raise DataError(
                    f"every cached gradient of layer(s) {zero} is zero, so the paper's damping rule gives "
                    "λ = 0; pass regularization > 0 or leave those layers out with layer_name"
                )
        return lam.to(self.dtype)

    def _layer_sq_norms(self, G: Tensor) -> Tensor:
        """Squared norm of each row of ``G (B, d)`` per layer: ``(B, L)``."""
        return torch.stack([G[:, a:b].pow(2).sum(dim=1) for _, a, b in self.layers], dim=1)

    def _fim_pieces(self, index: int) -> Iterable[Tensor]:
        """Per-sample loss gradients ``(rows, d)`` of the Fisher samples, in row pieces."""
        if self._stored is not None and self._stored[0] == index:
            yield self._stored[1]
            return
        flat = self._params(index)
        rows = self.planner.rows(3 * self.spec.dim * self._item(), stream=True)
        for batch in self._fim_batches:
            n = batch_size_of(batch)
            for a in range(0, n, rows):
                piece = batch if n <= rows else batch_slice(batch, a, min(n, a + rows))
                yield self.task.per_sample_grads(flat, piece, "loss", index, self.layer_name)

    # ----------------------------------------------------------------- transform
    def transform(self, index: int, V: Tensor) -> Tensor:
        """``M V`` row-wise: the DataInf inverse applied to vectors ``V (k, d)``; returns ``(k, d)``."""
        self._require_cache()
        lam = self._lambdas[index]
        acc = torch.zeros_like(V)
        for G in self._fim_pieces(index):
            for li, (_, a, b) in enumerate(self.layers):
                Gl = G[:, a:b]
                coef = (V[:, a:b] @ Gl.T) / (lam[li] + Gl.pow(2).sum(dim=1))  # (k, rows)
                acc[:, a:b] += coef @ Gl
        out = torch.empty_like(V)
        for li, (_, a, b) in enumerate(self.layers):
            out[:, a:b] = (V[:, a:b] - acc[:, a:b] / self._m) / lam[li]
        return check_finite(
            out,
            f"DataInf transform (checkpoint {index})",
            fix="pass regularization > 0 or check the gradients",
        )

    # ----------------------------------------------------------------- dattri's internals
    # Spelled out: dattri 0.3.0's own tests call these three members of its IFAttributorDataInf.
    def transform_test_rep(self, ckpt_idx: int, test_rep: Tensor) -> Tensor:
        """dattri's name for :meth:`transform`: ``M V`` for test representations ``(k, d)``."""
        return self.transform(self._checkpoint_index(ckpt_idx), self._test_rep(test_rep))

    @property
    def _cached_train_reps(self) -> dict[int, Tensor]:
        """``{checkpoint: (m, d)}`` per-sample loss gradients of the Fisher samples (computed on access)."""
        self._require_cache()
        return {k: torch.cat(list(self._fim_pieces(k))) for k in range(self.task.num_checkpoints)}

    def _get_layer_wise_reps(self, ckpt_idx: int, query: Tensor) -> tuple[Tensor, ...]:
        """``query`` ``(k, d)`` split into its layers' columns ``((k, d_0), (k, d_1), ...)``."""
        return tuple(query[:, a:b] for _, a, b in self.layers)

    # ----------------------------------------------------------------- API
    def attribute(self, train_loader: Iterable[Batch], test_loader: Iterable[Batch]) -> Tensor:
        """DataInf scores ``(n_train, n_test)``, averaged over checkpoints.

        The test side is transformed once per checkpoint; the training loader is streamed.
        """
        self._require_cache()

        def scores_of(k: int) -> Tensor:
            Q = self.transform(k, self._all_grads(test_loader, "target", k, "test loader"))
            blocks = [
                g @ Q.T
                for g in tqdm(
                    self._grads(train_loader, "loss", k, "train loader"),
                    desc=f"DataInf attribute (ckpt {k})",
                    disable=None,
                    leave=False,
                )
            ]
            return torch.cat(blocks)

        return average_over_checkpoints(self.task.num_checkpoints, scores_of)

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """``Σ_l ∇_l t(z_i)ᵀ M_l ∇_l L(z_i)`` per training sample ``(n_train,)``: the diagonal
        of ``attribute(train_loader, train_loader)``."""
        self._require_cache()
        same = self.task.target_func is self.task.loss_func

        def diagonal(k: int) -> Tensor:
            flat = self._params(k)
            parts = []
            for batch in self._batches(train_loader, "train loader"):
                g = self.task.per_sample_grads(flat, batch, "loss", k, self.layer_name)
                t = (
                    g
                    if same
                    else self.task.per_sample_grads(flat, batch, "target", k, self.layer_name)
                )
                parts.append((g * self.transform(k, t)).sum(dim=1))
            return torch.cat(parts)

        return average_over_checkpoints(self.task.num_checkpoints, diagonal)

    def regularization_per_layer(self, index: int = 0) -> dict[str, float]:
        """``{module: λ_l}`` used at checkpoint ``index`` (after :meth:`cache`)."""
        self._require_cache()
        return {
            name: float(v)
            for (name, _, _), v in zip(self.layers, self._lambdas[index], strict=True)
        }

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out.update(self.args.result_dict(), num_checkpoints=self.task.num_checkpoints)
        return out
