"""Common machinery of every attributor.

All attributors share one surface::

    attributor = SomeAttributor(task, ..., layer_name=None, device="cpu")
    attributor.cache(full_train_loader)            # where the method needs it
    scores = attributor.attribute(train_loader, test_loader)   # (n_train, n_test)
    self_scores = attributor.self_attribute(train_loader)      # (n_train,)

Sign convention: a high score means the training sample *helps* the test sample (removing
it would raise the test loss / lower the target). ``self_attribute(loader)`` equals the
diagonal of ``attribute(loader, loader)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor
from tqdm.auto import tqdm

from tdabench.errors import ConfigError, DataError, NotCachedError, ShapeError, TdabenchError
from tdabench.func.speed import backend_flags
from tdabench.func.utils import Batch, batch_size_of, batch_slice, batch_to, iter_batches
from tdabench.memory import MemoryPlanner, planner_for
from tdabench.task import AttributionTask, LayerName

__all__ = ["BaseAttributor", "ReplayLoader", "accumulate_scores", "arguments_from"]

logger = logging.getLogger(__name__)

#: Share of the memory budget a :class:`ReplayLoader` may keep (the loader's tensors, on the
#: attributor's device) to replay instead of iterating the loader again.
_REPLAY_FRACTION = 0.25
#: Share of the memory budget for one piece of per-sample gradients (they carry activations
#: and the projection's output too).
_GRAD_FRACTION = 0.25


def _batch_bytes(batch: Batch) -> int:
    ts = [batch] if isinstance(batch, Tensor) else [t for t in batch if isinstance(t, Tensor)]
    return sum(t.numel() * t.element_size() for t in ts)


A = TypeVar("A")


def arguments_from(cls: type[A], values: Mapping[str, Any]) -> A:
    """``cls.from_dict`` of the entries of ``values`` that are fields of the arguments dataclass
    ``cls`` (a :class:`~tdabench.algorithm.arguments.MethodArguments`): an attributor builds its
    arguments from its ``__init__``'s ``locals()`` without listing every keyword again.

    Raises:
        ConfigError: an invalid value (the dataclass's validation).
    """
    keys = set(cls.keys())  # type: ignore[attr-defined]
    return cls.from_dict({k: v for k, v in values.items() if k in keys})  # type: ignore[attr-defined]


def accumulate_scores(total: Tensor | None, scores: Tensor, what: str) -> Tensor:
    """``total + scores`` (``scores`` when ``total`` is ``None``): one checkpoint's scores
    ``(n_train, ...)`` added to the running sum of the previous checkpoints'.

    Raises:
        DataError: the shapes differ, i.e. the loader yielded another number of samples on
            this pass (a generator, or a loader in random order).
    """
    if total is None:
        return scores
    if total.shape != scores.shape:
        raise DataError(
            f"the {what} yielded {scores.shape[0]} samples on one pass and {total.shape[0]} on another; "
            "with several checkpoints the loaders are iterated once per checkpoint: pass re-iterable "
            "DataLoaders (not generators) in a fixed order"
        )
    return total + scores


class ReplayLoader:
    """A loader read once and replayed: multi-checkpoint methods iterate the same data once per
    checkpoint, and re-reading a ``DataLoader`` (per-sample ``__getitem__`` and collation) can
    cost as much as the attribution itself on small models.

    The first complete iteration yields the validated, device-moved batches of ``loader`` and
    keeps them if they total at most ``max_bytes`` (default: a quarter of the attributor's
    memory budget); later iterations replay the kept batches (same tensors, same order). If
    they do not fit, or the first iteration is abandoned, every iteration reads ``loader``
    again, as without the wrapper.
    """

    def __init__(
        self,
        attributor: BaseAttributor,
        loader: Iterable[Batch],
        what: str,
        max_bytes: int | None = None,
    ) -> None:
        self._attributor = attributor
        self._loader = loader
        self._what = what
        self._max_bytes = (
            int(max_bytes) if max_bytes is not None else attributor.planner.share(_REPLAY_FRACTION)
        )
        self._kept: list[Batch] | None = None
        self.replayable = True  # False once the content is known not to fit

    def __iter__(self) -> Iterator[Batch]:
        if self._kept is not None:
            yield from self._kept
            return
        kept: list[Batch] | None = [] if self.replayable else None
        size = 0
        for batch in self._attributor._batches(self._loader, self._what):
            if kept is not None:
                size += _batch_bytes(batch)
                if size <= self._max_bytes:
                    kept.append(batch)
                else:
                    kept = None
                    self.replayable = False
            yield batch
        if kept is not None:
            self._kept = kept


class BaseAttributor:
    """Base class: validation, device handling and gradient streaming.

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_name: restrict attribution to these parameters (a name, a module prefix or a
            list of them); ``None`` uses every parameter.
        device: where gradients and solves run (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
        memory_budget: bytes (or ``"8GiB"``, or a fraction of the device's memory) the method
            may hold; ``None`` derives it from the device (:func:`tdabench.memory.planner_for`).
            Every piece of work (gradient rows, projection chunks, solver chunks, replayed
            loaders) is sized from it; results do not depend on it.
    """

    #: Whether ``attribute``/``self_attribute`` need ``cache()`` first.
    requires_cache: bool = False

    def __init__(
        self,
        task: AttributionTask,
        layer_name: LayerName = None,
        device: str | torch.device = "cpu",
        memory_budget: int | float | str | None = None,
    ) -> None:
        if not isinstance(task, AttributionTask):
            raise ConfigError(f"task must be an AttributionTask, got {type(task).__name__}")
        self.task = task
        self.layer_name = layer_name
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {device!r} requested but CUDA is not available; pass device='cpu'"
            )
        self.spec = task.param_spec(layer_name)  # raises for unknown layer names
        self.memory_budget = memory_budget
        self.planner: MemoryPlanner = planner_for(self.device, memory_budget)
        self._cached = False
        self._dtype: torch.dtype | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        # read once: flat_params(0) switches the task to checkpoint 0, and a per-batch access
        # at another checkpoint would reload checkpoints back and forth
        if self._dtype is None:
            self._dtype = self.task.flat_params(0, self.layer_name).dtype
        return self._dtype

    def _checkpoint_index(self, ckpt_idx: int) -> int:
        """``ckpt_idx`` as an int, checked against the task's checkpoints.

        Raises:
            ConfigError: ``ckpt_idx`` is not in ``[0, num_checkpoints)``.
        """
        n = self.task.num_checkpoints
        if not 0 <= int(ckpt_idx) < n:
            raise ConfigError(
                f"ckpt_idx {ckpt_idx} is out of range: the task has {n} checkpoint(s)"
            )
        return int(ckpt_idx)

    def _test_rep(self, test_rep: Tensor) -> Tensor:
        """dattri's test representations ``(k, d)`` (``d`` = :attr:`spec`'s size) on ``device``
        in the task's dtype.

        Raises:
            ShapeError: ``test_rep`` is not ``(k, d)``.
        """
        if test_rep.dim() != 2 or test_rep.shape[1] != self.spec.dim:
            raise ShapeError(
                f"test_rep must be (k, {self.spec.dim}) (the selected parameters, flat), got "
                f"{tuple(test_rep.shape)}; flatten each test gradient over those parameters"
            )
        return test_rep.to(device=self.device, dtype=self.dtype)

    def _params(self, index: int = 0) -> Tensor:
        return self.task.flat_params(index, self.layer_name, device=self.device)

    def _require_cache(self) -> None:
        if self.requires_cache and not self._cached:
            raise NotCachedError(
                f"{type(self).__name__}.attribute/self_attribute needs cache(full_train_loader) first; "
                "call attributor.cache(train_loader)"
            )

    def _replay(self, loader: Iterable[Batch], what: str) -> ReplayLoader:
        """``loader`` wrapped to be read once and replayed (see :class:`ReplayLoader`)."""
        return loader if isinstance(loader, ReplayLoader) else ReplayLoader(self, loader, what)

    def _batches(self, loader: Iterable[Batch], what: str) -> Iterator[Batch]:
        if isinstance(loader, ReplayLoader):
            yield from loader  # already validated and moved
            return
        first = True
        for batch in iter_batches(loader, what):
            batch_size_of(batch)
            batch = batch_to(batch, self.device)
            if first:
                self._check_first_batch(batch, what)
                first = False
            yield batch

    def _check_first_batch(self, batch: Batch, what: str) -> None:
        """Run the task's loss and target once on the loader's first batch, before any gradient
        work, so a loader that does not fit the model fails with an error naming the loader and
        the fix instead of a traceback from inside ``vmap`` (one forward pass; later batches
        are not re-checked).

        Raises:
            DataError: the loss or target raises on the batch (wrong input width or dtype, a
                batch without labels, labels out of range, ...).
            ConfigError: the loss or target does not return a scalar, or its convention is
                ambiguous (see ``AttributionTask(sample_mode=...)``).
        """
        if not hasattr(self.task.loss_func, "resolve"):
            return  # not an f(params, data) loss (e.g. dattri's LoGra f(model, data, device))
        self.task.resolve_sample_mode(batch)
        params = {n: t.to(self.device) for n, t in self.task.get_params(0).items()}
        funcs = {"loss_func": self.task.loss_func, "target_func": self.task.target_func}
        for name, func in funcs.items():
            try:
                with torch.no_grad():
                    out = func(params, batch)
            except TdabenchError:
                raise
            except Exception as exc:
                raise DataError(
                    f"the {what}'s first batch fails in the task's {name} ({type(exc).__name__}: "
                    f"{exc}); it must yield batches like the training data: (inputs, labels) with "
                    "the model's input shape and dtype (float inputs, not int64) and labels within "
                    "the model's classes"
                ) from exc
            if not isinstance(out, Tensor) or out.numel() != 1:
                shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ConfigError(
                    f"the task's {name} returns {shape} on a batch of the {what}; it must return "
                    "the batch's mean as a scalar (e.g. reduction='mean')"
                )
            if func is self.task.target_func:
                break

    def _batch_grads(
        self,
        loader: Iterable[Batch],
        which: str = "loss",
        index: int = 0,
        what: str = "data loader",
        desc: str | None = None,
    ) -> Iterator[tuple[Batch, Tensor]]:
        """``(batch, per-sample gradients (B, d))`` of each batch of ``loader`` at checkpoint
        ``index``; with ``desc``, a progress bar of that name (tqdm, ``disable=None``)."""
        flat = self._params(index)
        batches = self._batches(loader, what)
        if desc is not None:
            batches = tqdm(batches, desc=desc, disable=None, leave=False)
        for batch in batches:
            with backend_flags(self.device):
                g = self.task.per_sample_grads(
                    flat, batch, which=which, index=index, layer_name=self.layer_name
                )
            yield batch, g

    def _grads(self, loader: Iterable[Batch], *args: Any) -> Iterator[Tensor]:
        """Per-sample gradients ``(B, d)`` of each batch of ``loader`` (the arguments of
        :meth:`_batch_grads`: ``which``, ``index``, ``what``, ``desc``)."""
        for _, g in self._batch_grads(loader, *args):
            yield g

    def _projected_grads(
        self, flat: Tensor, batch: Batch, which: str, index: int, projector: Any
    ) -> Tensor:
        """``projector.project`` of the per-sample gradients ``(B, d)`` of ``batch``, computed in
        row pieces sized by the memory planner (a streaming piece: 64 MiB per thread on the
        CPU, a share of the budget on a GPU): a projection keeps only ``(B, k)``, so the full
        ``(B, d)`` gradient batch never has to exist at once (same numbers: the projection is
        row by row)."""

        def project(piece: Batch) -> Tensor:  # per-parameter blocks: no (B, d) concatenation
            return projector.project(
                self.task.per_sample_grads(
                    flat,
                    piece,
                    which=which,
                    index=index,
                    layer_name=self.layer_name,
                    as_blocks=True,
                )
            )

        n = batch_size_of(batch)
        item = torch.empty((), dtype=self.dtype).element_size()
        rows = self.planner.rows(self.spec.dim * item, fraction=_GRAD_FRACTION, stream=True)
        with backend_flags(self.device):
            if n <= rows:
                return project(batch)
            return torch.cat([project(batch_slice(batch, a, a + rows)) for a in range(0, n, rows)])

    def _all_grads(self, loader: Iterable[Batch], *args: Any) -> Tensor:
        """Stacked per-sample gradients ``(n, d)`` of every sample in ``loader`` (the arguments
        of :meth:`_batch_grads`)."""
        return torch.cat(list(self._grads(loader, *args)), dim=0)

    # ------------------------------------------------------------------ API
    def cache(self, full_train_loader: Iterable[Batch]) -> None:  # pragma: no cover - overridden
        """Precompute what the method needs from the full training set."""
        self._cached = True

    def attribute(self, train_loader: Iterable[Batch], test_loader: Iterable[Batch]) -> Tensor:
        """Scores of shape ``(n_train, n_test)``."""
        raise NotImplementedError

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """Self-influence scores ``(n_train,)``: the diagonal of ``attribute(train, train)``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer_name={self.layer_name!r}, device={str(self.device)!r})"

    def hyperparameters(self) -> dict[str, Any]:
        """Resolved hyper-parameters, for provenance metadata."""
        return {"method": type(self).__name__, "layer_name": self.layer_name}
