"""dattri 0.3.0's projector classes and functions, built on :class:`tdabench.func.projection.Projector`.

Re-exported from :mod:`tdabench.func.projection`. Names, arguments and output shapes follow
dattri; the matrices are tdabench's (seeded per ``(seed, ensemble_id)``), so projections agree
with dattri's in distribution, not bit for bit.

Projection types (:class:`ProjectionType`):

- ``normal`` / ``rademacher``: dense ``x P`` with ``E[P Pᵀ] = I`` (entries ``N(0, 1/k)`` / ``±1/sqrt(k)``);
- ``sjlt``: a sparse JL transform with one ``±1`` per input coordinate (tdabench's CountSketch,
  ``proj_type="sparse"``); it runs on the CPU too (dattri needs CUDA and the ``sjlt`` package);
- ``random_mask``: keep ``k`` coordinates drawn without replacement (sorted), unscaled, as dattri;
- ``grass``: a random mask to ``multiplier * k`` coordinates, then ``sjlt`` to ``k`` (CPU too);
- ``identity``: the features unchanged.

``CudaProjector`` and ``ChunkedCudaProjector`` run on any device: on a CPU they compute the
same projection as ``BasicProjector`` (dattri refuses a non-CUDA device).
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from tdabench.errors import ConfigError, ShapeError
from tdabench.func.projection import _DATTRI_PROJECTOR_NAMES, Projector, make_projector
from tdabench.func.solvers import arnoldi_basis
from tdabench.memory import planner_for

# the names are listed once, in tdabench.func.projection (which resolves them lazily from here)
__all__ = list(_DATTRI_PROJECTOR_NAMES)

logger = logging.getLogger(__name__)

Features = Tensor | Mapping[str, Tensor]


class ProjectionType(str, Enum):
    """dattri's projection type names."""

    identity = "identity"
    normal = "normal"
    rademacher = "rademacher"
    sjlt = "sjlt"
    random_mask = "random_mask"
    grass = "grass"


def _parse_type(proj_type: Any) -> tuple[ProjectionType, int | None]:
    """``ProjectionType`` and the GraSS multiplier given in ``"grass_N"`` (``None`` otherwise)."""
    name = proj_type.value if isinstance(proj_type, ProjectionType) else str(proj_type)
    multiplier = None
    if name.startswith("grass_"):
        tail = name[len("grass_") :]
        if not tail.isdigit() or int(tail) < 1:
            raise ConfigError(f"proj_type {name!r}: expected 'grass_N' with an integer N >= 1")
        name, multiplier = "grass", int(tail)
    try:
        return ProjectionType(name), multiplier
    except ValueError:
        raise ConfigError(
            f"unknown proj_type {name!r}; available: {[t.value for t in ProjectionType]} (or 'grass_N')"
        ) from None


def _feature_blocks(features: Features) -> list[Tensor]:
    """Column blocks ``(B, d_p)`` of a ``(B, d)`` tensor or of a dict of per-sample features."""
    if isinstance(features, Mapping):
        blocks = [
            t.reshape(t.shape[0], -1) if t.dim() > 1 else t.reshape(-1, 1)
            for t in features.values()
        ]
        if not blocks or len({b.shape[0] for b in blocks}) != 1:
            raise ShapeError(
                "a feature dict needs tensors with one common leading (batch) dimension"
            )
        return blocks
    if not isinstance(features, Tensor) or features.dim() != 2:
        got = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ShapeError(
            f"features must be a (batch, feature_dim) tensor or a dict of them, got {got}"
        )
    return [features]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision projections are computed in float32 and rounded once at the end."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _sorted_mask(d: int, k: int, seed: int, device: torch.device) -> Tensor:
    if k > d:
        raise ConfigError(
            f"a random mask keeps at most feature_dim={d} coordinates, got proj_dim={k}"
        )
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(d, generator=gen)[:k].sort().values.to(device)


