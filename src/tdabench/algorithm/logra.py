"""LoGra: influence functions on gradients projected through per-layer Kronecker factors.

For a layer ``s = W a (+ b)`` (``nn.Linear``, or ``nn.Conv2d`` on unfolded patches) the
gradient of sample ``i``'s loss is ``G_i = Σ_t g_{i,t} a_{i,t}ᵀ`` (``g`` the gradient with
respect to the layer's output at position ``t``, ``a`` its input with a trailing 1 for the
bias; :mod:`tdabench.func.capture`). LoGra (Choe et al., 2024) projects it with a Kronecker
product of two small random matrices, without ever forming ``G_i``::

    p_i = vec(P_outᵀ G_i P_in) = vec(Σ_t (P_outᵀ g_{i,t}) (P_inᵀ a_{i,t})ᵀ)     (k_out · k_in,)

``P_out`` ``(d_out, k_out)`` and ``P_in`` ``(d_in', k_in)`` are Gaussian with entries
``N(0, 1/k)``, so ``E[(P_out ⊗ P_in)(P_out ⊗ P_in)ᵀ] = I``: projected inner products are
unbiased (Johnson-Lindenstrauss). A component whose dimension is at most its ``k`` is not
projected (identity): a random map from ``d ≤ k`` dimensions up to ``k`` adds no information
(dattri 0.3.0 expands it; here it stays exact and cheaper).

Then, per layer ``l``, with ``F_l = (1/n) Σ_i p_il p_ilᵀ`` over the cache loader's samples (the
empirical Fisher in the projected space, ``hessian="eFIM"``) or ``F_l = I``
(``hessian="Identity"``)::

    score[i, j] = Σ_l p^t_jlᵀ (F_l + λ_l I)^{-1} p_il,     λ_l = damping · tr(F_l) / k_l

where ``p^t_j`` is the projected *target* gradient of test sample ``j``, ``damping`` is
relative to the mean eigenvalue of ``F_l`` as in dattri (``None`` = 1e-5, dattri's default),
and scores are averaged over checkpoints. The inverse is applied once to the test side (one
Cholesky factorisation per layer), and scores are one GEMM against the projected training
gradients, which are kept from :meth:`cache` (``offload``) and reused when :meth:`attribute`
gets a training loader over the same samples in the same order (:func:`same_samples`).

Loss functions: ``loss_func(params, data)`` (the tdabench form) or dattri's LoGra form
``loss_func(model, batch, device)`` (three positional parameters), both returning the batch
mean.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import accumulate, pairwise
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from tdabench._validate import check_choice, check_int, check_real
from tdabench.algorithm.arguments import (
    MethodArguments,
    _check_budget,
    _check_layer_name,
    register_arguments,
)
from tdabench.algorithm.base import BaseAttributor, accumulate_scores
from tdabench.errors import ConfigError, DataError, StoreError
from tdabench.func.capture import LayerIO, capture, capture_task, layer_param_names, select_modules
from tdabench.func.projection import make_projector
from tdabench.func.utils import Batch, batch_size_of, check_finite, same_samples
from tdabench.memory import MemoryPlanner, planner_for
from tdabench.task import AttributionTask

__all__ = [
    "HESSIANS",
    "OFFLOADS",
    "BlockProjectedArguments",
    "LoGraArguments",
    "LoGraAttributor",
    "average_over_checkpoints",
    "factor_dims",
]

logger = logging.getLogger(__name__)

HESSIANS = ("Identity", "eFIM")
OFFLOADS = ("none", "cpu", "disk")
DEFAULT_RELATIVE_DAMPING = 1e-5
"""dattri's default ``damping`` (relative to the mean eigenvalue of ``F_l``)."""


def _perfect_square(value: int, what: str) -> int:
    root = math.isqrt(value) if value > 0 else 0
    if root * root != value:
        raise ConfigError(
            f"{what} must be a perfect square for the factorised projection; got {value} "
            f"(sqrt = {math.sqrt(max(value, 0)):.3f}); pass e.g. {max(1, root) ** 2} or {(root + 1) ** 2}"
        )
    return root


