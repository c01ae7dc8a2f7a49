"""Retraining trainers: a sequential reference and a batched ``torch.func`` trainer.

Both trainers implement the :class:`Trainer` protocol below and exactly the same
training semantics, so they agree to float rounding on the same inputs (tested in float64):

* **Initialisation.** Model ``r`` of a :meth:`~Trainer.train` call is created by
  ``torch.manual_seed(seeds[r])`` followed by ``build_model()`` (the global RNG is restored
  afterwards; trainers never leak RNG state). Its training set is ``masks[r]`` (bool, ``n_train``).
* **One shared minibatch stream.** Every model trained by a trainer sees the same sequence of
  stream batches: in epoch ``e`` the indices ``0..n_train-1`` are permuted by a generator
  seeded from ``(stream_seed, e)`` and cut into consecutive batches of ``B_stream`` indices
  (the last one may be smaller). ``stream_seed`` is a constructor argument (the ground-truth
  engine derives it from its key); it does not depend on the model seeds, so a model's result
  does not depend on which other models were trained with it, nor on chunking.
* **Per-model masked mean.** Model ``r``'s loss on a stream batch is the mean per-sample loss
  over its own members of that batch (``masks[r, batch]``).
* **Empty batches.** If model ``r`` has no member in a stream batch it *skips the step*: its
  parameters and optimiser state (momentum buffer, Adam moments and Adam step count) stay
  unchanged, exactly as if that batch had not existed for it. The learning-rate schedule is
  indexed by the shared stream iteration, so it is the same for all models.
* **Stream batch size** (constructor option ``stream_batch``):
  ``"scaled"`` (default) sets ``B_stream = round(batch_size * n_train / |mask_r|)`` so that the
  expected number of members per batch equals the recipe's ``batch_size`` and every model makes
  about ``|mask_r| / batch_size`` steps per epoch, i.e. it follows the recipe as if it had been
  trained alone on its subset with a shuffled loader (what a per-subset ``DataLoader`` does).
  Models trained in one call must then imply the same ``B_stream`` (true for LDS subsets of one
  size and for LOO). ``"fixed"`` uses ``B_stream = batch_size`` (each model sees smaller
  batches and more steps); an ``int`` sets ``B_stream`` directly.
* **Optimisers** follow ``torch.optim.SGD`` (momentum, weight decay, no dampening/Nesterov),
  ``Adam`` and ``AdamW``; learning rate with linear warm-up and optional cosine decay
  (:func:`tdabench.groundtruth.optim.lr_at`), per-model gradient-norm clipping as
  ``torch.nn.utils.clip_grad_norm_`` applied before weight decay.
* **Iterations.** ``epochs * ceil(n_train / B_stream)`` stream iterations, or ``max_iters`` if
  the recipe sets it (the stream then continues over as many epochs as needed).
* **Dropout.** Inside ``vmap`` random ops draw with ``randomness="different"`` from an RNG
  seeded from ``(stream_seed, seeds)``; the sequential trainer draws dropout masks from the RNG
  state left after ``build_model()`` under ``seeds[r]``. Both are deterministic, but for models
  with dropout (or any random op in training mode) batched and sequential results are only
  equal in distribution, and batched results depend on the grouping of models. Equality is
  tested on models without random ops.
* **Buffers and batch norm.** Constant buffers are carried along (stacked). ``BatchNorm*``
  layers train batched through a functional, masked form
  (:mod:`tdabench.groundtruth._vmap_batchnorm`): each model normalises with the statistics of
  its *own members* of the stream batch only (exactly the batch the sequential trainer feeds
  it), and its running statistics (stacked per model) are updated functionally and committed
  only on the steps it takes, so a skipped step leaves them unchanged as well. Evaluation
  uses the running statistics (``eval()`` mode). Other modules with running statistics
  (``InstanceNorm`` with ``track_running_stats``) cannot be trained batched:
  :class:`BatchedTrainer` raises ``ConfigError`` and :func:`make_trainer` falls back to
  :class:`SequentialTrainer` for them.
* **Memory.** Models per chunk and evaluation chunk sizes come from the memory planner
  (:func:`tdabench.memory.planner_for` with the trainer's ``memory_budget``); chunking never
  changes a model's numbers (shared stream), only speed and peak memory.
* **Autocast.** A recipe may set ``autocast: "bf16"``: the training forward and loss then run
  under ``torch.autocast(dtype=torch.bfloat16)`` (parameters, gradients and optimiser state
  stay in ``dtype``); evaluation stays in ``dtype``. Off by default; the numbers change
  (they enter the fingerprint) and batched/sequential agree only to bf16 rounding.
* **Losses.** ``kind="classification"``: per-sample cross-entropy of ``model(x)`` (n, C).
  ``kind="sequence"``: inputs are token ids (n, T), labels next tokens (n, T) (``-100`` is
  ignored), the per-sample loss is the token cross-entropy averaged over each sequence.
  If the model returns a tuple, its first element is taken as the logits.
* **Determinism.** Both trainers give bit-identical results when called again with the same
  inputs on the same hardware and software. The batched trainer's speed-ups (one GEMM for
  narrow linear layers with a shared input, ``compact`` per-model batches, and the hand-written
  fast path for plain Linear/ReLU stacks trained with SGD, see
  :mod:`tdabench.groundtruth._fast_mlp`) change only the order of floating-point sums, so a
  model's result is independent of its group/chunk up to float rounding (tested at 1e-12 in
  float64; the fast path against a per-model ``torch.optim`` loop at 1e-10).
* **Divergence.** A non-finite loss (or non-finite final parameters) raises
  ``NonFiniteError`` naming the rows of ``masks`` that diverged.

Data: ``train`` and ``test`` are tuples ``(*inputs, labels)`` with a common leading dimension;
floating inputs are cast to the trainer's ``dtype``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from tqdm.auto import tqdm

from tdabench._compat import batch_norm_types, running_stat_norm_types
from tdabench._io import mix_seed
from tdabench.errors import ConfigError, DataError, NonFiniteError, ShapeError
from tdabench.groundtruth._fast_mlp import FastStack, fast_plan
from tdabench.groundtruth._vmap_batchnorm import BatchNormContext, patch_batch_norm_layers
from tdabench.groundtruth._vmap_linear import patch_linear_layers
from tdabench.groundtruth.optim import (
    AUTOCAST_DTYPES,
    FunctionalOptimizer,
    clip_grad_norms_,
    lr_at,
    make_torch_optimizer,
    normalize_recipe,
)
from tdabench.memory import planner_for

__all__ = [
    "TRAINER_VERSION",
    "BatchedTrainer",
    "EpochCallback",
    "SequentialTrainer",
    "Trainer",
    "make_trainer",
    "unstack",
]

logger = logging.getLogger(__name__)

#: Bump whenever a change alters the numbers a trainer produces (part of every fingerprint).
TRAINER_VERSION = "1"

_TARGETS = ("loss", "margin", "neg_loss")
#: ``on_epoch(epoch, rows, stacked)``: called after every completed epoch with the 1-based epoch
#: number, the mask rows of the models it describes and a detached copy of their stacked state.
EpochCallback = Callable[[int, list[int], dict[str, Tensor]], None]

_COMPACT_MIN_PARAMS = 20_000
_COMPACT_MAX_FILL = 0.8
_KINDS = ("classification", "sequence")


@runtime_checkable
class Trainer(Protocol):
    """What the ground-truth engine needs from a trainer."""

    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the trained numbers."""
        ...

    def train(
        self, masks: Tensor, seeds: Sequence[int], on_epoch: EpochCallback | None = None
    ) -> dict[str, Tensor]:
        """Train one model per bool mask row ``(m, n_train)`` (``m`` seeds); returns the
        stacked state dict ``{name: (m, ...)}``."""
        ...

    def evaluate(self, stacked: dict[str, Tensor], target: str | Callable) -> Tensor:
        """Target values ``(m, n_test)`` of the stacked models ``{name: (m, ...)}``."""
        ...