class AbstractProjector(ABC):
    """dattri's projector interface: ``project(features, ensemble_id) -> (B, proj_dim)``."""

    def __init__(
        self, feature_dim: int, proj_dim: int, seed: int, proj_type: Any, device: Any
    ) -> None:
        self.feature_dim = int(feature_dim)
        self.proj_dim = int(proj_dim)
        self.seed = int(seed)
        self.proj_type = proj_type
        self.device = torch.device(device)

    @abstractmethod
    def project(self, features: Features, ensemble_id: int) -> Tensor:
        """Project a batch of features ``(B, feature_dim)`` (or a dict of them) to ``(B, proj_dim)``."""

    @abstractmethod
    def free_memory(self) -> None:
        """Release the memory held by the projection."""


class BasicProjector(AbstractProjector):
    """A seeded random projection on any device (dattri's CPU projector).

    Args:
        feature_dim: ``d``, the number of feature columns.
        proj_dim: ``k`` (ignored for ``identity``).
        seed: seed of ensemble 0; ensemble ``e`` uses ``seed + 100000 * e`` (as dattri).
        proj_type: a :class:`ProjectionType` or its name (``"grass_N"`` sets the multiplier).
        device: where the projection runs.
        block_size: accepted for compatibility; the matrix is generated in tdabench's own blocks
            under the device's memory budget.
        dtype: dtype of the result (float16/bfloat16 are computed in float32).
        ensemble_id: the ensemble drawn first.
        grass_multiplier: GraSS's intermediate dimension is ``grass_multiplier * proj_dim``
            (capped at ``d``).
    """

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        seed: int,
        proj_type: Any,
        device: Any,
        block_size: int = 100,
        dtype: torch.dtype = torch.float32,
        ensemble_id: int = 0,
        grass_multiplier: int = 4,
    ) -> None:
        kind, parsed = _parse_type(proj_type)
        super().__init__(feature_dim, proj_dim, seed, kind, device)
        if self.feature_dim < 1 or (kind != ProjectionType.identity and self.proj_dim < 1):
            raise ConfigError(
                f"feature_dim and proj_dim must be >= 1, got {feature_dim} and {proj_dim}"
            )
        self.block_size = int(block_size)
        self.dtype = dtype
        self.grass_multiplier = parsed if parsed is not None else int(grass_multiplier)
        self.ensemble_id = int(ensemble_id)
        self._ready_for: int | None = None
        self._projector: Projector | None = None
        self.active_indices: Tensor | None = None
        self._draw(self.ensemble_id)

    def _seed(self, ensemble_id: int) -> int:
        return self.seed + 100_000 * int(ensemble_id)

    def _sparse(self, d: int, seed: int) -> Projector:
        budget = planner_for(self.device).share(0.25)
        return make_projector(
            d, self.proj_dim, seed, "sparse", self.device, _compute_dtype(self.dtype), budget
        )

    def _draw(self, ensemble_id: int) -> None:
        """Build the randomness of ``ensemble_id`` (the matrix is drawn lazily by :class:`Projector`)."""
        seed, kind, d, k = self._seed(ensemble_id), self.proj_type, self.feature_dim, self.proj_dim
        self._projector, self.active_indices = None, None
        if kind in (ProjectionType.normal, ProjectionType.rademacher):
            name = "gaussian" if kind == ProjectionType.normal else "rademacher"
            budget = planner_for(self.device).share(0.25)
            self._projector = make_projector(
                d, k, seed, name, self.device, _compute_dtype(self.dtype), budget
            )
        elif kind == ProjectionType.sjlt:
            self._projector = self._sparse(d, seed)
        elif kind == ProjectionType.random_mask:
            self.active_indices = _sorted_mask(d, k, seed, self.device)
        elif kind == ProjectionType.grass:
            inter = min(d, self.grass_multiplier * k)
            self.active_indices = _sorted_mask(d, inter, seed, self.device)
            self._projector = self._sparse(inter, seed + 1)
        self._ready_for = int(ensemble_id)

    def _columns(self, features: Features) -> list[Tensor]:
        blocks = _feature_blocks(features)
        width = sum(b.shape[1] for b in blocks)
        if width != self.feature_dim:
            raise ShapeError(
                f"features have {width} columns but the projector was built for feature_dim={self.feature_dim}"
            )
        cdt = _compute_dtype(self.dtype)
        return [b.to(device=self.device, dtype=cdt) for b in blocks]

    def project(self, features: Features, ensemble_id: int = 0) -> Tensor:
        """Project ``features`` ``(B, d)`` (or a dict of ``(B, ...)`` tensors) to ``(B, k)`` in ``dtype``."""
        if self._ready_for != int(ensemble_id):
            self._draw(ensemble_id)
        blocks = self._columns(features)
        kind = self.proj_type
        if kind == ProjectionType.identity:
            out = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        elif kind in (ProjectionType.random_mask, ProjectionType.grass):
            x = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
            out = x[:, self.active_indices]
            if kind == ProjectionType.grass:
                out = self._projector.project(out)
        else:
            out = self._projector.project(blocks)
        return out.to(self.dtype)

    __call__ = project

    def free_memory(self) -> None:
        """Drop the drawn randomness; the next :meth:`project` draws it again (same seed, same result)."""
        self._projector, self.active_indices, self._ready_for = None, None, None


