"""Seeded random projections from ``d`` to ``k`` dimensions under a memory budget.

A :class:`Projector` maps features ``(B, d)`` to ``(B, k)`` by ``features @ P`` with a
random matrix ``P`` of shape ``(d, k)``:

- ``"gaussian"``: entries i.i.d. ``N(0, 1/k)``;
- ``"rademacher"``: entries i.i.d. ``±1/sqrt(k)`` with probability 1/2 each;
- ``"sparse"``: a CountSketch (sparse Johnson-Lindenstrauss transform with one non-zero per
  row): row ``j`` of ``P`` is ``s_j e_{h_j}`` with a uniform bucket ``h_j`` in ``[0, k)`` and a
  uniform sign ``s_j``. Projecting costs ``O(B d)`` additions instead of the ``O(B d k)``
  multiply-adds of a dense GEMM (about 10x faster at ``k = 512`` on a CPU core), and ``P`` takes
  8 bytes per row instead of ``4 k``;
- ``"identity"``: ``P = I`` (``k = d``, no randomness, no copy of a matrix).

All random kinds satisfy ``E[P P^T] = I``, so ``E ||x P||^2 = ||x||^2`` and
``E <x P, y P> = <x, y>`` (Johnson-Lindenstrauss). The inner-product variance is
``(||x||^2 ||y||^2 + <x, y>^2) / k`` for the Gaussian and, for the CountSketch, the same minus
``2 sum_j x_j^2 y_j^2 / k`` (smaller), so for gradients without a few dominant coordinates the
sparse kind is as accurate as the dense ones at the same ``k``; benchmarks/compare.py measures
the LDS of TRAK with both.

**Determinism.** ``P`` is defined block by block: rows ``[b * block_rows, (b + 1) * block_rows)``
are drawn from a ``torch.Generator`` seeded with a 64-bit mix of ``(seed, b)``. Gaussian
entries are drawn in float32 (``torch.randn``'s vectorised float32 sampler, several times
faster than its float64 one; the projection matrix dominates the cost of projecting a few
thousand samples) and scaled in float32; a float64 projector holds the exact float64 copy of
that float32 matrix. Rademacher signs are drawn in float64 and scaled in float64. Sparse buckets and signs are
drawn as integers, so every dtype and memory budget gives the same matrix exactly. The block size depends only on ``proj_dim`` (about 2^18
entries per block, see :func:`default_block_rows`), never on the memory budget, so the
projection is *identical whatever* ``max_chunk_bytes`` is. The generator lives on the
projector's device: on CPU a CPU generator, on CUDA a CUDA generator (fast, no host
transfer). Each is deterministic, but a CPU projector and a CUDA projector with the same
seed draw *different* (equally distributed) matrices; compare CPU with CPU and GPU with GPU.
float32 and float64 projectors on the same device type draw the same matrix (bit for bit for
Gaussian projectors, up to rounding for Rademacher ones).

**Memory.** A projector never holds a piece of ``P`` larger than ``max_chunk_bytes``
(counting the scratch block used while drawing, at most float64). Without an explicit
``max_chunk_bytes`` it is planned by the memory planner (:func:`tdabench.memory.planner_for`
of the device and ``memory_budget``): four streaming pieces, i.e. 256 MiB on one CPU thread
(64 MiB per piece) and a quarter of the budget on a GPU, and never less than one generator
block (the smallest unit of the matrix). When the whole ``P`` fits, it is
drawn once and kept (``cached_matrix_bytes``); otherwise it is regenerated, chunk by chunk,
at every :meth:`Projector.project` call. If not even one block fits, construction raises
:class:`~tdabench.errors.ConfigError`.

**Speed.** The projection is one GEMM per batch (``(B, d) @ (d, k)``), the dominant cost of
gradient-feature methods on small models. :meth:`Projector.project` therefore (1) accepts the
features as per-parameter column blocks (no ``(B, d)`` concatenation), and (2) skips the
columns that are zero in every row of the batch (exact: their products are zero; sparse inputs
such as image borders or padding make whole gradient columns zero), checking a block only while
such columns keep turning up (on CPU). :class:`ProjectorSet` lets an attributor reuse drawn matrices
between ``cache()`` and ``attribute()`` under a small memory bound.

Settings are per instance: nothing here reads or mutates module-level state.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from tdabench._validate import check_int
from tdabench.errors import ConfigError, MemoryLimitError, ShapeError
from tdabench.memory import MemoryPlanner, planner_for

__all__ = [
    "PRECISIONS",
    "PROJECTOR_KWARGS",
    "PROJ_TYPES",
    "Projector",
    "ProjectorSet",
    "default_block_rows",
    "make_projector",
    "planned_chunk_bytes",
    "projector_from_kwargs",
    "resolve_projector_kwargs",
]

#: A planned chunk of ``P`` is this many streaming pieces of the planner (share 1/16 each).
_CHUNK_PIECES = 4
_CHUNK_PIECE_FRACTION = 1 / 16

PROJ_TYPES = ("gaussian", "rademacher", "sparse", "identity")
PRECISIONS = ("highest", "tf32", "bf16")
"""GEMM precision of dense projections: ``"highest"`` (the projector's dtype; the default on
every device until reduced precision is measured to leave LDS unchanged), ``"tf32"`` (CUDA
TensorFloat-32 GEMMs; the flag is set only inside :meth:`Projector.project` and restored; no
effect on the CPU) or ``"bf16"`` (features and ``P`` rounded to bfloat16, products
accumulated and returned in the projector's dtype). The matrix ``P`` is the same for all."""
PROJECTOR_KWARGS = ("proj_dim", "proj_type", "seed", "max_chunk_bytes", "precision")
"""Keys accepted in an attributor's ``projector_kwargs``."""

_BLOCK_ENTRIES = 2**18
# Zero-column skipping in Projector.project: blocks narrower than _COMPACT_MIN_COLS are not
# checked; a block is compacted when at least _COMPACT_MIN_FRACTION of its columns are zero for
# the whole batch; after _COMPACT_MAX_MISSES checks in a row that found fewer, it is not checked.
_COMPACT_MIN_COLS = 256
# Projector.project multiplies at most this many entries of x (or of P) per GEMM (16 MiB float32)
_PIECE_ENTRIES = 2**22
_COMPACT_MIN_FRACTION = 0.125
_COMPACT_MAX_MISSES = 4
_MASK64 = (1 << 64) - 1


#: per device type, whether ``torch.mm(..., out_dtype=torch.float32)`` works on bf16 operands
_OUT_DTYPE_OK: dict[str, bool] = {}
# a sparse projector stores one int64 code per row of P: bucket h (sign +1) or k + h (sign -1)
_SPARSE_ROW_BYTES = 8


def default_block_rows(proj_dim: int) -> int:
    """Rows of ``P`` per generator block: ``max(1, 2**18 // proj_dim)`` (about 2 MiB in float64)."""
    return max(1, _BLOCK_ENTRIES // int(proj_dim))


def _mix64(x: int) -> int:
    """SplitMix64 finaliser: a bijective 64-bit mix (decorrelates nearby seeds)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _block_seed(seed: int, block: int) -> int:
    return _mix64(_mix64(seed & _MASK64) ^ block) & ((1 << 63) - 1)


def _check_int(value: Any, name: str, minimum: int) -> int:
    return check_int(name, value, minimum)


def planned_chunk_bytes(planner: MemoryPlanner) -> int:
    """Bytes of one planned chunk of ``P``: :data:`_CHUNK_PIECES` streaming pieces of the planner."""
    return _CHUNK_PIECES * planner.stream_bytes(_CHUNK_PIECE_FRACTION)


class Projector:
    """A seeded projection ``(B, d) -> (B, k)``; build it with :func:`make_projector`.

    Attributes:
        feature_dim: ``d``.
        proj_dim: ``k`` (``d`` for the identity).
        proj_type: ``"gaussian"``, ``"rademacher"``, ``"sparse"`` or ``"identity"``.
        seed: the seed of the matrix.
        block_rows: rows per generator block (part of the matrix's definition).
        chunk_rows: rows of ``P`` materialised at once (a multiple of ``block_rows``).
        peak_chunk_bytes: the largest piece of ``P`` (plus scratch) held so far, in bytes.
    """

    def __init__(
        self,
        feature_dim: int,
        proj_dim: int | None,
        seed: int = 0,
        proj_type: str = "gaussian",
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_chunk_bytes: int | None = None,
        block_rows: int | None = None,
        memory_budget: int | float | str | None = None,
        precision: str = "highest",
    ) -> None:
        self.feature_dim = _check_int(feature_dim, "feature_dim", 1)
        if precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.precision = precision
        if proj_type not in PROJ_TYPES:
            raise ConfigError(f"proj_type must be one of {PROJ_TYPES}, got {proj_type!r}")
        self.proj_type = proj_type
        self.seed = _check_int(seed, "seed", 0)
        self._planned = max_chunk_bytes is None
        self.max_chunk_bytes = (
            _check_int(max_chunk_bytes, "max_chunk_bytes", 1)
            if max_chunk_bytes is not None
            else planned_chunk_bytes(planner_for(device, memory_budget))
        )
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        self.dtype = dtype
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                f"device {str(device)!r} requested but CUDA is not available; pass device='cpu'"
            )
        self.peak_chunk_bytes = 0
        self._matrix: Tensor | None = None
        self._compact_misses: dict[int, int] = {}
        if proj_type == "identity":
            if proj_dim is not None and proj_dim != feature_dim:
                raise ConfigError(
                    f"an identity projector keeps the dimension: proj_dim must be None or {feature_dim}, "
                    f"got {proj_dim!r}; drop proj_dim or use proj_type='gaussian'"
                )
            self.proj_dim = self.feature_dim
            self.block_rows = self.chunk_rows = self.feature_dim
            return
        if proj_dim is None:
            raise ConfigError(f"a {proj_type} projector needs proj_dim (an integer >= 1), got None")
        self.proj_dim = _check_int(proj_dim, "proj_dim", 1)
        self.block_rows = (
            default_block_rows(self.proj_dim)
            if block_rows is None
            else _check_int(block_rows, "block_rows", 1)
        )
        self.chunk_rows = self._plan_chunk_rows()
        self._generator = torch.Generator(device=self.device)

    def _plan_chunk_rows(self) -> int:
        """Rows of ``P`` per chunk: whole generator blocks within ``max_chunk_bytes`` (counting
        the float64 scratch block of a draw); a planned budget never holds less than one block."""
        item = torch.empty((), dtype=self.dtype).element_size()
        if self.proj_type == "sparse":  # one int64 code per row, drawn in place
            row_bytes, scratch = _SPARSE_ROW_BYTES, 0
        else:
            row_bytes = self.proj_dim * item
            scratch = min(self.block_rows, self.feature_dim) * self.proj_dim * 8
        one_block = min(self.block_rows, self.feature_dim) * row_bytes + scratch
        if self._planned:  # a planned budget is a target: one block is the smallest unit
            self.max_chunk_bytes = max(self.max_chunk_bytes, one_block)
        if one_block > self.max_chunk_bytes:
            raise ConfigError(
                f"max_chunk_bytes={self.max_chunk_bytes} cannot hold one generator block of "
                f"{min(self.block_rows, self.feature_dim)} rows of a {self.proj_type} projection to {self.proj_dim} "
                f"dimensions ({one_block} bytes with its scratch); raise max_chunk_bytes to at least {one_block} "
                "or lower proj_dim"
            )
        n_blocks = math.ceil(self.feature_dim / self.block_rows)
        per_chunk = max(
            1, min(n_blocks, (self.max_chunk_bytes - scratch) // (self.block_rows * row_bytes))
        )
        return min(self.feature_dim, per_chunk * self.block_rows)

    # ------------------------------------------------------------------ matrix
    @property
    def num_blocks(self) -> int:
        """Generator blocks of ``block_rows`` rows that make up ``P`` ``(d, k)``."""
        return math.ceil(self.feature_dim / self.block_rows)

    @property
    def cached_matrix_bytes(self) -> int:
        """Bytes of ``P`` kept between calls (0 unless the whole matrix fits the budget)."""
        return 0 if self._matrix is None else self._matrix.numel() * self._matrix.element_size()

    def _draw_block(self, block: int, rows: int) -> Tensor:
        """Rows ``[block*block_rows, block*block_rows + rows)`` of ``P``, ``(rows, k)``: float32
        for Gaussian projectors, float64 for Rademacher ones (the caller casts to ``dtype``)."""
        self._generator.manual_seed(_block_seed(self.seed, block))
        shape = (rows, self.proj_dim)
        scale = 1.0 / math.sqrt(self.proj_dim)
        if self.proj_type == "gaussian":
            out = torch.randn(
                shape, generator=self._generator, dtype=torch.float32, device=self.device
            )
            return out.mul_(scale)
        out = torch.empty(shape, dtype=torch.float64, device=self.device).bernoulli_(
            0.5, generator=self._generator
        )
        return out.mul_(2.0 * scale).sub_(scale)

    def _make_sparse_chunk(self, start: int, stop: int) -> Tensor:
        """Codes of rows ``[start, stop)`` of a sparse ``P``: ``h_j`` for sign +1, ``k + h_j`` for -1."""
        codes = torch.empty(stop - start, dtype=torch.int64, device=self.device)
        for block in range(start // self.block_rows, math.ceil(stop / self.block_rows)):
            b0 = block * self.block_rows
            rows = min(self.block_rows, self.feature_dim - b0)
            self._generator.manual_seed(_block_seed(self.seed, block))
            codes[b0 - start : b0 - start + rows].random_(
                0, 2 * self.proj_dim, generator=self._generator
            )
        self.peak_chunk_bytes = max(self.peak_chunk_bytes, codes.numel() * _SPARSE_ROW_BYTES)
        return codes

    def _make_chunk(self, start: int, stop: int) -> Tensor:
        if self.proj_type == "sparse":
            return self._make_sparse_chunk(start, stop)
        chunk = torch.empty(stop - start, self.proj_dim, dtype=self.dtype, device=self.device)
        peak = chunk.numel() * chunk.element_size()
        for block in range(start // self.block_rows, math.ceil(stop / self.block_rows)):
            b0 = block * self.block_rows
            rows = min(self.block_rows, self.feature_dim - b0)
            if self.proj_type == "gaussian" and self.dtype == torch.float32:
                # the float32 draw of _draw_block, written in place (no scratch block, no copy)
                self._generator.manual_seed(_block_seed(self.seed, block))
                target = chunk[b0 - start : b0 - start + rows]
                target.normal_(generator=self._generator).mul_(1.0 / math.sqrt(self.proj_dim))
                self.peak_chunk_bytes = max(self.peak_chunk_bytes, peak)
                continue
            drawn = self._draw_block(block, rows)
            self.peak_chunk_bytes = max(
                self.peak_chunk_bytes, peak + drawn.numel() * drawn.element_size()
            )
            chunk[b0 - start : b0 - start + rows].copy_(drawn)
            del drawn
        return chunk

    def _chunks(self) -> Iterator[tuple[int, int, Tensor]]:
        """``(start, stop, P[start:stop])`` over the rows of ``P``, within the memory budget."""
        if self._matrix is not None:
            yield 0, self.feature_dim, self._matrix
            return
        if self.chunk_rows >= self.feature_dim:
            self._matrix = self._make_chunk(0, self.feature_dim)
            yield 0, self.feature_dim, self._matrix
            return
        for start in range(0, self.feature_dim, self.chunk_rows):
            stop = min(self.feature_dim, start + self.chunk_rows)
            yield start, stop, self._make_chunk(start, stop)

    def matrix(self) -> Tensor:
        """The whole ``(d, k)`` matrix ``P`` (for small problems and tests).

        Raises:
            MemoryLimitError: if ``P`` does not fit in ``max_chunk_bytes``.
        """
        if self.proj_type == "identity":
            return torch.eye(self.feature_dim, dtype=self.dtype, device=self.device)
        need = self.feature_dim * self.proj_dim * torch.empty((), dtype=self.dtype).element_size()
        dense_too_big = self.proj_type == "sparse" and need > self.max_chunk_bytes
        if self.chunk_rows < self.feature_dim or dense_too_big:
            raise MemoryLimitError(
                f"the {self.feature_dim} x {self.proj_dim} projection matrix needs {need} bytes, over "
                f"max_chunk_bytes={self.max_chunk_bytes}; use project() (which works chunk by chunk) "
                "or raise max_chunk_bytes"
            )
        chunk = next(self._chunks())[2]
        if self.proj_type == "sparse":
            return self._dense_from_codes(chunk)
        return chunk

    def _dense_from_codes(self, codes: Tensor) -> Tensor:
        k = self.proj_dim
        dense = torch.zeros(codes.numel(), 2 * k, dtype=self.dtype, device=self.device)
        dense.scatter_(1, codes[:, None], 1.0)
        return dense[:, :k] - dense[:, k:]

    # ------------------------------------------------------------------ projection
    def _blocks(self, features: Tensor | Sequence[Tensor]) -> list[Tensor]:
        """Validate ``features``: one ``(B, d)`` tensor or ``(B, d_p)`` column blocks summing to ``d``."""
        blocks = [features] if isinstance(features, Tensor) else list(features)
        ok = (
            len(blocks) > 0
            and all(isinstance(b, Tensor) and b.dim() == 2 for b in blocks)
            and len({int(b.shape[0]) for b in blocks}) == 1
            and sum(int(b.shape[1]) for b in blocks) == self.feature_dim
        )
        if not ok:
            shape = [
                tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__
                for b in (blocks if blocks else [features])
            ]
            raise ShapeError(
                f"the projector expects features of shape (B, {self.feature_dim}) (or column blocks "
                f"(B, d_p) summing to {self.feature_dim} columns), got {shape if len(shape) > 1 else shape[0]}; "
                "flatten per-sample gradients to one row per sample"
            )
        return blocks

    def _compact(self, x: Tensor, p: Tensor, key: int) -> tuple[Tensor, Tensor]:
        """Drop the columns of ``x`` that are zero in every row (and the matching rows of ``p``).

        Exact (the dropped terms are ``0 * P``) and cheap to detect (one pass over ``x``); it pays
        when inputs are sparse (zero pixels, padding, dead units make whole gradient columns zero
        across a batch). A block whose last checks found too few zero columns is not checked again.
        CPU only.
        """
        width = x.shape[1]
        if (
            x.device.type != "cpu"  # GPU GEMMs are cheap and nonzero() would synchronise
            or width < _COMPACT_MIN_COLS
            or x.shape[0] == 0
            or self._compact_misses.get(key, 0) >= _COMPACT_MAX_MISSES
        ):
            return x, p
        # candidates: columns summing to exactly 0 (one read of x, no temporary); a zero column
        # is always one, a non-zero column only by cancellation, so the candidates are verified
        # (NaN/inf columns never sum to 0 and are kept)
        col_sum = (torch.ones(1, x.shape[0], dtype=x.dtype, device=x.device) @ x)[0]
        cand = (col_sum == 0).nonzero().flatten()
        if cand.numel() >= width * _COMPACT_MIN_FRACTION:
            cand = cand[x.index_select(1, cand).abs().amax(dim=0) == 0]
        if cand.numel() < width * _COMPACT_MIN_FRACTION:
            self._compact_misses[key] = self._compact_misses.get(key, 0) + 1
            return x, p
        self._compact_misses[key] = 0
        mask = torch.ones(width, dtype=torch.bool, device=x.device)
        mask[cand] = False
        keep = mask.nonzero().flatten()
        return x.index_select(1, keep), p.index_select(0, keep)

    def project(self, features: Tensor | Sequence[Tensor]) -> Tensor:
        """Project ``features`` of shape ``(B, d)`` to ``(B, k)`` (in ``dtype`` on ``device``).

        ``features`` may also be a list of column blocks ``(B, d_p)`` whose concatenation is the
        ``(B, d)`` matrix (e.g. per-parameter gradients): each block is multiplied with its rows
        of ``P``, without concatenating. Columns that are zero for the whole batch are skipped.
        """
        blocks = self._blocks(features)
        blocks = [b.to(device=self.device, dtype=self.dtype) for b in blocks]
        if self.proj_type == "identity":
            return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=1)
        if self.proj_type == "sparse":
            return self._project_sparse(blocks)
        out: Tensor | None = None
        # columns per GEMM: bounds the copies that skipping zero columns makes of x and P (CPU
        # only; elsewhere nothing is compacted, so each block is one GEMM)
        piece = max(_COMPACT_MIN_COLS, _PIECE_ENTRIES // max(1, blocks[0].shape[0], self.proj_dim))
        if self.device.type != "cpu":
            piece = max(self.feature_dim, 1)
        for start, stop, chunk in self._chunks():
            offset = 0
            for block in blocks:
                lo, hi = max(offset, start), min(offset + block.shape[1], stop)
                for a in range(lo, hi, piece):
                    b = min(hi, a + piece)
                    x, p = self._compact(
                        block[:, a - offset : b - offset], chunk[a - start : b - start], a
                    )
                    if x.shape[1] == 0:
                        continue
                    if self.precision != "highest":
                        prod = self._gemm(x, p)
                        out = prod if out is None else out.add_(prod)
                    elif out is None:
                        out = x @ p
                    else:
                        out.addmm_(x, p)
                offset += block.shape[1]
        if out is None:  # every column was zero
            out = torch.zeros(
                blocks[0].shape[0], self.proj_dim, dtype=self.dtype, device=self.device
            )
        return out

    def _gemm(self, x: Tensor, p: Tensor) -> Tensor:
        """``x @ p`` in a reduced :attr:`precision` (``"bf16"``: bfloat16 operands, accumulated in
        float32 where ``torch.mm(..., out_dtype=)`` is supported, result in ``dtype``)."""
        if self.precision == "bf16":
            xb, pb = x.to(torch.bfloat16), p.to(torch.bfloat16)
            if _OUT_DTYPE_OK.get(x.device.type, True):
                try:
                    return torch.mm(xb, pb, out_dtype=torch.float32).to(self.dtype)
                except (TypeError, RuntimeError):
                    _OUT_DTYPE_OK[x.device.type] = False
            return (xb @ pb).to(self.dtype)
        if x.device.type == "cuda":  # tf32
            old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = True
            try:
                return x @ p
            finally:
                torch.backends.cuda.matmul.allow_tf32 = old
        return x @ p

    def _project_sparse(self, blocks: list[Tensor]) -> Tensor:
        """CountSketch: column ``j`` is added to output ``h_j`` of the positive or the negative
        half (codes ``h_j`` / ``k + h_j``), and the halves are subtracted: no sign multiply,
        no temporary of the features' size, ``O(B d)`` additions."""
        k = self.proj_dim
        acc = torch.zeros(blocks[0].shape[0], 2 * k, dtype=self.dtype, device=self.device)
        for start, stop, codes in self._chunks():
            offset = 0
            for block in blocks:
                lo, hi = max(offset, start), min(offset + block.shape[1], stop)
                if lo < hi:
                    acc.index_add_(
                        1, codes[lo - start : hi - start], block[:, lo - offset : hi - offset]
                    )
                offset += block.shape[1]
        return acc[:, :k] - acc[:, k:]

    __call__ = project

    def settings(self) -> dict[str, Any]:
        """JSON-able settings that define the matrix (for provenance)."""
        return {
            "feature_dim": self.feature_dim,
            "proj_dim": self.proj_dim,
            "proj_type": self.proj_type,
            "seed": self.seed,
            "block_rows": self.block_rows,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device_type": self.device.type,
            "precision": self.precision,
        }

    def __repr__(self) -> str:
        return (
            f"Projector(d={self.feature_dim}, k={self.proj_dim}, type={self.proj_type!r}, seed={self.seed}, "
            f"device={str(self.device)!r}, chunk_rows={self.chunk_rows})"
        )


# Spelled out: the typed public factory takes exactly Projector's arguments (same order).
def make_projector(
    feature_dim: int,
    proj_dim: int | None,
    seed: int = 0,
    proj_type: str = "gaussian",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    max_chunk_bytes: int | None = None,
    block_rows: int | None = None,
    memory_budget: int | float | str | None = None,
    precision: str = "highest",
) -> Projector:
    """Build a seeded projector from ``feature_dim`` to ``proj_dim`` dimensions.

    Args:
        feature_dim: input dimension ``d``.
        proj_dim: output dimension ``k``; ``None`` (or ``d``) for ``proj_type="identity"``.
        seed: non-negative integer seed of the matrix.
        proj_type: ``"gaussian"`` (``N(0, 1/k)``), ``"rademacher"`` (``±1/sqrt(k)``), ``"sparse"``
            (CountSketch: one ``±1`` per row, ``O(B d)`` to apply) or ``"identity"``.
        device: where the matrix is drawn and the projection runs.
        dtype: dtype of the matrix and of the projected features.
        max_chunk_bytes: largest piece of the ``(d, k)`` matrix held at once, in bytes;
            ``None`` plans it from ``memory_budget`` (see the module docstring).
        block_rows: rows per generator block; ``None`` uses :func:`default_block_rows`.
            Changing it changes the matrix (unlike ``max_chunk_bytes``).
        memory_budget: the memory budget of the device (``None``: derived from the device).
        precision: GEMM precision of dense projections, one of :data:`PRECISIONS`.

    Returns:
        A :class:`Projector`; ``projector.project(features (B, d)) -> (B, k)``.

    Raises:
        ConfigError: for a bad type, dimension or seed, or a budget below one block.
    """
    return Projector(
        feature_dim,
        proj_dim,
        seed,
        proj_type,
        device,
        dtype,
        max_chunk_bytes,
        block_rows,
        memory_budget,
        precision,
    )


def resolve_projector_kwargs(
    projector_kwargs: Mapping[str, Any] | None, defaults: Mapping[str, Any] | None = None
) -> dict[str, Any] | None:
    """Validate an attributor's ``projector_kwargs`` and fill in defaults.

    Args:
        projector_kwargs: ``None`` or a mapping with keys among :data:`PROJECTOR_KWARGS`.
        defaults: values used for missing keys (``None``: no projection when
            ``projector_kwargs`` is ``None``).

    Returns:
        ``None`` (no projection) or a fresh dict with every key of :data:`PROJECTOR_KWARGS`
        (``proj_dim`` is ``None`` for the identity unless given). Never aliases its inputs.
    """
    if projector_kwargs is None and defaults is None:
        return None
    if not isinstance(projector_kwargs, (Mapping, type(None))):
        raise ConfigError(
            f"projector_kwargs must be a dict or None, got {type(projector_kwargs).__name__}"
        )
    given = dict(projector_kwargs or {})
    # dattri's spellings: proj_seed is our seed; proj_max_batch_size and device are accepted for
    # drop-in compatibility (features are projected in the loader's batches, on the attributor's device).
    if "proj_seed" in given:
        if "seed" in given:
            raise ConfigError(
                "projector_kwargs has both 'seed' and its dattri alias 'proj_seed'; pass one"
            )
        given["seed"] = given.pop("proj_seed")
    for alias in ("proj_max_batch_size", "device"):
        given.pop(alias, None)
    unknown = sorted(set(given) - set(PROJECTOR_KWARGS))
    if unknown:
        raise ConfigError(
            f"unknown projector_kwargs {unknown}; accepted keys are {list(PROJECTOR_KWARGS)}"
        )
    base = {
        "proj_dim": 512,
        "proj_type": "gaussian",
        "seed": 0,
        "max_chunk_bytes": None,  # planned from the memory budget
        "precision": "highest",
    }
    base.update(defaults or {})
    if given.get("proj_type", base["proj_type"]) == "identity" and "proj_dim" not in given:
        base["proj_dim"] = None
    base.update(given)
    if base["proj_type"] not in PROJ_TYPES:
        raise ConfigError(f"proj_type must be one of {PROJ_TYPES}, got {base['proj_type']!r}")
    if base["proj_dim"] is not None:
        _check_int(base["proj_dim"], "proj_dim", 1)
    _check_int(base["seed"], "seed", 0)
    if base["max_chunk_bytes"] is not None:
        _check_int(base["max_chunk_bytes"], "max_chunk_bytes", 1)
    if base["precision"] not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {base['precision']!r}")
    return base


def projector_from_kwargs(
    resolved: Mapping[str, Any] | None,
    feature_dim: int,
    seed_offset: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    memory_budget: int | float | str | None = None,
) -> Projector | None:
    """The projector described by resolved ``projector_kwargs`` (``None`` -> ``None``).

    ``seed_offset`` is added to the seed: attributors use ``seed + k`` for checkpoint ``k``;
    ``memory_budget`` plans the chunk size when ``max_chunk_bytes`` is ``None``.
    """
    if resolved is None:
        return None
    return make_projector(
        feature_dim,
        resolved["proj_dim"],
        seed=resolved["seed"] + seed_offset,
        proj_type=resolved["proj_type"],
        device=device,
        dtype=dtype,
        max_chunk_bytes=resolved["max_chunk_bytes"],
        memory_budget=memory_budget,
        precision=resolved.get("precision", "highest"),
    )


class ProjectorSet:
    """The projectors of one attributor, one per seed offset (checkpoint), reused across calls.

    Multi-checkpoint methods need projector ``seed + k`` in ``cache()`` and again in
    ``attribute()`` / ``self_attribute()``; drawing the matrix is a large part of projecting a
    few thousand gradients. A projector whose whole matrix fits ``max_chunk_bytes`` keeps it
    (see :class:`Projector`); this set retains such projectors while the retained matrices
    *together* stay within ``max_retained_bytes`` (default: a quarter of ``max_chunk_bytes``,
    given or planned: 64 MiB on one CPU thread), so keeping them never costs much memory. Projectors beyond it are built
    afresh at every :meth:`get` (same seed, same matrix).

    Args:
        resolved: resolved ``projector_kwargs`` (:func:`resolve_projector_kwargs`) or ``None``.
        feature_dim, device, dtype: as for :func:`projector_from_kwargs`.
        max_retained_bytes: memory bound of the retained matrices (``None``: the default above).
        memory_budget: the device's memory budget (plans chunk sizes; ``None``: the device's).
    """

    def __init__(
        self,
        resolved: Mapping[str, Any] | None,
        feature_dim: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_retained_bytes: int | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        self.resolved = None if resolved is None else dict(resolved)
        self.feature_dim = feature_dim
        self.device = device
        self.dtype = dtype
        self.memory_budget = memory_budget
        chunk = None if self.resolved is None else self.resolved["max_chunk_bytes"]
        if self.resolved is not None and chunk is None:
            chunk = planned_chunk_bytes(planner_for(device, memory_budget))
        self.max_retained_bytes = (
            (chunk // 4 if chunk is not None else 0)
            if max_retained_bytes is None
            else _check_int(max_retained_bytes, "max_retained_bytes", 0)
        )
        self._kept: dict[int, Projector] = {}
        self.retained_bytes = 0

    def get(self, seed_offset: int) -> Projector | None:
        """The projector with seed ``seed + seed_offset`` (``None`` when there is no projection)."""
        if self.resolved is None:
            return None
        if seed_offset in self._kept:
            return self._kept[seed_offset]
        proj = projector_from_kwargs(
            self.resolved,
            self.feature_dim,
            seed_offset,
            self.device,
            self.dtype,
            self.memory_budget,
        )
        assert proj is not None
        if proj.proj_type == "identity":
            need = 0
        elif proj.proj_type == "sparse" and proj.chunk_rows >= proj.feature_dim:
            need = proj.feature_dim * _SPARSE_ROW_BYTES
        elif proj.chunk_rows >= proj.feature_dim:
            item = torch.empty((), dtype=proj.dtype).element_size()
            need = proj.feature_dim * proj.proj_dim * item
        else:
            return proj  # regenerated chunk by chunk anyway: nothing to keep
        if self.retained_bytes + need <= self.max_retained_bytes:
            self._kept[seed_offset] = proj
            self.retained_bytes += need
        return proj


# ---------------------------------------------------------------------------------------------
# dattri 0.3.0's projector names (BasicProjector, CudaProjector, ArnoldiProjector, random_project,
# ...), implemented in tdabench.func._projectors_compat on top of Projector and resolved lazily
# here (that module imports this one).
# ---------------------------------------------------------------------------------------------
_DATTRI_PROJECTOR_NAMES = (
    "AbstractProjector",
    "ArnoldiProjector",
    "BasicProjector",
    "ChunkedCudaProjector",
    "CudaProjector",
    "ProjectionType",
    "arnoldi_project",
    "make_random_projector",
    "random_project",
)
__all__ += list(_DATTRI_PROJECTOR_NAMES)


def __getattr__(name: str) -> Any:
    if name in _DATTRI_PROJECTOR_NAMES:
        from tdabench.func import _projectors_compat

        return getattr(_projectors_compat, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