def unstack(stacked: Mapping[str, Tensor], i: int) -> dict[str, Tensor]:
    """State dict of model ``i`` from a stacked state dict.

    Args:
        stacked: ``{name: (m, ...)}`` as returned by :meth:`Trainer.train`.
        i: model index in ``-m .. m - 1``.

    Returns:
        ``{name: (...)}``, views into ``stacked``.
    """
    m = _leading(stacked)
    if not -m <= i < m:
        raise ShapeError(
            f"model index {i} is out of range for a stack of {m} models; use 0..{m - 1}"
        )
    return {k: v[i] for k, v in stacked.items()}


def _leading(stacked: Mapping[str, Tensor]) -> int:
    sizes = {int(v.shape[0]) for v in stacked.values() if v.dim() > 0}
    if len(sizes) != 1:
        raise ShapeError(
            f"stacked state dict has leading dimensions {sorted(sizes)}; every tensor must "
            "have the same number of models in dimension 0 (use the output of Trainer.train)"
        )
    return sizes.pop()


def _mix(*parts: Any) -> int:
    """A 63-bit seed from a tuple of JSON-able parts (:func:`tdabench._io.mix_seed`, ``json``)."""
    return mix_seed(*parts, scheme="json")


def _take(t: Tensor, index: Tensor) -> Tensor:
    """``t[index]`` for an integer ``index`` of any shape, via ``index_select`` (several times
    faster than advanced indexing on the CPU for row gathers; same values)."""
    return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:])


def _unbatchable_norms(model: nn.Module) -> list[str]:
    """Modules with running statistics other than ``_BatchNorm`` (``InstanceNorm`` tracking
    statistics): the batched trainer has no functional form for them."""
    return [
        n
        for n, mod in model.named_modules()
        if isinstance(mod, running_stat_norm_types())
        and mod.track_running_stats
        and not isinstance(mod, batch_norm_types())
    ]