class CudaProjector(BasicProjector):
    """dattri's CUDA projector; here the same projection as :class:`BasicProjector` on any device.

    Args:
        feature_dim, proj_dim, seed, proj_type, device, dtype: as :class:`BasicProjector`.
        grass_multiplier: GraSS's intermediate dimension factor.
    """

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        seed: int,
        proj_type: Any,
        device: Any,
        dtype: torch.dtype = torch.float32,
        grass_multiplier: int = 4,
    ) -> None:
        super().__init__(
            feature_dim,
            proj_dim,
            seed,
            proj_type,
            device,
            dtype=dtype,
            grass_multiplier=grass_multiplier,
        )


class ChunkedCudaProjector:
    """Sum of per-chunk projections of consecutive feature columns (for very wide features).

    ``project(x) = sum_i projector_per_chunk[i].project(x[:, chunk_i])`` where chunk ``i`` holds
    ``dim_per_chunk[i]`` consecutive columns.

    Args:
        projector_per_chunk: one projector per chunk, all with the same ``proj_dim``.
        max_chunk_size: the largest chunk (bookkeeping, as dattri).
        dim_per_chunk: columns per chunk; they add up to the feature dimension.
        feature_batch_size: the expected batch size (bookkeeping; any batch size works).
        device: where the result lives.
        dtype: dtype of the result.
    """

    def __init__(
        self,
        projector_per_chunk: Sequence[AbstractProjector],
        max_chunk_size: int,
        dim_per_chunk: Sequence[int],
        feature_batch_size: int,
        device: Any,
        dtype: torch.dtype,
    ) -> None:
        if len(projector_per_chunk) != len(dim_per_chunk) or not projector_per_chunk:
            raise ConfigError("ChunkedCudaProjector needs one projector per entry of dim_per_chunk")
        dims = {p.proj_dim for p in projector_per_chunk}
        if len(dims) != 1:
            raise ConfigError(f"every chunk projector needs the same proj_dim, got {sorted(dims)}")
        self.projector_per_chunk = list(projector_per_chunk)
        self.proj_dim = dims.pop()
        self.proj_type = self.projector_per_chunk[0].proj_type
        self.max_chunk_size = int(max_chunk_size)
        self.dim_per_chunk = [int(d) for d in dim_per_chunk]
        self.feature_batch_size = int(feature_batch_size)
        self.device = torch.device(device)
        self.dtype = dtype

    def project(self, features: Tensor, ensemble_id: int = 0) -> Tensor:
        """Project a ``(B, sum(dim_per_chunk))`` tensor to ``(B, proj_dim)``."""
        if isinstance(features, Mapping):
            raise TypeError(
                "ChunkedCudaProjector.project() only accepts Tensor inputs; use dict_project() for a dict "
                "of per-parameter features (or random_project(), which routes them)"
            )
        if features.dim() != 2 or features.shape[1] != sum(self.dim_per_chunk):
            raise ShapeError(
                f"features must be (B, {sum(self.dim_per_chunk)}), got {tuple(features.shape)}"
            )
        out = torch.zeros(
            features.shape[0], self.proj_dim, dtype=_compute_dtype(self.dtype), device=self.device
        )
        start = 0
        for proj, width in zip(self.projector_per_chunk, self.dim_per_chunk, strict=True):
            piece = proj.project(features[:, start : start + width], ensemble_id=ensemble_id)
            out += piece.to(device=self.device, dtype=out.dtype)
            start += width
        return out.to(self.dtype)

    def dict_project(self, features: Features, ensemble_id: int = 0) -> Tensor:
        """Project a dict of per-parameter features ``{name: (B, ...)}`` (concatenated in order)."""
        blocks = _feature_blocks(features)
        return self.project(torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0], ensemble_id)

    def allocate_input(self) -> None:
        """A no-op (kept for compatibility: nothing is preallocated)."""

    def free_memory(self) -> None:
        """Release every chunk projector's randomness."""
        for p in self.projector_per_chunk:
            p.free_memory()