@dataclass
class BlockProjectedArguments(MethodArguments):
    """Hyper-parameters shared by LoGra and FactGraSS (validated on construction).

    Attributes:
        layer_names: module names (``model.named_modules()``) of the layers; ``None`` = all
            ``nn.Linear`` / ``nn.Conv2d`` modules.
        hessian: ``"eFIM"`` (empirical Fisher of the projected gradients) or ``"Identity"``.
        damping: ``λ_l / (tr(F_l)/k_l)``, relative to the mean eigenvalue; ``None`` = 1e-5.
        proj_dim: LoGra: ``k_out · k_in``, a perfect square (each factor ``sqrt(proj_dim)``);
            FactGraSS: the output dimension of the second (sparse) stage.
        offload: where the projected training gradients are kept: ``"none"`` (on ``device``),
            ``"cpu"`` (host memory) or ``"disk"`` (safetensors shards under ``cache_dir``).
        cache_dir: directory of the ``"disk"`` shards (required then).
        chunk_size: loader batches per ``"disk"`` shard.
        seed: seed of the random projections.
        memory_budget: the planner's budget.
    """

    execution_keys: ClassVar[tuple[str, ...]] = (
        "memory_budget",
        "offload",
        "cache_dir",
        "chunk_size",
    )

    layer_names: Any = None
    hessian: str = "eFIM"
    damping: float | None = None
    proj_dim: int = 4096
    offload: str = "cpu"
    cache_dir: str | None = None
    chunk_size: int = 16
    seed: int = 0
    memory_budget: Any = None

    def __post_init__(self) -> None:
        self.layer_names = _check_layer_name(self.layer_names)
        check_choice("hessian", self.hessian, HESSIANS, "the curvature in the projected space")
        if self.damping is not None:
            self.damping = check_real(
                "damping", self.damping, 0.0, fix="pass a value >= 0 or None (= 1e-5)"
            )
        self.proj_dim = check_int("proj_dim", self.proj_dim, 1)
        self.chunk_size = check_int("chunk_size", self.chunk_size, 1)
        self.seed = check_int("seed", self.seed, 0)
        check_choice(
            "offload", self.offload, OFFLOADS, "where the projected training gradients are kept"
        )
        if self.offload == "disk" and not self.cache_dir:
            raise ConfigError(
                "cache_dir must be provided when offload='disk'; pass a writable directory"
            )
        self.memory_budget = _check_budget(self.memory_budget)

    @property
    def relative_damping(self) -> float:
        return DEFAULT_RELATIVE_DAMPING if self.damping is None else float(self.damping)


@register_arguments("LoGraAttributor")
@dataclass
class LoGraArguments(BlockProjectedArguments):
    """Arguments of :class:`LoGraAttributor`: ``proj_dim`` must be a perfect square."""

    def __post_init__(self) -> None:
        super().__post_init__()
        _perfect_square(self.proj_dim, "proj_dim")


