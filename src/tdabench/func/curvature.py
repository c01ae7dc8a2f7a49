"""Curvature operators: one interface for every ``d x d`` matrix an influence function inverts.

An operator is a symmetric ``d x d`` matrix ``C`` known through products. Every operator here
has:

- ``dim`` (``d``), ``dtype``, ``device``;
- ``mvp(V)``: rows of ``C v`` for ``V`` of shape ``(k, d)`` -> ``(k, d)``;
- ``dense(planner=None, max_bytes=None)``: the ``(d, d)`` matrix, refused with
  :class:`~tdabench.errors.MemoryLimitError` when it does not fit (``max_bytes`` if given,
  else the planner's budget);
- ``inverse_mvp(V, damping)`` where it is cheap (``EmpiricalFisher`` through its ``n x n``
  Gram matrix when ``n < d``); otherwise a solver of :mod:`tdabench.func.solvers` inverts it.

Operators:

- :class:`ExactHessian`: the Hessian of a *mean* loss over chunks of samples,
  ``H = (1/n) Σ_chunks ∇² (Σ_{i in chunk} L_i)``, by reverse-over-reverse (``"rev-rev"``:
  the gradient graph of each chunk linearised once and replayed) or forward-over-reverse
  (``"rev-fwd"``) products.
- :class:`GaussNewton`: the generalised Gauss-Newton matrix ``G = (1/n) Σ_i J_iᵀ H_i J_i``
  with ``J_i`` the Jacobian of the model output of sample ``i`` with respect to the
  parameters and ``H_i`` the Hessian of the output loss with respect to that output, in
  closed form (:class:`OutputLoss`). ``J`` products use :func:`torch.func.vjp` (and, for
  ``J v``, a second ``vjp`` of the linear map ``u -> Jᵀ u`` in ``"rev-rev"`` mode, or
  :func:`torch.func.jvp` in ``"rev-fwd"`` mode). ``G`` is positive semi-definite wherever the
  output loss is convex in the output (cross-entropy, squared error), unlike ``H``.
- :class:`EmpiricalFisher`: ``F = (1/n) Gᵀ G`` from per-sample gradients ``G`` ``(n, d)``.

**Declaring the output loss (GGN).** The GGN needs the loss split into a model output and an
output loss. :class:`OutputLoss` is that declaration: ``OutputLoss("cross_entropy")`` (softmax
cross-entropy on logits ``(B, C)``, or ``(B, T, C)`` with the per-sample loss the mean over
its tokens whose label is not ``ignore_index``) or ``OutputLoss("mse")`` (per sample, the mean
over the output's entries of ``(output - target)²``). The output defaults to
``task.forward(params, batch[input_index])`` and the target to ``batch[target_index]``; pass
``output_func(params, batch)`` for other models. A loss function declares its split by an
attribute, ``loss_func.ggn_output = OutputLoss(...)`` (or the string ``"cross_entropy"``), or
the attributor takes ``ggn_output=...``; attributors check on the first cached chunk that the
declared split reproduces ``loss_func`` and refuse otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, jvp, vjp, vmap

from tdabench.errors import ConfigError, ShapeError
from tdabench.func.batching import fold_broadcast_bmm
from tdabench.memory import MemoryPlanner

__all__ = [
    "FOLD_MIN_WORK",
    "MODES",
    "ChunkedCurvature",
    "CurvatureOperator",
    "EmpiricalFisher",
    "ExactHessian",
    "GaussNewton",
    "OutputLoss",
    "ggn_matvec",
    "hvp_matvec",
    "resolve_output_loss",
]

Matvec = Callable[[Tensor], Tensor]

MODES = ("rev-rev", "rev-fwd")
"""How products are differentiated: reverse-over-reverse or forward-over-reverse."""

FOLD_MIN_WORK = 16384
"""Fold broadcast ``bmm`` calls (:func:`~tdabench.func.batching.fold_broadcast_bmm`) only when
samples x vectors of one batched product reach this: below it the products are tiny and the
dispatch mode's per-op Python overhead costs more than it saves (LiSSA's mini-batches)."""


def _fold(samples: int | None, k: int) -> Any:
    small = samples is not None and samples * k < FOLD_MIN_WORK
    return fold_broadcast_bmm(1 if small else k)


def _rows(one: Matvec, samples: int | None) -> Matvec:
    """``V (k, d) -> (k, d)`` from a one-vector product: plain for one row, ``vmap`` otherwise."""
    batched = vmap(one, randomness="same")

    def mv(V: Tensor) -> Tensor:
        if V.shape[0] == 1:
            return one(V[0]).unsqueeze(0)
        with _fold(samples, V.shape[0]):
            return batched(V)

    return mv


def hvp_matvec(
    func: Callable[[Tensor], Tensor],
    flat: Tensor,
    mode: str = "rev-rev",
    samples: int | None = None,
) -> Matvec:
    """Batched Hessian-vector products of a scalar ``func`` at ``flat``: ``(k, d) -> (k, d)``.

    ``"rev-rev"`` differentiates the gradient in reverse mode once (``vjp`` of ``grad``, graph
    kept) and replays it for every row; ``"rev-fwd"`` pushes every row forward through the
    gradient (``jvp`` of ``grad``). ``samples``: how many samples ``func`` sums over, if known
    (decides whether wide GEMM folding pays, see :data:`FOLD_MIN_WORK`).
    """
    if mode == "rev-rev":
        _, vjp_fn = vjp(grad(func), flat)
        return _rows(lambda v: vjp_fn(v)[0], samples)
    if mode == "rev-fwd":
        return _rows(lambda v: jvp(grad(func), (flat,), (v,))[1], samples)
    raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")


class CurvatureOperator:
    """A symmetric ``(d, d)`` operator known through batched products ``(k, d) -> (k, d)``.

    Subclasses set ``dim`` (``d``), ``dtype``, ``device`` and implement :meth:`mvp`.
    """

    dim: int
    dtype: torch.dtype
    device: torch.device
    name: str = "curvature"

    def mvp(self, V: Tensor) -> Tensor:  # pragma: no cover - abstract
        """Rows of ``C v``: ``V`` ``(k, d)`` -> ``(k, d)``."""
        raise NotImplementedError

    __call__ = mvp

    def inverse_mvp(self, V: Tensor, damping: float) -> Tensor:
        """Rows of ``(C + damping I)^{-1} v`` where the operator can do it cheaply.

        Raises:
            NotImplementedError: use a solver of :mod:`tdabench.func.solvers`.
        """
        raise NotImplementedError(f"{type(self).__name__} has no cheap inverse; use a solver")

    def dense_bytes(self) -> int:
        """Bytes of the dense ``(d, d)`` matrix."""
        return self.dim * self.dim * torch.empty((), dtype=self.dtype).element_size()

    def check_dense(
        self, planner: MemoryPlanner | None = None, max_bytes: int | None = None
    ) -> None:
        """Refuse (:class:`~tdabench.errors.MemoryLimitError`) a dense matrix over the limit:
        ``max_bytes`` if given, else the planner's budget (the device's by default)."""
        from tdabench.func.solvers import check_dense_size  # solvers imports this module

        check_dense_size(self.dim, self.dtype, max_bytes, self.name, planner, self.device)

    def dense(self, planner: MemoryPlanner | None = None, max_bytes: int | None = None) -> Tensor:
        """The symmetrised ``(d, d)`` matrix, from products with the identity.

        Raises:
            MemoryLimitError: it does not fit (see :meth:`check_dense`).
        """
        from tdabench.func.solvers import dense_from_matvec  # solvers imports this module

        self.check_dense(planner, max_bytes)
        C = dense_from_matvec(self.mvp, self.dim, self.dtype, self.device)
        return C.add(C.T).mul_(0.5)


# ---------------------------------------------------------------------- chunked operators
class ChunkedCurvature(CurvatureOperator):
    """``C = (1/n) Σ_c C_c`` ``(d, d)``: a mean over chunks of samples, each chunk's product from
    :meth:`_op` (subclasses). With ``keep`` every chunk is linearised once and kept (iterative
    solvers); otherwise it is rebuilt per product (one-shot use). :meth:`dense` assembles
    ``C`` chunk by chunk, so only one chunk's graph lives at a time when not kept.
    """

    def _setup(self, count: int, flat: Tensor, n: int, keep: bool) -> None:
        self.count, self.flat, self.n = count, flat, int(n)
        self.dim, self.dtype, self.device = flat.numel(), flat.dtype, flat.device
        self._ops = [self._op(i) for i in range(count)] if keep else None

    def _op(self, i: int) -> Matvec:  # pragma: no cover - abstract
        raise NotImplementedError

    def _chunk(self, i: int) -> Matvec:
        return self._ops[i] if self._ops is not None else self._op(i)

    def mvp(self, V: Tensor) -> Tensor:
        out: Tensor | None = None
        for i in range(self.count):
            part = self._chunk(i)(V)
            out = part if out is None else out + part
        assert out is not None
        return out / self.n

    def dense(self, planner: MemoryPlanner | None = None, max_bytes: int | None = None) -> Tensor:
        """The symmetrised ``(d, d)`` mean, assembled chunk by chunk."""
        from tdabench.func.solvers import dense_from_matvec  # solvers imports this module

        self.check_dense(planner, max_bytes)
        C = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        for i in range(self.count):
            dense_from_matvec(self._chunk(i), self.dim, self.dtype, self.device, out=C)
        if not bool(torch.isfinite(C.sum())):
            return C  # the solver reports it, naming the fix
        return C.add(C.T).mul_(0.5 / self.n)


class ExactHessian(ChunkedCurvature):
    """Hessian of a mean loss: ``H = (1/n) Σ_c ∇² f_c(θ)`` over chunk functions ``f_c``.

    Args:
        funcs: scalar functions ``f_c(flat)``, each the *summed* loss of one chunk of samples.
        flat: the point ``θ``, shape ``(d,)``.
        n: number of samples in all.
        mode: ``"rev-rev"`` or ``"rev-fwd"``.
        samples: samples per chunk (GEMM-folding heuristics only).
        keep: linearise each chunk once and keep its graph (iterative solvers).
    """

    name = "Hessian"

    def __init__(
        self,
        funcs: Sequence[Callable[[Tensor], Tensor]],
        flat: Tensor,
        n: int = 1,
        mode: str = "rev-rev",
        samples: Sequence[int | None] | None = None,
        keep: bool = True,
    ) -> None:
        self.funcs, self.mode = list(funcs), mode
        self.samples = list(samples) if samples is not None else [None] * len(self.funcs)
        self._setup(len(self.funcs), flat, n, keep)

    def _op(self, i: int) -> Matvec:
        return hvp_matvec(self.funcs[i], self.flat, self.mode, self.samples[i])


# ---------------------------------------------------------------------- output losses
@dataclass(frozen=True)
class OutputLoss:
    """An output loss with a closed-form Hessian, and where its output and target come from.

    Attributes:
        kind: ``"cross_entropy"`` (softmax cross-entropy on logits ``(B, C)`` or ``(B, T, C)``;
            the per-sample loss is the mean over the sample's tokens whose label is not
            ``ignore_index``) or ``"mse"`` (per sample, the mean over its output entries of
            ``(output - target)²``).
        output_func: ``output_func(params, batch) -> (B, ...)`` model output; ``None`` means
            ``task.forward(params, batch[input_index])``.
        input_index: position of the model input in a batch (default output only).
        target_index: position of the labels/targets in a batch.
        ignore_index: label of tokens that do not count (cross-entropy).
    """

    kind: str = "cross_entropy"
    output_func: Callable[[dict[str, Tensor], Any], Tensor] | None = None
    input_index: int = 0
    target_index: int = -1
    ignore_index: int = -100

    def __post_init__(self) -> None:
        if self.kind not in ("cross_entropy", "mse"):
            raise ConfigError(
                f"OutputLoss kind must be 'cross_entropy' or 'mse', got {self.kind!r}"
            )

    def target(self, batch: Any) -> Tensor:
        """The labels/targets ``(B, ...)`` of ``batch`` (a tuple/list holding them)."""
        if isinstance(batch, Tensor):
            raise ShapeError("the GGN needs batches holding (inputs, targets); got a single tensor")
        return batch[self.target_index]

    def _token_weights(self, out: Tensor, y: Tensor) -> Tensor:
        """``(B, *T)`` weights: 1 / (valid tokens of the sample) for valid tokens, 0 else."""
        valid = (y != self.ignore_index).to(out.dtype)
        if valid.dim() == 1:
            return valid
        count = valid.reshape(valid.shape[0], -1).sum(1).clamp_min(1.0)
        return valid / count.view(-1, *([1] * (valid.dim() - 1)))

    def per_sample(self, out: Tensor, y: Tensor) -> Tensor:
        """Per-sample losses ``(B,)`` of outputs ``out`` ``(B, ...)`` against ``y``."""
        if self.kind == "mse":
            return ((out - y.to(out.dtype)) ** 2).reshape(out.shape[0], -1).mean(1)
        if out.dim() == 2:
            return F.cross_entropy(out, y, reduction="none", ignore_index=self.ignore_index)
        C = out.shape[-1]
        tok = F.cross_entropy(
            out.reshape(-1, C), y.reshape(-1), reduction="none", ignore_index=self.ignore_index
        ).view(y.shape)
        return (tok * self._token_weights(out, y)).reshape(out.shape[0], -1).sum(1)

    def hessian_product(self, out: Tensor, y: Tensor, U: Tensor) -> Tensor:
        """``H_i u_i`` for every sample: ``U`` has ``out``'s shape ``(B, ...)``, so does the result.

        Cross-entropy: ``w (p ⊙ u - p (pᵀ u))`` per token with ``p = softmax(out)`` and ``w``
        the token weight; squared error: ``(2 / m) u`` with ``m`` entries per sample.
        """
        if self.kind == "mse":
            m = out[0].numel() if out.dim() > 1 else 1
            return U * (2.0 / m)
        p = torch.softmax(out, dim=-1)
        pu = p * U
        HU = pu - p * pu.sum(-1, keepdim=True)
        return HU * self._token_weights(out, y).unsqueeze(-1)


def resolve_output_loss(spec: Any, loss_func: Any = None) -> OutputLoss:
    """The :class:`OutputLoss` of ``spec`` (an ``OutputLoss``, ``"cross_entropy"``, ``"mse"``)
    or, when ``spec`` is ``None``, the one ``loss_func`` declares (``loss_func.ggn_output``).

    Raises:
        ConfigError: nothing is declared, naming both ways to declare it.
    """
    if spec is None:
        spec = getattr(loss_func, "ggn_output", None)
    if isinstance(spec, OutputLoss):
        return spec
    if isinstance(spec, str):
        return OutputLoss(kind=spec)
    raise ConfigError(
        "hessian='ggn' needs the loss split into model output and output loss: pass "
        "ggn_output='cross_entropy' or 'mse' (or an OutputLoss), or set loss_func.ggn_output; "
        "or use hessian='exact'"
    )


# ---------------------------------------------------------------------- Gauss-Newton
def ggn_matvec(
    out_fn: Callable[[Tensor], Tensor],
    flat: Tensor,
    loss: OutputLoss,
    target: Tensor,
    mode: str = "rev-rev",
    samples: int | None = None,
) -> Matvec:
    """Batched ``Σ_i J_iᵀ H_i J_i v`` for the outputs ``out_fn(flat)`` ``(B, ...)`` of one chunk.

    ``Jᵀ u`` is a ``vjp`` of ``out_fn`` (graph kept); ``J v`` is a ``vjp`` of that linear map
    (``"rev-rev"``, graph kept) or a ``jvp`` of ``out_fn`` (``"rev-fwd"``).
    """
    out0, vjp_fn = vjp(out_fn, flat)
    out0 = out0.detach()
    if mode == "rev-rev":
        _, jv_fn = vjp(lambda u: vjp_fn(u)[0], torch.zeros_like(out0))

        def J(v: Tensor) -> Tensor:
            return jv_fn(v)[0]
    elif mode == "rev-fwd":

        def J(v: Tensor) -> Tensor:
            return jvp(out_fn, (flat,), (v,))[1]
    else:
        raise ConfigError(f"mode must be one of {MODES}, got {mode!r}")

    def one(v: Tensor) -> Tensor:
        return vjp_fn(loss.hessian_product(out0, target, J(v)))[0]

    return _rows(one, samples)


class GaussNewton(ChunkedCurvature):
    """Generalised Gauss-Newton matrix of a mean loss, ``G = (1/n) Σ_i J_iᵀ H_i J_i``.

    Args:
        out_fns: per chunk, ``out_fn(flat) -> (B_c, ...)`` the model outputs of its samples.
        targets: per chunk, the targets/labels ``(B_c, ...)``.
        loss: the :class:`OutputLoss` (closed-form ``H_i``).
        flat: the point, shape ``(d,)``.
        n: samples in all.
        mode: ``"rev-rev"`` or ``"rev-fwd"`` Jacobian-vector products.
        keep: keep each chunk's graphs for every product (iterative solvers).
    """

    name = "Gauss-Newton matrix"

    def __init__(
        self,
        out_fns: Sequence[Callable[[Tensor], Tensor]],
        targets: Sequence[Tensor],
        loss: OutputLoss,
        flat: Tensor,
        n: int = 1,
        mode: str = "rev-rev",
        keep: bool = True,
    ) -> None:
        self.out_fns, self.targets, self.loss, self.mode = list(out_fns), list(targets), loss, mode
        self._setup(len(self.out_fns), flat, n, keep)

    def _op(self, i: int) -> Matvec:
        y = self.targets[i]
        return ggn_matvec(self.out_fns[i], self.flat, self.loss, y, self.mode, int(y.shape[0]))


# ---------------------------------------------------------------------- empirical Fisher
class EmpiricalFisher(CurvatureOperator):
    """``F = (1/n) Gᵀ G`` from per-sample gradients ``G`` ``(n, d)``; ``F`` is never formed
    by :meth:`mvp`. :meth:`inverse_mvp` uses the ``n x n`` Gram matrix (Woodbury) when ``n < d``.
    """

    name = "Fisher matrix"

    def __init__(self, G: Tensor) -> None:
        if G.dim() != 2:
            raise ShapeError(f"per-sample gradients must be (n, d), got {tuple(G.shape)}")
        self.G = G
        self.n, self.dim = G.shape
        self.dtype, self.device = G.dtype, G.device

    def mvp(self, V: Tensor) -> Tensor:
        return (V @ self.G.T) @ self.G / self.n

    def dense(self, planner: MemoryPlanner | None = None, max_bytes: int | None = None) -> Tensor:
        self.check_dense(planner, max_bytes)
        return self.G.T @ self.G / self.n

    def inverse_mvp(self, V: Tensor, damping: float) -> Tensor:
        """``(F + λI)^{-1} v = (v - Gᵀ (nλ I + G Gᵀ)^{-1} G v) / λ`` (needs ``λ > 0``)."""
        if not damping > 0:
            raise ConfigError("EmpiricalFisher.inverse_mvp needs damping > 0 (F has rank <= n)")
        K = self.G @ self.G.T
        K.diagonal().add_(self.n * damping)
        L = torch.linalg.cholesky(K)
        coeff = torch.cholesky_solve((V @ self.G.T).T, L).T
        return (V - coeff @ self.G) / damping
