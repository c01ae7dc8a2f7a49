"""Private torch APIs that carry speed, each with a public-API fallback.

tdabench uses four pieces of torch that are not public API, because they make hot loops
several times faster:

- ``torch.utils._python_dispatch.TorchDispatchMode`` (:mod:`tdabench.func.batching`): folds
  broadcast ``aten.bmm`` calls of batched Hessian-vector products into one GEMM;
- ``torch.ops.aten.threshold_backward`` (``groundtruth/_fast_mlp.py``): ReLU backward in one
  kernel;
- ``nn.modules.batchnorm._NormBase`` / ``nn.modules.dropout._DropoutNd`` (:mod:`tdabench.task`):
  the base classes of layers whose forward depends on train/eval mode; ``_NormBase`` and
  ``_BatchNorm`` also tell the batched trainers (``groundtruth/trainer.py``,
  ``groundtruth/_vmap_batchnorm.py``) which layers keep running statistics;
- replacing ``nn.Linear.forward`` per instance (``groundtruth/_vmap_linear.py``): a custom
  ``vmap`` rule for stacked linear layers.

Each use has a fallback built on public API only, taken automatically when the private piece is
missing, and forced for every use by the environment variable ``TDABENCH_PUBLIC_TORCH_ONLY=1``
(results are the same; only speed differs). ``tests/test_private_torch_api.py`` fails loudly
when a torch upgrade changes one of them, and runs every fallback.
"""

from __future__ import annotations

import os

from torch import nn

__all__ = [
    "PUBLIC_DROPOUT_TYPES",
    "PUBLIC_ONLY_ENV",
    "batch_norm_types",
    "mode_dependent_layer_types",
    "public_only",
    "running_stat_norm_types",
]

PUBLIC_ONLY_ENV = "TDABENCH_PUBLIC_TORCH_ONLY"


def public_only() -> bool:
    """Whether ``TDABENCH_PUBLIC_TORCH_ONLY`` forces the public-API fallbacks."""
    return os.environ.get(PUBLIC_ONLY_ENV, "").strip().lower() not in ("", "0", "false", "no")


#: The public dropout classes (the subclasses of the private ``_DropoutNd`` that torch ships).
PUBLIC_DROPOUT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)

#: The public batch-norm classes (the subclasses of the private ``_BatchNorm`` that torch ships).
_PUBLIC_BATCH_NORM: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.LazyBatchNorm1d,
    nn.LazyBatchNorm2d,
    nn.LazyBatchNorm3d,
)

#: The public normalisation classes with optional running statistics (``_NormBase``'s subclasses).
_PUBLIC_RUNNING_STAT_NORMS: tuple[type[nn.Module], ...] = (
    *_PUBLIC_BATCH_NORM,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LazyInstanceNorm1d,
    nn.LazyInstanceNorm2d,
    nn.LazyInstanceNorm3d,
)

_PUBLIC_MODE_DEPENDENT: tuple[type[nn.Module], ...] = (
    *PUBLIC_DROPOUT_TYPES,
    *_PUBLIC_RUNNING_STAT_NORMS,
)


def _private(module: object, name: str) -> type | None:
    """``module.name`` when it is a class and the private APIs are allowed, else None."""
    value = getattr(module, name, None)
    return value if isinstance(value, type) and not public_only() else None


def batch_norm_types() -> tuple[type[nn.Module], ...]:
    """Batch normalisation layers (statistics over the batch in training mode): the private
    ``_BatchNorm`` base when it exists (it also covers user subclasses), else the public classes."""
    base = _private(nn.modules.batchnorm, "_BatchNorm")
    return (base,) if base is not None else _PUBLIC_BATCH_NORM


def running_stat_norm_types() -> tuple[type[nn.Module], ...]:
    """Normalisation layers that may track running statistics (batch and instance norms): the
    private ``_NormBase`` base when it exists, else the public classes."""
    base = _private(nn.modules.batchnorm, "_NormBase")
    return (base,) if base is not None else _PUBLIC_RUNNING_STAT_NORMS


def mode_dependent_layer_types() -> tuple[type[nn.Module], ...]:
    """Layer types whose forward differs between ``train()`` and ``eval()``: dropout and
    normalisation with running statistics. The private base classes (which also cover
    subclasses and lazy variants) when they exist, else the public classes."""
    dropout = getattr(nn.modules.dropout, "_DropoutNd", None)
    norm = getattr(nn.modules.batchnorm, "_NormBase", None)
    if public_only() or not (isinstance(dropout, type) and isinstance(norm, type)):
        return _PUBLIC_MODE_DEPENDENT
    return (dropout, norm)