def factor_dims(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in')`` of a captured module: output width and input width (+1 with a bias)."""
    if isinstance(module, nn.Conv2d):
        d_out = module.out_channels
        d_in = module.in_channels * int(math.prod(module.kernel_size))
    else:
        d_out, d_in = module.out_features, module.in_features  # type: ignore[assignment]
    return int(d_out), int(d_in) + (1 if getattr(module, "bias", None) is not None else 0)


class LayerCompressor:
    """Maps one layer's captured ``(a, g)`` to projected gradients ``(B, dim)``.

    The base class is LoGra's factorised Gaussian projection; ``P_*`` of ``None`` is the
    identity. Subclasses (FactGraSS) override :meth:`factors` and :meth:`second_stage`.
    """

    def __init__(self, p_out: Tensor | None, p_in: Tensor | None, d_out: int, d_in: int) -> None:
        self.p_out, self.p_in = p_out, p_in
        self.k_out = d_out if p_out is None else int(p_out.shape[1])
        self.k_in = d_in if p_in is None else int(p_in.shape[1])

    @property
    def dim(self) -> int:
        return self.k_out * self.k_in

    def factors(self, io: LayerIO) -> tuple[Tensor, Tensor]:
        """Projected factors ``(B, T, k_out)`` and ``(B, T, k_in)``."""
        g = io.g if self.p_out is None else io.g @ self.p_out
        a = io.a if self.p_in is None else io.a @ self.p_in
        return g, a

    def second_stage(self, x: Tensor) -> Tensor:
        return x

    def __call__(self, io: LayerIO) -> Tensor:
        g, a = self.factors(io)
        if g.shape[1] == 1:
            x = (g[:, 0, :, None] * a[:, 0, None, :]).reshape(g.shape[0], -1)
        else:
            x = torch.einsum("bto,bti->boi", g, a).reshape(g.shape[0], -1)
        return self.second_stage(x)


def _gaussian(d: int, k: int, seed: int, device: torch.device, dtype: torch.dtype) -> Tensor | None:
    """A ``(d, k)`` Gaussian ``N(0, 1/k)`` matrix, or ``None`` (identity) when ``d <= k``."""
    if d <= k:
        return None
    return make_projector(
        d,
        k,
        seed=seed,
        proj_type="gaussian",
        device=device,
        dtype=dtype,
        max_chunk_bytes=max(2**20, 16 * d * k),
    ).matrix()


class _GradStore:
    """Projected training gradients kept between :meth:`cache` and :meth:`attribute`.

    In memory (``offload`` ``"none"``/``"cpu"``) at most ``limit`` bytes are kept: past that the
    store gives up (``complete`` becomes ``False``) and :meth:`attribute` recomputes the
    projections. On disk there is no limit.
    """

    def __init__(
        self,
        offload: str,
        device: torch.device,
        cache_dir: str | None,
        chunk_size: int,
        tag: str,
        limit: int,
    ) -> None:
        self.offload, self.device, self.chunk_size, self.limit = offload, device, chunk_size, limit
        self.dir = Path(cache_dir) / tag if offload == "disk" and cache_dir else None
        self.complete = True
        self._bytes = 0
        self._parts: list[Tensor] = []
        self._files: list[Path] = []
        self._pending: list[Tensor] = []
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def append(self, x: Tensor) -> None:
        if self.dir is None:
            self._bytes += x.numel() * x.element_size()
            if self._bytes > self.limit:
                if self.complete:
                    logger.info(
                        "the projected training gradients exceed %d bytes of the memory budget; "
                        "attribute() will recompute them",
                        self.limit,
                    )
                self.complete, self._parts = False, []
            if self.complete:
                self._parts.append(x if self.offload == "none" else x.to("cpu"))
            return
        self._pending.append(x.to("cpu"))
        if len(self._pending) >= self.chunk_size:
            self._flush()

    def _flush(self) -> None:
        if not self._pending or self.dir is None:
            return
        from safetensors.torch import save_file

        path = self.dir / f"grads_{len(self._files):06d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        save_file({"grads": torch.cat(self._pending).contiguous()}, str(tmp))
        tmp.replace(path)
        self._files.append(path)
        self._pending = []

    def close(self) -> None:
        self._flush()

    def __iter__(self) -> Iterator[Tensor]:
        if self.dir is None:
            for x in self._parts:
                yield x.to(self.device)
            return
        from safetensors.torch import load_file

        for path in self._files:
            try:
                yield load_file(str(path), device=str(self.device))["grads"]
            except Exception as exc:  # removed or truncated by someone else
                raise StoreError(
                    f"cannot read the offloaded gradients {str(path)!r} ({exc}); call cache() again"
                ) from exc


class BlockProjectedAttributor(BaseAttributor):
    """Shared machinery of LoGra and FactGraSS: capture, compress, Fisher, scores.

    Subclasses implement :meth:`_make_compressor`.
    """

    requires_cache = True

    # Spelled out: dattri 0.3.0's constructor signature (positional order and defaults)
    def __init__(
        self,
        task: AttributionTask,
        layer_names: str | Sequence[str] | None,
        device: str | torch.device,
        args: BlockProjectedArguments,
        memory_budget: int | str | None = None,
    ) -> None:
        self.modules = select_modules(task.model, layer_names)
        params = [p for name, m in self.modules.items() for p in layer_param_names(name, m)]
        super().__init__(task, layer_name=params, device=device)
        self.args = args
        self.layer_names = list(self.modules)
        self.planner: MemoryPlanner = planner_for(self.device, memory_budget)
        self.compressors: list[LayerCompressor] = []
        self.layer_dims: list[int] | None = None
        self._model_style = _takes_model(task.loss_func)
        self._factors: dict[int, list[Tensor | None]] = {}
        self._stores: dict[int, _GradStore] = {}
        self._cache_loader: Any = None

    # ----------------------------------------------------------------- compression
    def _make_compressor(
        self, index: int, name: str, module: nn.Module
    ) -> LayerCompressor:  # pragma: no cover
        raise NotImplementedError

    def _setup(self) -> None:
        if not self.compressors:
            self.compressors = [
                self._make_compressor(i, n, m) for i, (n, m) in enumerate(self.modules.items())
            ]
            self.layer_dims = [c.dim for c in self.compressors]

    def _capture(self, batch: Batch, which: str, index: int) -> dict[str, LayerIO]:
        if not self._model_style:
            return capture_task(self.task, batch, self.modules, which, index, self.device)
        func = self.task.loss_func if which == "loss" else self.task.target_func
        self.task.get_params(index)  # loads checkpoint ``index`` into task.model
        model = self.task.model.to(self.device)
        scale = float(batch_size_of(batch))
        return capture(self.modules, lambda: func(model, batch, self.device), scale)

    def projected(self, batch: Batch, which: str = "loss", index: int = 0) -> Tensor:
        """Projected per-sample gradients ``(B, Σ_l dim_l)`` of ``batch`` (layers concatenated)."""
        self._setup()
        ios = self._capture(batch, which, index)
        out = torch.cat(
            [c(ios[n]) for c, n in zip(self.compressors, self.layer_names, strict=True)], dim=1
        )
        return check_finite(
            out,
            f"projected per-sample gradient of the {which}",
            fix="check the checkpoint, the data and the loss function",
        )

    def _slices(self) -> list[tuple[int, int]]:
        assert self.layer_dims is not None
        bounds = [0, *accumulate(self.layer_dims)]
        return list(pairwise(bounds))

    # ----------------------------------------------------------------- cache
    def cache(self, full_train_loader: Iterable[Batch]) -> None:
        """Project the cache loader's training gradients, keep them (``offload``) and factorise
        ``F_l + λ_l I`` per layer at every checkpoint.

        Args:
            full_train_loader: loader over the training set whose projected gradients define ``F_l``.

        Raises:
            DataError: the loader holds no sample.
            NonFiniteError: a projected gradient is NaN or infinite.
        """
        start = time.perf_counter()
        self._cached = False
        self._setup()
        self._stores, self._factors = {}, {}
        item = torch.empty((), dtype=self.dtype).element_size()
        self.planner.require(
            2 * sum(d * d for d in self.layer_dims or []) * item,
            "the projected Fisher matrices",
            "lower proj_dim or select fewer layers with layer_names",
        )
        for k in range(self.task.num_checkpoints):
            n = self._cache_checkpoint(k, full_train_loader)
        self._cache_loader = full_train_loader
        self._cached = True
        logger.info(
            "%s cached %d samples, %d layer(s) (dims %s), %d checkpoint(s) in %.2fs",
            type(self).__name__,
            n,
            len(self.layer_names),
            self.layer_dims,
            self.task.num_checkpoints,
            time.perf_counter() - start,
        )

    def _cache_checkpoint(self, k: int, full_train_loader: Iterable[Batch]) -> int:
        """Store checkpoint ``k``'s projected training gradients and factorise its per-layer
        Fisher ``F_l + λ_l I``; returns the number of samples."""
        store = _GradStore(
            self.args.offload,
            self.device,
            self.args.cache_dir,
            self.args.chunk_size,
            f"{type(self).__name__}_ckpt{k}",
            self.planner.share(0.5 / self.task.num_checkpoints),
        )
        fisher = [
            torch.zeros(d, d, dtype=self.dtype, device=self.device) for d in self.layer_dims or []
        ]
        n = 0
        for batch in tqdm(
            self._batches(full_train_loader, "cache (full training) loader"),
            desc=f"{type(self).__name__} cache (ckpt {k})",
            disable=None,
            leave=False,
        ):
            if batch_size_of(batch) == 0:
                continue
            P = self.projected(batch, "loss", k)
            n += P.shape[0]
            store.append(P)
            if self.args.hessian == "eFIM":
                for F, (a, b) in zip(fisher, self._slices(), strict=True):
                    F.addmm_(P[:, a:b].T, P[:, a:b])
        store.close()
        if n == 0:
            raise DataError(
                "the cache (full training) loader holds no sample; pass a DataLoader over the training set"
            )
        self._stores[k] = store
        self._factors[k] = (
            [self._factorise(F / n) for F in fisher] if self.args.hessian == "eFIM" else []
        )
        return n

    def _factorise(self, F: Tensor) -> Tensor:
        """Cholesky factor of ``F + λ I`` (``λ = damping · tr(F) / k``), in the attributor's dtype
        (factorised in float64 when the attributor's dtype fails)."""
        lam = self.args.relative_damping * float(torch.trace(F)) / F.shape[0]
        if lam <= 0:
            lam = self.args.relative_damping or 1e-12
            logger.warning(
                "the projected Fisher of a layer is zero; damping with an absolute %.3g", lam
            )
        F = F.clone()
        F.diagonal().add_(lam)
        L, info = torch.linalg.cholesky_ex(F)
        if int(info) != 0 and F.dtype != torch.float64:  # rounding: retry in float64
            L, info = torch.linalg.cholesky_ex(F.double())
        if int(info) != 0:
            raise DataError(
                f"the damped projected Fisher (damping {self.args.relative_damping:g} x its mean eigenvalue) is not "
                "positive definite; raise damping"
            )
        return L.to(self.dtype)

    def _precondition(self, index: int, V: Tensor) -> Tensor:
        """``(F_l + λ_l I)^{-1}`` applied per layer to the rows of ``V`` ``(k, D)``."""
        if self.args.hessian == "Identity":
            return V
        out = torch.empty_like(V)
        for L, (a, b) in zip(self._factors[index], self._slices(), strict=True):
            out[:, a:b] = torch.cholesky_solve(V[:, a:b].T, L).T
        return out

    def _train_projected(self, train_loader: Iterable[Batch], index: int) -> Iterator[Tensor]:
        if (
            index in self._stores
            and self._stores[index].complete
            and same_samples(train_loader, self._cache_loader)
        ):
            yield from self._stores[index]
            return
        for batch in self._batches(train_loader, "train loader"):
            yield self.projected(batch, "loss", index)

    def _ensure_cache(self, train_loader: Iterable[Batch]) -> None:
        if not self._cached:  # dattri caches the train loader with a warning; so do we
            logger.warning(
                "%s.attribute was called before cache(); caching the train loader as the full "
                "training set",
                type(self).__name__,
            )
            self.cache(train_loader)

    # ----------------------------------------------------------------- API
    def attribute(self, train_loader: Iterable[Batch], test_loader: Iterable[Batch]) -> Tensor:
        """Scores ``(n_train, n_test)``, averaged over checkpoints (high = helps the test sample).

        The test side is projected and preconditioned once per checkpoint; the projected
        training gradients come from :meth:`cache` when ``train_loader`` yields the cached samples
        in the same order (:func:`same_samples`), and are computed batch by batch otherwise.
        """
        self._ensure_cache(train_loader)

        def scores_of(k: int) -> Tensor:
            test = [
                self.projected(b, "target", k) for b in self._batches(test_loader, "test loader")
            ]
            if not test:
                raise DataError(
                    "the test loader holds no sample; pass a DataLoader over the test set"
                )
            Q = self._precondition(k, torch.cat(test))
            return torch.cat([P @ Q.T for P in self._train_projected(train_loader, k)])

        return average_over_checkpoints(self.task.num_checkpoints, scores_of)

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """``Σ_l p^t_ilᵀ (F_l + λ_l I)^{-1} p_il`` per training sample ``(n_train,)``: the
        diagonal of ``attribute(train_loader, train_loader)``."""
        self._ensure_cache(train_loader)
        same = self.task.target_func is self.task.loss_func

        def diagonal(k: int) -> Tensor:
            parts = []
            for batch in self._batches(train_loader, "train loader"):
                P = self.projected(batch, "loss", k)
                T = P if same else self.projected(batch, "target", k)
                parts.append((P * self._precondition(k, T)).sum(dim=1))
            return torch.cat(parts)

        return average_over_checkpoints(self.task.num_checkpoints, diagonal)

    def compute_self_attribution(self) -> Tensor:
        """dattri's name: self-influence ``(n_cache,)`` of the cached training loader."""
        self._require_cache()
        return self.self_attribute(self._cache_loader)

    def hyperparameters(self) -> dict[str, Any]:
        out = super().hyperparameters()
        out.update(
            self.args.result_dict(),
            layer_names=self.layer_names,
            layer_dims=self.layer_dims,
            num_checkpoints=self.task.num_checkpoints,
        )
        return out


def _takes_model(func: Callable[..., Any]) -> bool:
    """Whether ``func`` has dattri's LoGra form ``(model, batch, device)`` (three positional
    parameters) rather than ``(params, data)``."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return False
    positional = [
        p
        for p in sig.parameters.values()
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty
    ]
    return len(positional) == 3


def average_over_checkpoints(
    num_checkpoints: int, scores_of: Callable[[int], Tensor], what: str = "train loader"
) -> Tensor:
    """``(1/K) Σ_k scores_of(k)`` for the ``K`` checkpoints of a task (scores of any shape).

    Raises:
        DataError: two checkpoints' scores differ in shape (``what`` yielded another number of
            samples on another pass: a generator, or a loader that is not re-iterable).
    """
    total: Tensor | None = None
    for k in range(num_checkpoints):
        total = accumulate_scores(total, scores_of(k), what)
    if total is None:
        raise DataError("the task has no checkpoint; pass at least one")
    return total / num_checkpoints


class LoGraAttributor(BlockProjectedAttributor):
    """LoGra (dattri's ``LoGraAttributor``): factorised Gaussian projection of each layer's
    gradient to ``sqrt(proj_dim) x sqrt(proj_dim)``, then the damped projected Fisher.

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_names: module names (``model.named_modules()``) of ``nn.Linear`` / ``nn.Conv2d``
            layers; ``None`` uses all of them.
        hessian: ``"eFIM"`` (default) or ``"Identity"``.
        damping: relative damping (``λ_l = damping · tr(F_l)/k_l``); ``None`` = 1e-5.
        device: where everything runs.
        proj_dim: ``k_out · k_in`` per layer; a perfect square (default 4096 = 64 x 64).
        offload: ``"none"``, ``"cpu"`` (default) or ``"disk"`` for the kept projected gradients.
        cache_dir: directory for ``offload="disk"``.
        chunk_size: loader batches per disk shard.
        seed: projection seed (keyword only; tdabench extension).
        memory_budget: planner budget (keyword only).

    Raises:
        ConfigError: ``proj_dim`` not a perfect square, or another invalid argument.
    """

    def __init__(
        self,
        task: AttributionTask,
        layer_names: str | Sequence[str] | None = None,
        hessian: str = "eFIM",
        damping: float | None = None,
        device: str | torch.device = "cpu",
        proj_dim: int = 4096,
        offload: str = "cpu",
        cache_dir: str | None = None,
        chunk_size: int = 16,
        *,
        seed: int = 0,
        memory_budget: int | str | None = None,
    ) -> None:
        args = LoGraArguments(
            layer_names,
            hessian,
            damping,
            proj_dim,
            offload,
            cache_dir,
            chunk_size,
            seed,
            memory_budget,
        )
        self.factor_dim = _perfect_square(args.proj_dim, "proj_dim")
        super().__init__(task, layer_names, device, args, memory_budget)

    def _make_compressor(self, index: int, name: str, module: nn.Module) -> LayerCompressor:
        d_out, d_in = factor_dims(module)
        k, seed = self.factor_dim, self.args.seed + 1000 * index
        return LayerCompressor(
            _gaussian(d_out, k, seed, self.device, self.dtype),
            _gaussian(d_in, k, seed + 1, self.device, self.dtype),
            d_out,
            d_in,
        )
