"""Functional, masked batch norm for training stacked models under ``vmap``.

``torch.nn.BatchNorm*`` in training mode updates its running statistics in place, which
``vmap`` over stacked buffers cannot do, and it takes its batch statistics over the whole
input, which is wrong when a model of the batched trainer sees samples that are not its own
(the zero-weight non-members of a shared stream batch, or the padding of a compact batch).

:func:`patch_batch_norm_layers` reroutes every batch-norm layer of a *training template* through
:func:`_masked_forward`, which reads the per-sample weights of the current call from a shared
:class:`BatchNormContext` and

* normalises with the weighted batch statistics (mean and biased variance over the samples of
  weight 1 and every spatial position), so a sample of weight 0 never enters a model's batch
  statistics: the output on the members equals ``BatchNorm`` applied to the members alone;
* computes the updated running statistics functionally, as ``torch.nn.BatchNorm`` does in
  place (``running = (1 - f) * running + f * batch`` with the unbiased variance, ``f`` the
  momentum or ``1 / num_batches_tracked`` when the momentum is ``None``), and records them in
  the context under their state-dict names, for the trainer to commit for the models that
  took the step.

A model with no member in a call (weights all zero) normalises with the statistics of all its
inputs so that every value stays finite; the trainer skips its step and discards its update.
Evaluation uses the unpatched module (running statistics, vmap-safe).

One difference remains, where torch itself refuses: ``BatchNorm`` on ``(N, C)`` features with a
single member in a stream batch (one value per channel). The sequential trainer then raises
torch's ``ValueError``; here the variance is 0 and the output the bias. Recipes whose stream
batches hold several members of every model (the ``scaled`` stream gives ``batch_size`` on
average), or 2d/3d batch norm, never meet it.
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch
from torch import Tensor, nn

from tdabench._compat import batch_norm_types

__all__ = ["BatchNormContext", "patch_batch_norm_layers"]


class BatchNormContext:
    """Per-call side channel between the trainer and the patched batch-norm layers.

    Attributes:
        weights: per-sample weights ``(N,)`` of the current call (0 = not a member), or ``None``
            outside a training call (the layers then behave as plain ``BatchNorm``).
        updates: new running statistics of the call, ``{state-dict name: tensor}``.
    """

    def __init__(self) -> None:
        self.weights: Tensor | None = None
        self.updates: dict[str, Tensor] = {}

    def begin(self, weights: Tensor) -> None:
        """Start a training call with per-sample ``weights`` ``(N,)``."""
        self.weights = weights
        self.updates = {}

    def end(self) -> dict[str, Tensor]:
        """Finish the call; returns the recorded running-statistics updates (detached),
        ``{state-dict name: (C,) running mean / variance, () batch count}``."""
        out = {k: v.detach() for k, v in self.updates.items()}
        self.weights, self.updates = None, {}
        return out


def _masked_forward(
    self: nn.Module, x: Tensor, *, ctx: BatchNormContext, prefix: str, plain: Any
) -> Tensor:
    """Batch norm of ``x`` ``(N, C, *)`` with statistics over the weighted samples (module docstring)."""
    if not self.training or ctx.weights is None:
        return plain(x)
    w = ctx.weights.to(x.dtype)
    w = torch.where(w.sum() > 0, w, torch.ones_like(w))  # an empty call: finite, discarded later
    dims = [0, *range(2, x.dim())]
    chan = (1, -1) + (1,) * (x.dim() - 2)
    wv = w.view((-1,) + (1,) * (x.dim() - 1))
    count = (w.sum() * math.prod(x.shape[2:])).clamp(min=1.0)  # >= 1 member: unchanged
    mean = (x * wv).sum(dims) / count
    xc = x - mean.view(chan)
    var = (xc * xc * wv).sum(dims) / count
    y = xc / torch.sqrt(var.view(chan) + self.eps)
    if self.affine:
        y = y * self.weight.view(chan) + self.bias.view(chan)
    if self.track_running_stats and self.running_mean is not None:
        names = {k: prefix + k for k in ("running_mean", "running_var", "num_batches_tracked")}
        rm = ctx.updates.get(names["running_mean"], self.running_mean)  # a module called twice
        rv = ctx.updates.get(names["running_var"], self.running_var)
        nbt = ctx.updates.get(names["num_batches_tracked"], self.num_batches_tracked) + 1
        f: Any = self.momentum if self.momentum is not None else 1.0 / nbt.to(x.dtype)
        mean_d, var_d = mean.detach(), var.detach()
        unbiased = var_d * count / (count - 1).clamp(min=1.0)
        ctx.updates[names["running_mean"]] = (1 - f) * rm + f * mean_d
        ctx.updates[names["running_var"]] = (1 - f) * rv + f * unbiased
        ctx.updates[names["num_batches_tracked"]] = nbt
    return y


def patch_batch_norm_layers(model: nn.Module, ctx: BatchNormContext) -> list[str]:
    """Route every batch-norm layer of ``model`` (:func:`tdabench._compat.batch_norm_types`)
    through the masked functional form (in place).

    Args:
        model: a training template (its own parameters are never used under ``functional_call``).
        ctx: the context the trainer fills before each call.

    Returns:
        The names of the patched modules.
    """
    names = []
    for name, mod in model.named_modules():
        if isinstance(mod, batch_norm_types()):
            plain = types.MethodType(type(mod).forward, mod)
            prefix = f"{name}." if name else ""

            def fwd(
                self: nn.Module, x: Tensor, _prefix: str = prefix, _plain: Any = plain
            ) -> Tensor:
                return _masked_forward(self, x, ctx=ctx, prefix=_prefix, plain=_plain)

            mod.forward = types.MethodType(fwd, mod)  # type: ignore[method-assign]
            names.append(name)
    return names
