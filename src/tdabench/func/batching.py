"""Faster batched products of a shared matrix under :func:`torch.func.vmap`.

Batched Hessian-vector products (``vmap`` over ``k`` vectors of a ``vjp``/``jvp`` of the
gradient) replay the model's matrix products with the data held fixed and the vectors
batched. ``vmap``'s rule for ``mm(X, B)`` with only ``B`` batched (and the autograd formulas
that produce such products) broadcasts ``X`` to ``(k, n, m)`` and calls ``bmm``: ``k``
skinny GEMMs (for a linear layer with 10 outputs, ``n x m x 10`` each), several times
slower than one wide GEMM over the same numbers.

:func:`fold_broadcast_bmm` is a context manager (a
:class:`~torch.utils._python_dispatch.TorchDispatchMode`) that rewrites such ``bmm`` calls,
where one operand is one matrix broadcast over the batch (batch stride 0), into a single
``mm`` with the batch folded into the other operand's rows or columns. The result is the
same product (only the floating-point summation order inside the GEMM may differ); any
other call, and any call the rewrite cannot handle, goes to the original kernel.

``TorchDispatchMode`` is private torch API: when it is missing, or
``TDABENCH_PUBLIC_TORCH_ONLY=1`` (:mod:`tdabench._compat`), the context does nothing and
``vmap``'s own ``bmm`` runs (same numbers, slower).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from tdabench._compat import public_only

try:  # private torch API (see tdabench._compat)
    from torch.utils._python_dispatch import TorchDispatchMode
except ImportError:  # pragma: no cover - exercised by forcing the fallback
    TorchDispatchMode = object  # type: ignore[assignment,misc]

__all__ = ["fold_broadcast_bmm", "folded_bmm", "folding_available"]

_aten = torch.ops.aten
_HAS_DISPATCH_MODE = TorchDispatchMode is not object and hasattr(_aten, "bmm")


def folding_available() -> bool:
    """Whether :func:`fold_broadcast_bmm` folds (private API present and not disabled)."""
    return _HAS_DISPATCH_MODE and not public_only()


def folded_bmm(a: Tensor, b: Tensor) -> Tensor | None:
    """``bmm(a, b)`` (``a`` ``(k, n, m)``, ``b`` ``(k, m, p)`` -> ``(k, n, p)``) as one ``mm``
    when exactly one operand is a matrix broadcast over the batch (stride 0 on dimension 0);
    ``None`` when the rewrite does not apply."""
    if a.dim() != 3 or b.dim() != 3 or a.layout != torch.strided or b.layout != torch.strided:
        return None
    k, n, m = a.shape
    if k <= 1 or b.shape[0] != k or b.shape[1] != m:
        return None
    p = b.shape[2]
    if a.stride(0) == 0 and b.stride(0) != 0:
        A = a[0]  # (n, m), shared
        bt = b.transpose(1, 2)  # (k, p, m)
        if bt.is_contiguous():
            # rows of every b_j^T stacked without a copy: (k p, m) @ A^T -> (k, p, n)
            return (bt.reshape(k * p, m) @ A.T).view(k, p, n).transpose(1, 2)
        # A @ [b_1 | ... | b_k] -> (n, k, p)
        return (A @ b.permute(1, 0, 2).reshape(m, k * p)).view(n, k, p).permute(1, 0, 2)
    if b.stride(0) == 0 and a.stride(0) != 0:
        B = b[0]  # (m, p), shared
        return (a.reshape(k * n, m) @ B).view(k, n, p)
    return None


class _FoldBroadcastBmm(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is _aten.bmm.default and not kwargs and len(args) == 2:
            a, b = args
            if (
                type(a) is Tensor
                and type(b) is Tensor
                and a.dtype == b.dtype
                and a.device == b.device
            ):
                out = folded_bmm(a, b)
                if out is not None:
                    return out
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def fold_broadcast_bmm(batch: int | None = None) -> Iterator[None]:
    """Inside this context, ``bmm`` of a batch against one broadcast matrix runs as one ``mm``.

    ``batch``: the ``vmap`` batch size about to run, if known; with ``batch <= 1`` there is
    nothing to fold and the context does nothing (it would only add per-op overhead).
    """
    if (batch is not None and batch <= 1) or not folding_available():
        yield
        return
    with _FoldBroadcastBmm():
        yield