def _logits(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _tensor_digest(tensors: Sequence[Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_options(
    build_model: Any,
    kind: str,
    stream_seed: Any,
    stream_batch: Any,
    dtype: torch.dtype,
    eval_batch_size: Any,
) -> None:
    """Raise ``ConfigError`` for the first invalid trainer option (see :class:`SequentialTrainer`)."""
    if not callable(build_model):
        raise ConfigError("build_model must be a zero-argument callable returning an nn.Module")
    if kind not in _KINDS:
        raise ConfigError(f"kind {kind!r} is not supported; use one of {_KINDS}")
    if not (
        stream_batch in ("scaled", "fixed") or (isinstance(stream_batch, int) and stream_batch >= 1)
    ):
        raise ConfigError(
            f"stream_batch must be 'scaled', 'fixed' or a positive int, got {stream_batch!r}"
        )
    if not isinstance(stream_seed, int):
        raise ConfigError(f"stream_seed must be an int, got {stream_seed!r}")
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating dtype, got {dtype}")
    if eval_batch_size is not None and int(eval_batch_size) < 1:
        raise ConfigError(f"eval_batch_size must be a positive int or None, got {eval_batch_size}")


class _TrainerBase:
    """Shared validation, stream, loss, evaluation and fingerprint of both trainers."""

    name = "base"

    def __init__(
        self,
        build_model: Callable[[], nn.Module],
        train: Sequence[Tensor],
        test: Sequence[Tensor],
        recipe: Mapping[str, Any],
        *,
        kind: str = "classification",
        stream_seed: int = 0,
        stream_batch: str | int = "scaled",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        model_name: str | None = None,
        data_meta: Mapping[str, Any] | None = None,
        eval_batch_size: int | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        _check_options(build_model, kind, stream_seed, stream_batch, dtype, eval_batch_size)
        self.build_model = build_model
        self.kind = kind
        self.recipe = normalize_recipe(recipe)
        self.stream_seed = stream_seed
        self.stream_batch = stream_batch
        self.dtype = dtype
        if str(device) == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.model_name = model_name
        self.data_meta = dict(data_meta) if data_meta is not None else None
        self.eval_batch_size = None if eval_batch_size is None else int(eval_batch_size)
        self.planner = planner_for(self.device, memory_budget)
        self._sample_bytes: int | None = None
        self._data_sha256 = _tensor_digest([*train, *test])
        self._train = self._check_data(train, "train")
        self._test = self._check_data(test, "test")
        self.n_train = int(self._train[-1].shape[0])
        self.n_test = int(self._test[-1].shape[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self._template = self._build()
        self._param_names = [n for n, _ in self._template.named_parameters()]
        self._buffer_names = [n for n, _ in self._template.named_buffers()]
        self._state_keys = self._state_dict_sources(self._template)

    # ------------------------------------------------------------------ helpers
    def _check_data(self, data: Sequence[Tensor], what: str) -> tuple[Tensor, ...]:
        if (
            not isinstance(data, (tuple, list))
            or len(data) < 2
            or not all(isinstance(t, Tensor) for t in data)
        ):
            raise ShapeError(
                f"{what} data must be a tuple (*inputs, labels) of at least two tensors; "
                "pass BenchmarkData.train / .test"
            )
        n = {int(t.shape[0]) for t in data}
        if len(n) != 1 or 0 in n:
            raise ShapeError(
                f"{what} tensors must share a non-empty leading dimension, got "
                f"{[tuple(t.shape) for t in data]}"
            )
        for t in data:
            if t.is_floating_point():
                bad = (~torch.isfinite(t.reshape(t.shape[0], -1))).any(1).nonzero().flatten()
                if len(bad):
                    raise DataError(
                        f"{what} samples {bad[:10].tolist()} contain NaN/inf; clean or drop them "
                        "(one non-finite input poisons every model trained on the shared stream)"
                    )
        out = [
            t.to(self.device, self.dtype) if t.is_floating_point() else t.to(self.device)
            for t in data
        ]
        labels = out[-1]
        if labels.is_floating_point():
            raise ShapeError(
                f"{what} labels must be integer class / token ids, got {labels.dtype}; "
                "pass labels as int64"
            )
        if self.kind == "sequence" and labels.dim() != 2:
            raise ShapeError(
                f"sequence {what} labels must have shape (n, T), got {tuple(labels.shape)}"
            )
        if self.kind == "classification" and labels.dim() != 1:
            raise ShapeError(
                f"classification {what} labels must have shape (n,), got {tuple(labels.shape)}"
            )
        return tuple(out)

    def _build(self) -> nn.Module:
        model = self.build_model()
        if not isinstance(model, nn.Module):
            raise ConfigError(
                f"build_model() returned {type(model).__name__}, expected an nn.Module"
            )
        return model.to(device=self.device, dtype=self.dtype)

    @staticmethod
    def _state_dict_sources(model: nn.Module) -> dict[str, str]:
        """Map every state-dict key to the named parameter/buffer holding it (tied weights)."""
        by_id = {id(t): n for n, t in model.named_parameters()}
        by_id.update({id(t): n for n, t in model.named_buffers() if id(t) not in by_id})
        return {
            k: by_id[id(v)] for k, v in model.state_dict(keep_vars=True).items() if id(v) in by_id
        }

    def _check_call(self, masks: Tensor, seeds: Sequence[int]) -> tuple[Tensor, list[int]]:
        if not isinstance(masks, Tensor) or masks.dim() != 2 or masks.shape[1] != self.n_train:
            shape = tuple(masks.shape) if isinstance(masks, Tensor) else type(masks).__name__
            raise ShapeError(
                f"masks must be a bool tensor of shape (m, n_train={self.n_train}), got {shape}"
            )
        if masks.dtype != torch.bool:
            raise ConfigError(
                f"masks must have dtype torch.bool, got {masks.dtype}; pass masks.bool()"
            )
        seeds = [int(s) for s in seeds]
        if len(seeds) != masks.shape[0]:
            raise ShapeError(
                f"got {len(seeds)} seeds for {masks.shape[0]} masks; pass one seed per model"
            )
        if masks.shape[0] == 0:
            raise ShapeError("masks has no rows; pass at least one model to train")
        masks = masks.cpu()
        empty = (~masks.any(1)).nonzero().flatten().tolist()
        if empty:
            raise ConfigError(
                f"mask rows {empty} select no training sample; every model needs a non-empty subset"
            )
        return masks, seeds

    def stream_batch_size(self, masks: Tensor) -> int:
        """``B_stream`` for a call with these bool ``(m, n_train)`` masks (module docstring)."""
        bs = self.recipe["batch_size"]
        if isinstance(self.stream_batch, int):
            return min(self.stream_batch, self.n_train)
        if self.stream_batch == "fixed":
            return min(bs, self.n_train)
        sizes = sorted({int(s) for s in masks.sum(1).tolist()})
        bvals = sorted(
            {min(self.n_train, max(1, math.floor(bs * self.n_train / s + 0.5))) for s in sizes}
        )
        if len(bvals) != 1:
            raise ConfigError(
                f"stream_batch='scaled' gives different stream batch sizes {bvals} for the subset sizes "
                f"{sizes[0]}..{sizes[-1]} of this call; train models with subsets of one size together, "
                "or construct the trainer with stream_batch='fixed' or an int"
            )
        return bvals[0]

    def num_iters(self, b_stream: int) -> int:
        """Number of stream iterations of one training run."""
        if self.recipe["max_iters"] is not None:
            return self.recipe["max_iters"]
        return self.recipe["epochs"] * math.ceil(self.n_train / b_stream)

    def _epoch_ends(self, b_stream: int) -> Callable[[int], int | None]:
        """``it -> e`` if stream iteration ``it`` (0-based) is the last of epoch ``e`` (1-based),
        else ``None``; used to report per-epoch snapshots."""
        per = math.ceil(self.n_train / b_stream)

        def ends(it: int) -> int | None:
            return (it + 1) // per if (it + 1) % per == 0 else None

        return ends

    def _stream(self, b_stream: int) -> Iterator[tuple[int, int, Tensor]]:
        """Yield ``(iteration, epoch, indices)`` of the shared stream (indices on the CPU)."""
        total = self.num_iters(b_stream)
        it, epoch = 0, 0
        gen = torch.Generator()
        while it < total:
            gen.manual_seed(_mix("stream", self.stream_seed, epoch))
            perm = torch.randperm(self.n_train, generator=gen)
            for idx in perm.split(b_stream):
                if it >= total:
                    return
                yield it, epoch, idx
                it += 1
            epoch += 1

    def _per_sample_loss(self, out: Any, labels: Tensor) -> Tensor:
        logits = _logits(out)
        if self.kind == "classification":
            return F.cross_entropy(logits, labels, reduction="none")
        tok = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            reduction="none",
            ignore_index=-100,
        ).view(labels.shape)
        valid = (labels != -100).to(tok.dtype)
        return tok.sum(-1) / valid.sum(-1).clamp(min=1.0)

    def _target_values(self, out: Any, labels: Tensor, target: str) -> Tensor:
        logits = _logits(out)
        if target == "loss":
            return self._per_sample_loss(logits, labels)
        if target == "neg_loss":
            return -self._per_sample_loss(logits, labels)
        # margin: true-class logit minus logsumexp of the other logits (sequence: mean over tokens)
        true = logits.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        onehot = F.one_hot(labels.clamp(min=0), logits.shape[-1]).bool()
        others = torch.logsumexp(logits.masked_fill(onehot, float("-inf")), dim=-1)
        margin = true - others
        if self.kind == "classification":
            return margin
        valid = (labels != -100).to(margin.dtype)
        return (margin * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)

    def _split_stacked(
        self, stacked: Mapping[str, Tensor]
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], int]:
        m = _leading(stacked)
        names = self._param_names + self._buffer_names
        src = {v: k for k, v in self._state_keys.items()}  # source name -> one state-dict key
        missing = [n for n in names if n not in stacked and src.get(n) not in stacked]
        if missing:
            raise ShapeError(
                f"stacked state dict lacks {missing[:5]}; pass the dict returned by train()"
            )

        def get(n: str) -> Tensor:
            t = stacked[n] if n in stacked else stacked[src[n]]
            t = t.to(self.device)
            return t.to(self.dtype) if t.is_floating_point() else t

        return ({n: get(n) for n in self._param_names}, {n: get(n) for n in self._buffer_names}, m)

    def _to_state(
        self, params: Mapping[str, Tensor], buffers: Mapping[str, Tensor]
    ) -> dict[str, Tensor]:
        both = {**params, **buffers}
        return {k: both[src] for k, src in self._state_keys.items()}

    @staticmethod
    def _raise_nonfinite(rows: Sequence[int], where: str) -> None:
        raise NonFiniteError(
            f"training diverged (non-finite loss or parameters) for mask rows {list(rows)} {where}; "
            "lower the learning rate, set grad_clip in the recipe, or check the data for NaN/inf"
        )

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        """The recipe's autocast context for training forward passes (a no-op when off)."""
        name = self.recipe["autocast"]
        if name is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=AUTOCAST_DTYPES[name])

    def sample_bytes(self) -> int:
        """Activation bytes of one training sample in one forward pass, measured once by a dry
        forward of the template (sum of every module's outputs per sample; the autograd
        graph keeps about that much, and the backward pass as much again)."""
        if self._sample_bytes is None:
            total = [0]

            def hook(_mod: nn.Module, _inp: Any, out: Any) -> None:
                for t in out if isinstance(out, (tuple, list)) else (out,):
                    if isinstance(t, Tensor):
                        total[0] += t.numel() * t.element_size()

            model = self._template
            was_training = model.training
            handles = [mod.register_forward_hook(hook) for mod in model.modules()]
            try:
                model.eval()  # no running-statistics update
                k = min(
                    2, self.n_train
                )  # two samples: batch norm without running statistics needs them
                with torch.no_grad(), torch.random.fork_rng(devices=[]):
                    model(*(t[:k] for t in self._train[:-1]))
            finally:
                model.train(was_training)
                for h in handles:
                    h.remove()
            self._sample_bytes = max(1, total[0] // k)
        return self._sample_bytes

    def _param_bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self._template.parameters())

    def _eval_chunks(self, m: int) -> tuple[int, int]:
        """``(models, test samples)`` per evaluation forward pass, from the memory planner
        (``eval_batch_size`` overrides the samples: samples, or tokens for sequences). A model
        with batch norm *without* running statistics normalises with the statistics of its
        evaluation batch, which is then always the whole test set (chunking must not change
        the numbers)."""
        param_bytes = self._param_bytes() + sum(
            b.numel() * b.element_size() for b in self._template.buffers()
        )
        chunk_m = self._eval_models_per_chunk(m, param_bytes)
        if any(
            isinstance(mod, batch_norm_types()) and mod.running_mean is None
            for mod in self._template.modules()
        ):
            return chunk_m, self.n_test  # batch statistics in eval mode: over the whole test set
        if self.eval_batch_size is not None:
            chunk_n = self.eval_batch_size
            if self.kind == "sequence":
                chunk_n = max(1, chunk_n // max(1, self._test[-1].shape[1]))
            return chunk_m, chunk_n
        # live activations of a no-grad forward: about two consecutive layers' outputs, bounded
        # by the whole forward's outputs (sample_bytes) - take the bound
        chunk_n = self.planner.rows(
            self.sample_bytes() * chunk_m, fraction=0.25, stream=True, maximum=self.n_test
        )
        return chunk_m, chunk_n

    def _eval_models_per_chunk(self, m: int, param_bytes: int) -> int:
        """Models evaluated at once: as many whose parameters (and one test sample's
        activations each) fit a quarter of the budget."""
        return self.planner.rows(param_bytes + self.sample_bytes(), fraction=0.25, maximum=m)

    # ------------------------------------------------------------------ protocol
    def fingerprint(self) -> dict[str, Any]:
        """JSON-able description of everything that determines the trained numbers."""
        t = self._template
        return {
            "trainer": self.name,
            "trainer_version": TRAINER_VERSION,
            "setting": self.model_name,
            "kind": self.kind,
            # keys added after trainer version 1 enter only when set (old keys stay valid)
            "recipe": {k: v for k, v in self.recipe.items() if not (k == "autocast" and v is None)},
            "model": {
                "class": f"{type(t).__module__}.{type(t).__qualname__}",
                "repr": repr(t),
                "params": {n: list(p.shape) for n, p in t.named_parameters()},
                "buffers": {n: list(b.shape) for n, b in t.named_buffers()},
            },
            "stream_seed": self.stream_seed,
            "stream_batch": self.stream_batch,
            "dtype": str(self.dtype).replace("torch.", ""),
            "data": {
                "sha256": self._data_sha256,
                "n_train": self.n_train,
                "n_test": self.n_test,
                "meta": self.data_meta,
            },
        }

    @torch.no_grad()
    def evaluate(self, stacked: dict[str, Tensor], target: str | Callable) -> Tensor:
        """Target values of every model on every test sample.

        Args:
            stacked: stacked state dict ``{name: (m, ...)}`` from :meth:`train`.
            target: ``"loss"`` (per-sample cross-entropy), ``"neg_loss"``, ``"margin"``
                (true-class logit minus logsumexp of the other logits; for sequences the mean
                over tokens) or a callable ``f(state_dict, batch)`` returning the mean target of
                a batch, called on batches of one sample.

        Returns:
            Tensor of shape ``(m, n_test)`` (float, on the CPU).
        """
        if not callable(target) and target not in _TARGETS:
            raise ConfigError(
                f"target {target!r} is not supported; use one of {_TARGETS} or a callable f(params, data)"
            )
        params, buffers, m = self._split_stacked(stacked)
        model = self._template
        was_training = model.training
        model.eval()
        out = torch.empty(m, self.n_test, dtype=self.dtype)
        chunk_m, chunk_n = self._eval_chunks(m)
        logger.debug(
            "evaluate: %d models x %d test samples per pass (%r)", chunk_m, chunk_n, self.planner
        )
        try:
            for a in range(0, m, chunk_m):
                p = {k: v[a : a + chunk_m] for k, v in params.items()}
                b = {k: v[a : a + chunk_m] for k, v in buffers.items()}
                for s in range(0, self.n_test, chunk_n):
                    batch = tuple(t[s : s + chunk_n] for t in self._test)
                    out[a : a + chunk_m, s : s + batch[0].shape[0]] = self._eval_chunk(
                        batch, target, p, b
                    ).cpu()
        finally:
            model.train(was_training)
        return out

    def _eval_chunk(
        self,
        batch: tuple[Tensor, ...],
        target: str | Callable,
        p: dict[str, Tensor],
        b: dict[str, Tensor],
    ) -> Tensor:
        """Target values ``(mc, k)`` of the test ``batch`` (``(*inputs, labels)``, ``k`` rows)
        for the stacked parameters ``p`` and buffers ``b`` (``{name: (mc, ...)}``)."""
        inputs, labels = batch[:-1], batch[-1]
        if callable(target):

            def one_model(pp: dict[str, Tensor], bb: dict[str, Tensor]) -> Tensor:
                state = self._to_state(pp, bb)

                def one_sample(*sample: Tensor) -> Tensor:
                    return target(state, tuple(x.unsqueeze(0) for x in sample)).reshape(())

                return vmap(one_sample, randomness="different")(*batch)

            return vmap(one_model, randomness="different")(p, b)

        def fwd(pp: dict[str, Tensor], bb: dict[str, Tensor]) -> Tensor:
            o = functional_call(self._template, (pp, bb), tuple(inputs))
            return self._target_values(o, labels, target)

        return vmap(fwd, randomness="different")(p, b)


class SequentialTrainer(_TrainerBase):
    """Reference trainer: one model at a time, ``torch.optim`` on an ``nn.Module``.

    Args:
        build_model: zero-argument callable returning a fresh ``nn.Module`` (weights from the
            global RNG; called under ``torch.manual_seed(seeds[r])``).
        train: ``(*inputs, labels)`` training tensors, leading dimension ``n_train``.
        test: ``(*inputs, labels)`` test tensors, leading dimension ``n_test``.
        recipe: training recipe (keys of :data:`tdabench.groundtruth.optim.RECIPE_DEFAULTS`).
        kind: ``"classification"`` or ``"sequence"``.
        stream_seed: seed of the shared minibatch stream.
        stream_batch: ``"scaled"`` | ``"fixed"`` | int, the stream batch rule (module docstring).
        dtype: floating dtype of parameters and float inputs.
        device: torch device (``"auto"`` = CUDA when available).
        model_name: name recorded in the fingerprint (e.g. the benchmark setting).
        data_meta: JSON-able data identity recorded in the fingerprint.
        eval_batch_size: test samples (classification) or tokens (sequence) per forward pass
            in :meth:`evaluate`; ``None`` (default) sizes the passes with the memory planner
            (the batched trainer evaluates at most ``max_models_per_batch`` models at once).
        memory_budget: bytes, ``"8GiB"``-style string or fraction of the device for
            :func:`tdabench.memory.planner_for` (``None``: ``$TDABENCH_MEMORY_BUDGET``, else
            the device's free memory); sizes model chunks and evaluation passes only.
    """

    name = "sequential"

    def train(
        self, masks: Tensor, seeds: Sequence[int], on_epoch: EpochCallback | None = None
    ) -> dict[str, Tensor]:
        """Train one model per mask row.

        Args:
            masks: bool ``(m, n_train)``; row ``r`` is the training subset of model ``r``.
            seeds: ``m`` ints, the initialisation seeds.
            on_epoch: optional :data:`EpochCallback`, called after every completed epoch of
                the shared stream (here once per model: ``rows == [r]``). Snapshots taken this
                way equal training with ``epochs`` truncated for a constant learning rate
                (schedules depend on the total length).

        Returns:
            Stacked state dict ``{name: (m, ...)}``.
        """
        masks, seeds = self._check_call(masks, seeds)
        b_stream = self.stream_batch_size(masks)
        total = self.num_iters(b_stream)
        epoch_end = self._epoch_ends(b_stream)
        states = []
        inputs, labels = self._train[:-1], self._train[-1]
        clip = self.recipe["grad_clip"]
        for r in tqdm(range(len(seeds)), desc="train (sequential)", disable=None, leave=False):
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                torch.manual_seed(seeds[r])
                model = self._build()
                model.train()
                opt = make_torch_optimizer(self.recipe, model.parameters())
                row = masks[r]
                for it, epoch, idx in self._stream(b_stream):
                    sel = idx[row[idx]]
                    if sel.numel() == 0:
                        self._snapshot_one(on_epoch, epoch_end(it), r, model)
                        continue
                    sel = sel.to(self.device)
                    lr = lr_at(self.recipe, it, total)
                    for group in opt.param_groups:
                        group["lr"] = lr
                    opt.zero_grad(set_to_none=True)
                    with self._autocast():
                        out = model(*(t[sel] for t in inputs))
                        loss = self._per_sample_loss(out, labels[sel]).to(self.dtype).mean()
                    if not torch.isfinite(loss):
                        self._raise_nonfinite([r], f"(iteration {it}, epoch {epoch})")
                    loss.backward()
                    if clip is not None:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
                    opt.step()
                    self._snapshot_one(on_epoch, epoch_end(it), r, model)
                if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
                    self._raise_nonfinite([r], "(final parameters)")
                states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return {k: torch.stack([s[k] for s in states]) for k in states[0]}

    @staticmethod
    def _snapshot_one(
        on_epoch: EpochCallback | None, epoch: int | None, r: int, model: nn.Module
    ) -> None:
        if on_epoch is not None and epoch is not None:
            on_epoch(
                epoch,
                [r],
                {k: v.detach().clone().unsqueeze(0) for k, v in model.state_dict().items()},
            )


class BatchedTrainer(_TrainerBase):
    """Trains many models at once: ``vmap(grad(...))`` over stacked parameters.

    Same arguments as :class:`SequentialTrainer`, plus:

    Args:
        max_models_per_batch: train at most this many models at once (``None`` = as many as
            the memory planner fits, :meth:`models_per_chunk`); the results do not depend on it
            because the minibatch stream is shared.
        fast_linear: route ``nn.Linear`` layers through
            :class:`tdabench.groundtruth._vmap_linear.StackedLinear` during training (one GEMM
            for all models where the layer input is shared; same numbers up to rounding).
        compact: feed each model only its own members of a stream batch, padded to the largest
            member count of the chunk (zero weight), instead of the whole stream batch; used on a
            step when that count is at most 80% of ``B_stream``. Saves compute when subsets are
            small; same numbers up to rounding. ``None`` = on for models with at least
            20,000 parameters (where compute dominates). On the fast path it picks the
            first-layer mode for the whole run.
        fast_path: train plain ``nn.Linear`` / ``nn.Sequential`` Linear-ReLU stacks
            (classification, SGD without gradient clipping) with hand-written batched
            forward/backward passes (:mod:`tdabench.groundtruth._fast_mlp`) instead of
            ``vmap(grad(...))``; same numbers up to rounding. Whether it applies is in the
            attributes ``fast_path`` (bool) and ``fast_path_reason`` (str, also logged at debug).

    Raises:
        ConfigError: the model has running statistics other than ``BatchNorm`` (use
            :class:`SequentialTrainer`, or ``make_trainer(..., batched=False)``).
    """

    name = "batched"

    def __init__(
        self,
        *args: Any,
        max_models_per_batch: int | None = None,
        fast_linear: bool = True,
        compact: bool | None = None,
        fast_path: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.fast_linear = bool(fast_linear)
        if compact is None:  # auto: worth it for compute-heavy models only
            compact = sum(p.numel() for p in self._template.parameters()) >= _COMPACT_MIN_PARAMS
        self.compact = bool(compact)
        if max_models_per_batch is not None and int(max_models_per_batch) < 1:
            raise ConfigError(
                f"max_models_per_batch must be a positive int or None, got {max_models_per_batch}"
            )
        self.max_models_per_batch = (
            None if max_models_per_batch is None else int(max_models_per_batch)
        )
        bad_norms = _unbatchable_norms(self._template)
        if bad_norms:
            raise ConfigError(
                f"BatchedTrainer cannot train the modules {bad_norms[:3]} (running statistics other than "
                "BatchNorm); use SequentialTrainer (make_trainer(..., batched=False)) or "
                "track_running_stats=False"
            )
        self._bn = BatchNormContext()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self._train_template = self._build()
        patch_batch_norm_layers(self._train_template, self._bn)
        # compact steps give every model its own inputs, where StackedLinear has no faster
        # kernel than plain nn.Linear (both bmm) and only adds torch.func overhead per call
        self._compact_template = self._train_template
        if self.fast_linear:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self._compact_template = self._build()
            patch_batch_norm_layers(self._compact_template, self._bn)
            patch_linear_layers(self._train_template)
        self._fast_layers, self.fast_path_reason = self._plan_fast(bool(fast_path))
        self.fast_path = self._fast_layers is not None
        logger.debug(
            "BatchedTrainer fast path %s: %s",
            "on" if self.fast_path else "off",
            self.fast_path_reason,
        )

    def _plan_fast(self, enabled: bool) -> tuple[Any, str]:
        if not enabled:
            return None, "disabled (fast_path=False)"
        if self.recipe["autocast"] is not None:  # the hand-written passes have no autocast form
            return None, f"autocast {self.recipe['autocast']!r}"
        layers, reason = fast_plan(
            self._template, self.recipe, self.kind, len(self._train) - 1, bool(self._buffer_names)
        )
        if layers is None:
            return None, reason
        x = self._train[0]
        if not x.is_floating_point():
            return None, "integer inputs"
        first = next((c for c in self._template.children() if not isinstance(c, nn.Identity)), None)
        flattens = type(first) is nn.Flatten or callable(
            getattr(self._template, "linear_relu_stack", None)
        )
        if x.dim() != 2 and not flattens:  # nn.Linear would act on the last dim
            return None, f"inputs of shape {tuple(x.shape)} without nn.Flatten"
        if x[:1].reshape(1, -1).shape[1] != layers[0][1].in_features:
            return None, "input width does not match the first nn.Linear"
        names = set(self._param_names)
        expected = {
            f"{n}.{w}" if n else w
            for n, lin, _ in layers
            for w in (("weight", "bias") if lin.bias is not None else ("weight",))
        }
        if names != expected:
            return None, "parameters other than the Linear weights and biases"
        return layers, reason

    def _eval_models_per_chunk(self, m: int, param_bytes: int) -> int:
        if self.max_models_per_batch is not None:
            return min(m, self.max_models_per_batch)
        return super()._eval_models_per_chunk(m, param_bytes)

    def models_per_chunk(self, m: int, b_stream: int) -> int:
        """Models trained at once: ``max_models_per_batch`` if set, else as many as the memory
        planner fits in half the budget. Per model: parameters, gradients, optimiser state and
        a copy for the update, plus the activations of one stream batch (forward outputs kept
        for the backward pass and their gradients, :meth:`sample_bytes` measured)."""
        if self.max_models_per_batch is not None:
            return min(m, self.max_models_per_batch)
        states = {"sgd": 1 if self.recipe["momentum"] else 0, "adam": 2, "adamw": 2}[
            self.recipe["optimizer"]
        ]
        per_model = self._param_bytes() * (3 + states) + 2 * self.sample_bytes() * b_stream
        n = self.planner.rows(per_model, fraction=0.5, maximum=m)
        logger.debug(
            "train: %d of %d models per chunk (%d bytes each, %r)", n, m, per_model, self.planner
        )
        return n

    def _masked_loss(
        self,
        p: dict[str, Tensor],
        b: dict[str, Tensor],
        inputs: tuple[Tensor, ...],
        labels: Tensor,
        w: Tensor,
        template: nn.Module | None = None,
    ) -> tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]:
        """Weighted mean loss of one model; aux = (loss, new batch-norm running statistics)."""
        self._bn.begin(w)
        try:
            with self._autocast():
                out = functional_call(
                    self._train_template if template is None else template, (p, b), inputs
                )
                per = self._per_sample_loss(out, labels).to(w.dtype)
        finally:
            updates = self._bn.end()
        loss = (w * per).sum() / w.sum().clamp(min=1.0)
        return loss, (loss.detach(), updates)

    def train(
        self, masks: Tensor, seeds: Sequence[int], on_epoch: EpochCallback | None = None
    ) -> dict[str, Tensor]:
        """Train one model per mask row: the arguments and result of
        :meth:`SequentialTrainer.train` (bool masks ``(m, n_train)``, ``m`` seeds, stacked state
        ``{name: (m, ...)}``), :meth:`models_per_chunk` models at a time; ``on_epoch`` is called
        once per epoch and chunk."""
        masks, seeds = self._check_call(masks, seeds)
        b_stream = self.stream_batch_size(masks)
        m = len(seeds)
        chunk = self.models_per_chunk(m, b_stream)
        parts = []
        for a in tqdm(range(0, m, chunk), desc="train (batched)", disable=None, leave=False):
            parts.append(
                self._train_chunk(masks[a : a + chunk], seeds[a : a + chunk], a, b_stream, on_epoch)
            )
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}

    def _train_chunk(
        self,
        masks: Tensor,
        seeds: list[int],
        offset: int,
        b_stream: int,
        on_epoch: EpochCallback | None = None,
    ) -> dict[str, Tensor]:
        """Train the models of mask rows ``offset ..`` together (``masks`` bool
        ``(mc, n_train)`` on the CPU, one seed each); returns their stacked state."""
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            params, buffers = self._init_stacked(seeds)
            torch.manual_seed(_mix("dropout", self.stream_seed, seeds))
            bad = torch.zeros(len(seeds), dtype=torch.bool, device=self.device)
            chunk = _Chunk(masks, offset, b_stream, on_epoch, bad)
            if self._fast_layers is not None:
                return self._train_chunk_fast(params, buffers, chunk)
            self._train_chunk_vmap(params, buffers, chunk)
        return self._to_state(params, buffers)

    def _init_stacked(self, seeds: list[int]) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Stacked initial parameters and buffers ``{name: (mc, ...)}``: model ``r`` built under
        ``torch.manual_seed(seeds[r])`` (the caller forks the RNG)."""
        models = []
        for s in seeds:
            torch.manual_seed(s)
            models.append(self._build())
        params = {
            n: torch.stack([dict(md.named_parameters())[n].detach() for md in models]).clone()
            for n in self._param_names
        }
        buffers = {
            n: torch.stack([dict(md.named_buffers())[n].detach() for md in models]).clone()
            for n in self._buffer_names
        }
        return params, buffers

    def _train_chunk_vmap(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], chunk: _Chunk
    ) -> None:
        """:meth:`_train_chunk` on the generic ``vmap(grad(...))`` path (updates in place)."""
        total = self.num_iters(chunk.b_stream)
        epoch_end = self._epoch_ends(chunk.b_stream)
        self._train_template.train()
        self._compact_template.train()
        weights = chunk.masks.to(self.device, self.dtype)  # (mc, n_train)
        opt = FunctionalOptimizer(self.recipe)
        state = opt.init(params)
        grad_fns = self._grad_fns()
        clip = self.recipe["grad_clip"]
        for it, idx in self._chunk_stream(chunk):
            member = chunk.masks[:, idx]  # (mc, B) bool, CPU
            act = member.any(1)
            active = None if bool(act.all()) else act.to(self.device)
            grads, (losses, updates) = self._batch_grads(
                grad_fns, params, buffers, weights, idx, member
            )
            chunk.bad |= ~torch.isfinite(losses)
            if clip is not None:
                clip_grad_norms_(grads, clip)
            opt.step(params, grads, state, lr_at(self.recipe, it, total), active)
            _commit_buffers(buffers, updates, active)
            chunk.snapshot(epoch_end(it), lambda: _detached(self._to_state(params, buffers)))
        final_bad = torch.zeros_like(chunk.bad)
        for p in params.values():
            final_bad |= ~torch.isfinite(p.flatten(1)).all(1)
        self._check_bad(final_bad, chunk.offset, "(final parameters)")

    def _grad_fns(self) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """Per-model gradients of the masked mean loss, ``vmap``-ed over the models: on the
        shared stream batch, and on each model's own (compact) batch."""
        step_fn = vmap(
            grad(self._masked_loss, has_aux=True),
            in_dims=(0, 0, None, None, 0),
            randomness="different",
        )
        compact_loss = functools.partial(self._masked_loss, template=self._compact_template)
        compact_fn = vmap(
            grad(compact_loss, has_aux=True), in_dims=(0, 0, 0, 0, 0), randomness="different"
        )
        return step_fn, compact_fn

    def _batch_grads(
        self,
        grad_fns: tuple[Callable[..., Any], Callable[..., Any]],
        params: dict[str, Tensor],
        buffers: dict[str, Tensor],
        weights: Tensor,
        idx: Tensor,
        member: Tensor,
    ) -> tuple[dict[str, Tensor], tuple[Tensor, dict[str, Tensor]]]:
        """``(grads, (losses, buffer updates))`` of every model on stream batch ``idx`` ``(B,)``
        (``member`` bool ``(mc, B)``): each model's own members when the largest member count
        is at most 80% of the batch (``compact``), else the whole batch with 0/1 weights."""
        step_fn, compact_fn = grad_fns
        inputs, labels = self._train[:-1], self._train[-1]
        k_max = int(member.sum(1).max())
        if self.compact and k_max <= _COMPACT_MAX_FILL * len(idx):
            # members first (stream order kept), padded with zero-weight non-members
            order = torch.argsort((~member).to(torch.uint8), dim=1, stable=True)[:, :k_max]
            sel = idx[order].to(self.device)  # (mc, k_max)
            w = member.gather(1, order).to(self.device, self.dtype)
            return compact_fn(
                params, buffers, tuple(_take(t, sel) for t in inputs), _take(labels, sel), w
            )
        idx_d = idx.to(self.device)
        return step_fn(
            params,
            buffers,
            tuple(_take(t, idx_d) for t in inputs),
            _take(labels, idx_d),
            weights.index_select(1, idx_d),
        )

    def _train_chunk_fast(
        self, params: dict[str, Tensor], buffers: dict[str, Tensor], chunk: _Chunk
    ) -> dict[str, Tensor]:
        """:meth:`_train_chunk` on the fast path (same stream, checks and callbacks)."""
        total = self.num_iters(chunk.b_stream)
        epoch_end = self._epoch_ends(chunk.b_stream)
        fast = FastStack(self._fast_layers, params, self._train[0], self.recipe, self.compact)
        labels = self._train[-1]
        # (n_train, mc): row gathers are cheap
        masks_t = chunk.masks.t().to(self.device, self.dtype).contiguous()
        for it, idx in self._chunk_stream(chunk):
            idx_d = idx.to(self.device)
            b = fast.step(
                idx_d, masks_t.index_select(0, idx_d), labels, lr_at(self.recipe, it, total)
            )
            if b is not None:
                chunk.bad |= b
            chunk.snapshot(epoch_end(it), lambda: self._to_state(fast.state(), buffers))
        self._check_bad(~fast.finite(), chunk.offset, "(final parameters)")
        return self._to_state(fast.state(), buffers)

    def _chunk_stream(self, chunk: _Chunk) -> Iterator[tuple[int, Tensor]]:
        """``(iteration, indices)`` of the shared stream; raises for the models of
        ``chunk.bad`` (diverged so far) at the end of every epoch and of the stream."""
        last_epoch = 0
        for it, epoch, idx in self._stream(chunk.b_stream):
            if epoch != last_epoch:
                self._check_bad(chunk.bad, chunk.offset, f"(epoch {last_epoch})")
                last_epoch = epoch
            yield it, idx
        self._check_bad(chunk.bad, chunk.offset, f"(epoch {last_epoch})")

    def _check_bad(self, bad: Tensor, offset: int, where: str) -> None:
        if bool(bad.any()):
            self._raise_nonfinite(
                [offset + int(i) for i in bad.nonzero().flatten().tolist()], where
            )


@dataclass
class _Chunk:
    """The models of one :meth:`BatchedTrainer._train_chunk` call.

    Attributes:
        masks: bool ``(mc, n_train)`` on the CPU, mask rows ``offset .. offset + mc - 1``.
        offset: the mask row of the chunk's first model.
        b_stream: stream batch size.
        on_epoch: the caller's :data:`EpochCallback`, or None.
        bad: bool ``(mc,)`` on the device: the models whose loss was not finite so far.
    """

    masks: Tensor
    offset: int
    b_stream: int
    on_epoch: EpochCallback | None
    bad: Tensor

    def snapshot(self, epoch: int | None, state: Callable[[], dict[str, Tensor]]) -> None:
        """Report ``state()`` to ``on_epoch`` if an epoch ended (``epoch`` is not None)."""
        if self.on_epoch is not None and epoch is not None:
            self.on_epoch(epoch, list(range(self.offset, self.offset + len(self.masks))), state())


def _detached(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def _commit_buffers(
    buffers: dict[str, Tensor], updates: Mapping[str, Tensor], active: Tensor | None
) -> None:
    """Replace stacked buffers ``(m, ...)`` by their ``updates`` for the ``active`` models."""
    for k, new in updates.items():
        if active is None:
            buffers[k] = new
        else:
            buffers[k] = torch.where(active.view((-1,) + (1,) * (new.dim() - 1)), new, buffers[k])


def make_trainer(
    setting: Any,
    data: Any,
    batched: bool = True,
    device: str | torch.device = "cpu",
    **options: Any,
) -> SequentialTrainer | BatchedTrainer:
    """The trainer for a benchmark setting and its data (see ARCHITECTURE.md).

    Uses only ``setting.build_model``, ``setting.kind``, ``setting.recipe``, ``setting.name``
    and ``data.train``, ``data.test``, ``data.meta``. Models with running statistics
    other than BatchNorm (``InstanceNorm`` tracking statistics) get a :class:`SequentialTrainer`
    even when ``batched=True`` (logged); BatchNorm trains batched.

    Args:
        setting: a ``tdabench.benchmark.BenchmarkSetting``.
        data: its ``BenchmarkData``.
        batched: :class:`BatchedTrainer` if True, else :class:`SequentialTrainer`.
        device: torch device or ``"auto"``.
        **options: further trainer arguments (``stream_seed``, ``stream_batch``, ``dtype``,
            ``eval_batch_size``, ``memory_budget``, ``max_models_per_batch`` for the batched
            trainer).
    """
    kwargs = dict(kind=setting.kind, model_name=setting.name, data_meta=data.meta, device=device)
    kwargs.update(options)
    if batched:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            probe = setting.build_model()
        if _unbatchable_norms(probe):
            logger.info(
                "setting %s has running statistics other than BatchNorm; using SequentialTrainer",
                setting.name,
            )
            batched = False
    if not batched:
        kwargs.pop("max_models_per_batch", None)
        return SequentialTrainer(
            setting.build_model, data.train, data.test, setting.recipe, **kwargs
        )
    return BatchedTrainer(setting.build_model, data.train, data.test, setting.recipe, **kwargs)
