"""TracIn (checkpoint) and its one-checkpoint special cases Grad-Dot and Grad-Cos.

TracInCP (Pruthi et al., 2020) scores a training sample ``i`` against a test sample ``j``
by the learning-rate-weighted sum, over checkpoints ``k`` of the training run, of the
inner products of their gradients::

    score[i, j] = sum_k  w_k < P_k g_k(train_i), P_k g_k(test_j) >

with ``g_k(train_i)`` the gradient of the task's *loss* at checkpoint ``k`` and
``g_k(test_j)`` the gradient of its *target* (the loss unless ``target_func`` was given).
A positive score means a gradient step on ``i`` lowered the test loss: ``i`` helps ``j``
(the project's sign convention). ``P_k`` is an optional random projection
(``projector_kwargs``) with seed ``seed + k``. With ``normalized_grad=True`` each
(projected) gradient is scaled to unit norm first, so each term is a cosine similarity.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tdabench.algorithm.arguments import (
    GradCosArguments,
    GradDotArguments,
    MethodArguments,
    TracInArguments,
)
from tdabench.algorithm.base import BaseAttributor
from tdabench.errors import ConfigError, DataError
from tdabench.func.projection import Projector, projector_from_kwargs, resolve_projector_kwargs
from tdabench.func.utils import Batch, check_finite
from tdabench.task import AttributionTask, LayerName

__all__ = ["GradCosAttributor", "GradDotAttributor", "TracInAttributor"]

logger = logging.getLogger(__name__)

_EPS_NORM = 1e-30


def _check_weights(weight_list: Any, num_checkpoints: int) -> list[float]:
    try:
        w = torch.as_tensor(weight_list, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(
            f"weight_list must be a 1-D tensor or list of numbers (one per checkpoint), got {weight_list!r}"
        ) from exc
    if w.dim() != 1 or w.numel() != num_checkpoints:
        raise ConfigError(
            f"weight_list has shape {tuple(w.shape)} but the task has {num_checkpoints} checkpoint(s); "
            "pass one weight (the learning rate around that checkpoint) per checkpoint"
        )
    if not bool(torch.isfinite(w).all()):
        raise ConfigError(f"weight_list must be finite, got {w.tolist()}")
    return [float(x) for x in w]


class TracInAttributor(BaseAttributor):
    """TracInCP: learning-rate-weighted gradient similarity summed over checkpoints.

    Args:
        task: the task; each of its checkpoints contributes one term.
        weight_list: ``(num_checkpoints,)`` weights ``w_k`` (the learning rates).
        normalized_grad: scale each (projected) gradient to unit norm (Grad-Cos style).
        projector_kwargs: ``None`` (exact gradients) or a dict with keys among
            ``proj_dim`` (default 512), ``proj_type`` (``"gaussian"``, ``"rademacher"``,
            ``"sparse"`` (CountSketch, ``O(d)`` per sample), ``"identity"``), ``seed`` (default 0; checkpoint ``k`` uses ``seed + k``) and
            ``max_chunk_bytes``. Unknown keys raise :class:`ConfigError`.
        layer_name: restrict gradients to these parameters.
        device: where gradients, projections and scores live (scores are returned there).
        memory_budget: bytes (or ``"8GiB"``, or a fraction of the device) the method may hold;
            gradient pieces and projection chunks are sized from it (results do not depend on it).

    Loaders must iterate in a fixed order (``shuffle=False``): they are read once per
    checkpoint. Test gradients are computed once per checkpoint; train batches are streamed.
    ``cache()`` is not needed (it is a no-op).
    """

    requires_cache = False

    def __init__(
        self,
        task: AttributionTask,
        weight_list: Tensor | Sequence[float],
        normalized_grad: bool = False,
        projector_kwargs: Mapping[str, Any] | None = None,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        memory_budget: int | float | str | None = None,
    ) -> None:
        super().__init__(task, layer_name, device, memory_budget)
        self.arguments: MethodArguments = TracInArguments(
            weight_list=weight_list,
            normalized_grad=normalized_grad,
            projector_kwargs=projector_kwargs,
            layer_name=layer_name,
            memory_budget=memory_budget,
        )
        weights = _check_weights(weight_list, task.num_checkpoints)
        self._setup(list(range(task.num_checkpoints)), weights, normalized_grad, projector_kwargs)

    def _setup(
        self,
        indices: list[int],
        weights: list[float],
        normalized_grad: bool,
        projector_kwargs: Mapping[str, Any] | None,
    ) -> None:
        self.checkpoint_indices = indices
        self.weights = weights
        self.normalized_grad = bool(normalized_grad)
        self.projector_kwargs = resolve_projector_kwargs(projector_kwargs)

    # ------------------------------------------------------------------ helpers
    def _projector(self, index: int) -> Projector | None:
        # drawn afresh per call (each checkpoint's matrix is used once per attribute call)
        return projector_from_kwargs(
            self.projector_kwargs, self.spec.dim, index, self.device, self.dtype, self.memory_budget
        )

    def _normalize(self, g: Tensor) -> Tensor:
        if self.normalized_grad:
            g = g / g.norm(dim=1, keepdim=True).clamp_min(_EPS_NORM)
        return g

    def _features(
        self, flat: Tensor, batch: Batch, which: str, index: int, projector: Projector | None
    ) -> Tensor:
        if projector is not None:
            return self._normalize(self._projected_grads(flat, batch, which, index, projector))
        return self._normalize(
            self.task.per_sample_grads(
                flat, batch, which=which, index=index, layer_name=self.layer_name
            )
        )

    def _target_is_loss(self) -> bool:
        return self.task.target_func is self.task.loss_func

    # ------------------------------------------------------------------ API
    def cache(self, full_train_loader: Iterable[Batch] | None = None) -> None:
        """No-op: TracIn needs no precomputation."""
        self._cached = True

    def attribute(self, train_loader: Iterable[Batch], test_loader: Iterable[Batch]) -> Tensor:
        """TracIn scores.

        Args:
            train_loader: training samples (loss gradients), fixed order.
            test_loader: test samples (target gradients), fixed order.

        Returns:
            Tensor ``(n_train, n_test)`` on ``device``; high = the training sample helps.
        """
        scores: Tensor | None = None
        if len(self.weights) > 1:  # read once, replayed for the other checkpoints
            train_loader = self._replay(train_loader, "train loader")
            test_loader = self._replay(test_loader, "test loader")
        for w, index in zip(self.weights, self.checkpoint_indices, strict=True):
            projector = self._projector(index)
            flat = self._params(index)
            test = torch.cat(
                [
                    self._features(flat, b, "target", index, projector)
                    for b in self._batches(test_loader, "test loader")
                ]
            )
            batches = tqdm(
                self._batches(train_loader, "train loader"),
                desc=f"TracIn ckpt {index}",
                disable=None,
                leave=False,
            )
            if scores is None:
                scores = torch.cat(
                    [self._features(flat, b, "loss", index, projector) @ test.T for b in batches]
                ).mul_(w)
                continue
            # later checkpoints accumulate block by block (no second score matrix)
            row = 0 if test.shape[0] == scores.shape[1] else -1
            for b in batches if row == 0 else ():
                g = self._features(flat, b, "loss", index, projector)
                if row + g.shape[0] > scores.shape[0]:
                    row = -1
                    break
                scores[row : row + g.shape[0]].addmm_(g, test.T, alpha=w)
                row += g.shape[0]
            if row != scores.shape[0]:
                raise DataError(
                    f"the loaders yielded a different number of (train, test) samples at checkpoint {index} "
                    f"than the {tuple(scores.shape)} before; use loaders with a fixed order and size (shuffle=False)"
                )
        assert scores is not None
        return check_finite(scores, "TracIn scores")

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """``sum_k w_k <P g_k^loss(i), P g_k^target(i)>`` (``w_k ||P g_k(i)||^2`` when the
        target is the loss): the diagonal of ``attribute(train, train)``.

        Returns:
            Tensor ``(n_train,)`` on ``device``.
        """
        total: Tensor | None = None
        train_loader = self._replay(train_loader, "train loader")
        for w, index in zip(self.weights, self.checkpoint_indices, strict=True):
            projector = self._projector(index)
            flat = self._params(index)
            parts = []
            for batch in self._batches(train_loader, "train loader"):
                g = self._features(flat, batch, "loss", index, projector)
                t = (
                    g
                    if self._target_is_loss()
                    else self._features(flat, batch, "target", index, projector)
                )
                parts.append((g * t).sum(dim=1).mul_(w))
            values = torch.cat(parts)
            if total is not None and total.shape != values.shape:
                raise DataError(
                    "the train loader yielded a different number of samples on a later checkpoint; fix its order/size"
                )
            total = values if total is None else total + values
        assert total is not None
        return check_finite(total, "TracIn self-influence")

    def hyperparameters(self) -> dict[str, Any]:
        out = {"method": type(self).__name__, **self.arguments.result_dict()}
        out.pop("weight_list", None)
        out.update(
            checkpoint_indices=list(self.checkpoint_indices),
            weights=list(self.weights),
            normalized_grad=self.normalized_grad,
            projector_kwargs=None if self.projector_kwargs is None else dict(self.projector_kwargs),
        )
        return out


def _resolve_index(task: AttributionTask, checkpoint_index: int) -> int:
    n = task.num_checkpoints
    if (
        isinstance(checkpoint_index, bool)
        or not isinstance(checkpoint_index, int)
        or not -n <= checkpoint_index < n
    ):
        raise ConfigError(
            f"checkpoint_index must be an integer in [{-n}, {n - 1}], got {checkpoint_index!r}"
        )
    return checkpoint_index % n


class GradDotAttributor(TracInAttributor):
    """Grad-Dot: ``score[i, j] = <P g(train_i), P g(test_j)>`` at ONE checkpoint.

    Args:
        task: the task.
        layer_name: restrict gradients to these parameters.
        device: where gradients and scores live.
        projector_kwargs: as for :class:`TracInAttributor` (seed ``seed + index``).
        checkpoint_index: which checkpoint of the task to use; the default ``-1`` is the
            last one (the trained model when the checkpoints are a training trajectory).
            Other checkpoints are ignored.
        memory_budget: bytes the method may hold (see :class:`TracInAttributor`).
    """

    _normalized = False

    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        projector_kwargs: Mapping[str, Any] | None = None,
        checkpoint_index: int = -1,
        memory_budget: int | float | str | None = None,
    ) -> None:
        BaseAttributor.__init__(self, task, layer_name, device, memory_budget)
        args_cls = GradCosArguments if self._normalized else GradDotArguments
        self.arguments = args_cls(
            layer_name=layer_name,
            projector_kwargs=projector_kwargs,
            checkpoint_index=checkpoint_index,
            memory_budget=memory_budget,
        )
        self._setup(
            [_resolve_index(task, checkpoint_index)], [1.0], self._normalized, projector_kwargs
        )


class GradCosAttributor(GradDotAttributor):
    """Grad-Cos: cosine similarity of the (projected) gradients at ONE checkpoint.

    Same arguments as :class:`GradDotAttributor`; ``self_attribute`` is 1 for every
    sample with a non-zero gradient when the target is the loss.
    """

    _normalized = True
