"""FactGraSS: LoGra's influence functions with a sparse two-stage gradient compression.

Stage 1 (factorised, sparse): each factor of a layer's gradient ``G_i = Σ_t g_t a_tᵀ`` is
*masked*: ``k' = sqrt(proj_dim · blowup_factor)`` of its coordinates, drawn uniformly without
replacement, are kept and scaled by ``sqrt(d / k')`` (so masked inner products are unbiased:
``E[<M x, M y>] = <x, y>``). A factor with ``d <= k'`` coordinates is kept whole. The masked
factors give the ``(k'_out, k'_in)`` intermediate ``Σ_t (M_out g_t)(M_in a_t)ᵀ`` without forming
``G_i``.

Stage 2 (sparse Johnson-Lindenstrauss): the flattened intermediate is projected to
``proj_dim`` by a CountSketch (one ``±1`` per input coordinate,
:func:`tdabench.func.projection.make_projector` with ``proj_type="sparse"``), ``O(k'^2)`` per
sample; if the intermediate has at most ``proj_dim`` entries it is kept as is.

The curvature (``hessian``, relative ``damping``), the scores and the storage are LoGra's
(:class:`~tdabench.algorithm.logra.BlockProjectedAttributor`). dattri 0.3.0 uses its SJLT
kernel on CUDA and a dense Gaussian second stage on the CPU; here the sparse stage is the same
on every device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tdabench._validate import check_int
from tdabench.algorithm.arguments import register_arguments
from tdabench.algorithm.logra import (
    BlockProjectedArguments,
    BlockProjectedAttributor,
    LayerCompressor,
    _perfect_square,
    factor_dims,
)
from tdabench.func.capture import LayerIO
from tdabench.func.projection import Projector, make_projector
from tdabench.task import AttributionTask

__all__ = [
    "FactGraSSArguments",
    "FactGraSSAttributor",
    "SparseLayerCompressor",
    "mask_factor",
    "random_mask",
]


def random_mask(d: int, k: int, seed: int, device: torch.device | str = "cpu") -> Tensor | None:
    """Sorted indices of ``k`` of ``d`` coordinates drawn without replacement; ``None`` when ``d <= k``."""
    if d <= k:
        return None
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(d, generator=gen)[:k].sort().values.to(device)


def mask_factor(x: Tensor, index: Tensor | None, d: int) -> Tensor:
    """``x[..., index] · sqrt(d / len(index))`` (unbiased masked inner products); ``x`` if ``index`` is ``None``."""
    if index is None:
        return x
    return x.index_select(-1, index) * math.sqrt(d / index.numel())


@register_arguments("FactGraSSAttributor")
@dataclass
class FactGraSSArguments(BlockProjectedArguments):
    """Arguments of :class:`FactGraSSAttributor`: ``proj_dim · blowup_factor`` must be a perfect square."""

    blowup_factor: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        self.blowup_factor = check_int("blowup_factor", self.blowup_factor, 1)
        _perfect_square(
            self.proj_dim * self.blowup_factor, "intermediate_dim (proj_dim * blowup_factor)"
        )


class SparseLayerCompressor(LayerCompressor):
    """FactGraSS's per-layer compression: masks on the factors, then a CountSketch."""

    def __init__(
        self,
        d_out: int,
        d_in: int,
        k: int,
        proj_dim: int,
        seed: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> None:
        self.d_out, self.d_in = d_out, d_in
        self.idx_out = random_mask(d_out, k, seed, device)
        self.idx_in = random_mask(d_in, k, seed + 1, device)
        super().__init__(None, None, d_out, d_in)
        self.k_out = d_out if self.idx_out is None else k
        self.k_in = d_in if self.idx_in is None else k
        inter = self.k_out * self.k_in
        self.sketch: Projector | None = None
        if inter > proj_dim:
            self.sketch = make_projector(
                inter, proj_dim, seed=seed + 2, proj_type="sparse", device=device, dtype=dtype
            )
        self.out_dim = inter if self.sketch is None else proj_dim

    @property
    def dim(self) -> int:
        return self.out_dim

    def factors(self, io: LayerIO) -> tuple[Tensor, Tensor]:
        return mask_factor(io.g, self.idx_out, self.d_out), mask_factor(
            io.a, self.idx_in, self.d_in
        )

    def second_stage(self, x: Tensor) -> Tensor:
        return x if self.sketch is None else self.sketch.project(x)


class FactGraSSAttributor(BlockProjectedAttributor):
    """FactGraSS (dattri's ``FactGraSSAttributor``).

    Args:
        task: the :class:`~tdabench.task.AttributionTask`.
        layer_names: module names of ``nn.Linear`` / ``nn.Conv2d`` layers; ``None`` = all.
        hessian: ``"eFIM"`` (default) or ``"Identity"``.
        damping: relative damping (``λ_l = damping · tr(F_l)/k_l``); ``None`` = 1e-5.
        device: where everything runs.
        proj_dim: output dimension per layer after the sparse second stage (default 4096).
        blowup_factor: the intermediate has ``proj_dim · blowup_factor`` entries (a perfect
            square; each factor is masked to its square root). Default 4.
        offload, cache_dir, chunk_size: as :class:`~tdabench.algorithm.logra.LoGraAttributor`.
        seed: seed of the masks and sketches (keyword only).
        memory_budget: planner budget (keyword only).

    Raises:
        ConfigError: ``proj_dim · blowup_factor`` not a perfect square, or another invalid argument.
    """

    # Spelled out: dattri 0.3.0's constructor signature (positional order and defaults)
    def __init__(
        self,
        task: AttributionTask,
        layer_names: str | Sequence[str] | None = None,
        hessian: str = "eFIM",
        damping: float | None = None,
        device: str | torch.device = "cpu",
        proj_dim: int = 4096,
        blowup_factor: int = 4,
        offload: str = "cpu",
        cache_dir: str | None = None,
        chunk_size: int = 16,
        *,
        seed: int = 0,
        memory_budget: int | str | None = None,
    ) -> None:
        args = FactGraSSArguments(
            layer_names,
            hessian,
            damping,
            proj_dim,
            offload,
            cache_dir,
            chunk_size,
            seed,
            memory_budget,
            blowup_factor,
        )
        self.blowup_factor = args.blowup_factor
        self.factor_dim = _perfect_square(
            args.proj_dim * args.blowup_factor, "intermediate_dim (proj_dim * blowup_factor)"
        )
        super().__init__(task, layer_names, device, args, memory_budget)

    def _make_compressor(self, index: int, name: str, module: nn.Module) -> LayerCompressor:
        d_out, d_in = factor_dims(module)
        return SparseLayerCompressor(
            d_out,
            d_in,
            self.factor_dim,
            self.args.proj_dim,
            self.args.seed + 1000 * index,
            self.device,
            self.dtype,
        )