def make_random_projector(
    param_shape_list: Sequence[int],
    feature_batch_size: int,
    proj_dim: int,
    proj_max_batch_size: int,
    device: Any,
    proj_seed: int = 0,
    proj_type: Any = ProjectionType.sjlt,
    *,
    dtype: torch.dtype = torch.float32,
    grass_multiplier: int = 4,
) -> BasicProjector | ChunkedCudaProjector:
    """The projector for features whose blocks have ``param_shape_list`` columns each.

    On a CPU a :class:`BasicProjector`; on CUDA a :class:`CudaProjector`, or a
    :class:`ChunkedCudaProjector` when :func:`tdabench.func.utils.get_parameter_chunk_sizes`
    splits the columns into several chunks for ``proj_max_batch_size`` rows (each chunk's
    projector gets its own seed, drawn from ``proj_seed``).

    Returns:
        A projector with ``project(features (B, d), ensemble_id) -> (B, proj_dim)``.
    """
    from tdabench.func.utils import get_parameter_chunk_sizes

    dev = torch.device(device)
    feature_dim = int(sum(int(s) for s in param_shape_list))
    if dev.type == "cpu":
        return BasicProjector(
            feature_dim,
            proj_dim,
            proj_seed,
            proj_type,
            dev,
            dtype=dtype,
            grass_multiplier=grass_multiplier,
        )
    max_chunk, chunks = get_parameter_chunk_sizes(param_shape_list, proj_max_batch_size)
    if len(chunks) == 1:
        return CudaProjector(
            feature_dim, proj_dim, proj_seed, proj_type, dev, dtype, grass_multiplier
        )
    gen = torch.Generator().manual_seed(int(proj_seed))
    seeds = torch.randint(0, 2**31, (len(chunks),), generator=gen).tolist()
    per_chunk = [
        CudaProjector(c, proj_dim, s, proj_type, dev, dtype, grass_multiplier)
        for c, s in zip(chunks, seeds, strict=True)
    ]
    return ChunkedCudaProjector(per_chunk, max_chunk, chunks, feature_batch_size, dev, dtype)


def random_project(
    feature: Features,
    feature_batch_size: int,
    proj_dim: int,
    proj_max_batch_size: int,
    proj_seed: int = 0,
    proj_type: Any = "normal",
    *,
    device: Any = "cpu",
) -> Callable[..., Tensor]:
    """A function that randomly projects features like ``feature`` to ``proj_dim`` dimensions.

    Args:
        feature: an example batch: a ``(feature_batch_size, d)`` tensor or a dict of per-parameter
            features ``{name: (feature_batch_size, ...)}``; it fixes ``d`` and the dtype.
        feature_batch_size: its batch size.
        proj_dim: ``k``.
        proj_max_batch_size: rows per chunk on CUDA (see :func:`make_random_projector`).
        proj_seed: seed of the projection.
        proj_type: ``"normal"``, ``"rademacher"``, ``"sjlt"``, ``"random_mask"``, ``"grass"``,
            ``"grass_N"`` or ``"identity"``, on any device.
        device: where the projection runs.

    Returns:
        ``f(feature, ensemble_id=0) -> (B, proj_dim)`` in the example's dtype.
    """
    if isinstance(feature, Mapping):
        shapes = [int(t.numel()) // int(feature_batch_size) for t in feature.values()]
        dtype = next(iter(feature.values())).dtype
    else:
        shapes, dtype = [int(feature.numel()) // int(feature_batch_size)], feature.dtype
    kind, parsed = _parse_type(proj_type)
    projector = make_random_projector(
        shapes,
        feature_batch_size,
        proj_dim,
        proj_max_batch_size,
        torch.device(device),
        proj_seed,
        f"grass_{parsed}" if parsed is not None else kind,
        dtype=dtype,
    )

    def project(feature: Features, ensemble_id: int = 0) -> Tensor:
        if isinstance(projector, ChunkedCudaProjector) and isinstance(feature, Mapping):
            return projector.dict_project(feature, ensemble_id)
        return projector.project(feature, ensemble_id)

    return project


class ArnoldiProjector(AbstractProjector):
    """Projection onto the top eigenvectors of a Hessian, scaled by ``1/sqrt(eigenvalue)``.

    ``project(g) = g U diag(λ)^(-1/2)`` with the top-``proj_dim`` eigenpairs ``(λ, U)`` of
    ``H + regularization I`` (``H`` the Hessian of ``func`` at ``x``, found by Arnoldi
    iteration), so ``project(g1) @ project(g2).T ≈ g1 H⁻¹ g2ᵀ``. The eigenpairs are the
    ``proj_dim`` dominant ones (largest ``|λ|``); those with ``λ <= 0`` (an indefinite
    ``H + regularization I``), or not found (fewer than ``proj_dim`` above ``tol``), give zero
    columns at the end, with a logged warning: the output keeps dattri's shape ``(B, proj_dim)``
    and its inner products are those of the positive part (dattri's columns there are NaN).

    Args:
        feature_dim: ``d``, the number of entries of ``x[argnums]``.
        proj_dim: eigenpairs kept.
        func: scalar function of ``x``.
        x: the point: one argument of ``func`` or a tuple of its arguments.
        argnums: index of the variable among the arguments.
        max_iter: Krylov dimension of the Arnoldi iteration.
        norm_constant: scaling of ``H`` during the iteration (undone on the eigenvalues).
        tol: early-stop threshold of the iteration.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Hessian-vector products.
        regularization: ``λ`` added to ``H``.
        seed: seed of the start vector.
        device: device of the eigenvectors.
    """

    # Spelled out: dattri's ArnoldiProjector signature (arnoldi_project repeats it, and its
    # func/x/argnums/mode/regularization run has the shape of func.hessian's hvp_at_x).
    def __init__(
        self,
        feature_dim: int,
        proj_dim: int,
        func: Callable[..., Tensor],
        x: Any,
        argnums: int = 0,
        max_iter: int = 100,
        norm_constant: float = 1.0,
        tol: float = 1e-7,
        mode: str = "rev-fwd",
        regularization: float = 0.0,
        seed: int = 0,
        device: Any = "cpu",
    ) -> None:
        super().__init__(feature_dim, proj_dim, seed, "arnoldi", device)
        from tdabench.func.hessian import hvp_at_x

        args = tuple(x) if isinstance(x, (tuple, list)) else (x,)
        self._hvp = hvp_at_x(func, args, argnums=argnums, mode=mode, regularization=regularization)
        self._dtype = args[argnums].dtype if isinstance(args[argnums], Tensor) else torch.float32
        self.regularization = float(regularization)
        self.max_iter, self.norm_constant, self.tol = (
            int(max_iter),
            float(norm_constant),
            float(tol),
        )
        self.eigvals: Tensor | None = None
        self.eigvecs: Tensor | None = None

    def get_eigenspace(self) -> None:
        """Run the Arnoldi iteration; sets ``eigvals`` ``(r,)`` and ``eigvecs`` ``(r, d)`` of
        the ``r <= proj_dim`` dominant eigenpairs with a positive eigenvalue."""
        basis = arnoldi_basis(
            self._hvp,
            self.feature_dim,
            self.proj_dim,
            self.max_iter,
            self.tol,
            self.norm_constant,
            self.seed,
            self._dtype,
            self.device,
        )
        keep = basis.values > 0
        positive, found = int(keep.sum()), int(basis.values.numel())
        if positive < self.proj_dim:
            logger.warning(
                "ArnoldiProjector: %d of the %d requested directions are zero columns: %d of the "
                "dominant eigenvalues are not positive (the Hessian plus regularization %g is "
                "indefinite) and %d were not found (below tol %g or beyond the Krylov dimension). "
                "Raise regularization for more positive directions",
                self.proj_dim - positive,
                self.proj_dim,
                found - positive,
                self.regularization,
                self.proj_dim - found,
                self.tol,
            )
        self.eigvals = basis.values[keep]
        self.eigvecs = basis.vectors[:, keep].T.contiguous()

    def project(self, features: Features, ensemble_id: int = 0) -> Tensor:
        """``features (B, d) -> (B, proj_dim)``; the eigenspace is computed on the first call.

        Column ``i < r`` is ``features @ u_i / sqrt(λ_i)`` for the ``r`` positive dominant
        eigenpairs; columns ``r .. proj_dim - 1`` are zero (see the class docstring).
        """
        if self.eigvals is None or self.eigvecs is None:
            self.get_eigenspace()
        assert self.eigvals is not None and self.eigvecs is not None
        blocks = _feature_blocks(features)
        x = torch.cat(blocks, dim=1) if len(blocks) > 1 else blocks[0]
        x = x.to(device=self.device, dtype=self.eigvecs.dtype)
        out = x.new_zeros(x.shape[0], self.proj_dim)
        r = self.eigvals.numel()
        out[:, :r] = (x @ self.eigvecs.T) / torch.sqrt(self.eigvals).unsqueeze(0)
        return out

    def free_memory(self) -> None:
        """A no-op (the eigenspace is small)."""


# Spelled out: dattri's arnoldi_project signature, forwarded positionally to ArnoldiProjector.
def arnoldi_project(
    feature_dim: int,
    func: Callable[..., Tensor],
    x: Any,
    argnums: int = 0,
    proj_dim: int = 100,
    max_iter: int = 100,
    norm_constant: float = 1.0,
    tol: float = 1e-7,
    mode: str = "rev-fwd",
    regularization: float = 0.0,
    seed: int = 0,
    device: Any = "cpu",
) -> Callable[[Features], Tensor]:
    """``f(features (B, d)) -> (B, proj_dim)``: an :class:`ArnoldiProjector`'s projection."""
    projector = ArnoldiProjector(
        feature_dim,
        proj_dim,
        func,
        x,
        argnums,
        max_iter,
        norm_constant,
        tol,
        mode,
        regularization,
        seed,
        device,
    )

    def project(feature: Features) -> Tensor:
        return projector.project(feature)

    return project
