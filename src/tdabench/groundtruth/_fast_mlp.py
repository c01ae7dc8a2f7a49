"""Hand-written batched training of plain Linear/ReLU stacks (the BatchedTrainer fast path).

For models that are a bare ``nn.Linear`` or an ``nn.Sequential`` of ``nn.Linear`` layers
separated by ``nn.ReLU`` (``nn.Flatten`` with default arguments and ``nn.Identity`` allowed),
trained for classification with SGD (momentum and weight decay allowed, no gradient clipping),
:class:`FastStack` replaces ``vmap(grad(...))`` + :class:`FunctionalOptimizer` by explicit
batched forward/backward passes (``mm`` / ``bmm``) whose weight-gradient GEMMs accumulate
straight into the parameters (plain SGD) or the momentum buffers (``addmm_``/``baddbmm_`` with
``beta``), so no gradient tensor is materialised and no autograd / torch.func machinery runs.

Layouts (``m`` models, ``K`` kept input columns):

* first layer, ``shared`` mode (every model sees the whole stream batch): one matrix
  ``([1 +] K, H * m)`` (column ``h * m + r`` is unit ``h`` of model ``r``, so the softmax of a
  one-layer model runs over a strided class axis with the models contiguous); the forward is
  one wide GEMM ``x @ W`` and the update one ``W.addmm_(x.T, G)`` (SGD without momentum: the
  gradient goes straight into the weights). The bias is the first row of ``W``, fed by a
  constant-one input column. On the CPU, inputs that are non-zero in at most 30% of the
  training samples (MNIST: 425 of the 663 used pixels) are ordered last and enter the forward
  through a weighted ``embedding_bag`` over each sample's non-zeros instead of the GEMM (fewer
  flops where most products are zero); likewise their rows of the update are an
  ``embedding_bag`` over the rows of ``G``.
* first layer, ``compact`` mode (each model gets its own members): ``(m, [1 +] K, H)``, one
  ``mm`` per model on its members (no padding) over the often non-zero inputs, plus (CPU) one
  ``embedding_bag`` over all models' weight rows for the rare inputs; the update is one
  ``addmm_`` per model over all rows.
* later layers: ``(m, out, in)`` weights and ``(m, out, 1)`` biases with feature-major
  outputs ``(m, out, b)`` (``W @ a.T``; several times faster than ``a @ W.T`` for 10 classes).

Input columns that are zero for every training sample (e.g. MNIST border pixels) contribute
nothing to any forward pass and get exactly zero gradient, so without weight decay their
weights never change (SGD with or without momentum): they are dropped from the GEMMs and
restored from the initial weights when the state is read out. With weight decay every column
is kept.

The numbers equal the generic path up to the order of floating-point sums (tested in float64
against it and against a per-model ``torch.optim`` loop).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdabench._compat import public_only

_THRESHOLD_BACKWARD = getattr(torch.ops.aten, "threshold_backward", None)  # private torch API


def relu_backward(grad: Tensor, pre: Tensor) -> Tensor:
    """ReLU backward: 0 where the pre-activation ``pre <= 0``, else ``grad`` (NaN ``pre`` keeps
    ``grad``, as ``threshold_backward`` does).

    One kernel through the private ``torch.ops.aten.threshold_backward`` when it exists (see
    :mod:`tdabench._compat`); otherwise the public ``masked_fill`` with the same result.

    Args:
        grad: gradient of the ReLU output, any shape ``(*)``.
        pre: the pre-activation, same shape as ``grad``.

    Returns:
        The gradient of the pre-activation, shape ``(*)``.
    """
    if _THRESHOLD_BACKWARD is not None and not public_only():
        return _THRESHOLD_BACKWARD(grad, pre, 0)
    return grad.masked_fill(pre <= 0, 0)


__all__ = ["FastStack", "fast_plan"]

#: shared first layer on the CPU: inputs that are non-zero in at most this fraction of the
#: training samples are summed by an embedding_bag instead of the GEMM (measured break-even on
#: MNIST: a GEMM column costs about as much as 30% of a column of embedding_bag row reads)
_SPARSE_MAX_DENSITY = 0.3


def fast_plan(
    model: nn.Module, recipe: Mapping[str, Any], kind: str, n_inputs: int, has_buffers: bool
) -> tuple[list[tuple[str, nn.Linear, bool]] | None, str]:
    """Whether the fast path can train ``model``, and how.

    Args:
        model: the trainer's template model.
        recipe: normalised recipe (:func:`tdabench.groundtruth.optim.normalize_recipe`).
        kind: the trainer's loss kind (``"classification"`` or ``"sequence"``).
        n_inputs: number of input tensors of a training sample.
        has_buffers: whether the model has buffers.

    Returns:
        ``(layers, reason)``: the Linear layers as ``(module name, layer, ReLU after it)`` when
        the fast path applies (``reason`` describes the stack), else ``(None, why not)``.
    """
    if kind != "classification":
        return None, f"kind {kind!r} (fast path: classification only)"
    if recipe["optimizer"] != "sgd":
        return None, f"optimizer {recipe['optimizer']!r} (fast path: sgd only)"
    if recipe["grad_clip"] is not None:
        return None, "grad_clip is set"
    if n_inputs != 1:
        return None, f"{n_inputs} input tensors (fast path: one)"
    if has_buffers:
        return None, "the model has buffers"
    declared = getattr(model, "linear_relu_stack", None)
    if callable(declared):  # the model states its forward is x.flatten(1) -> these layers
        stack = declared()
        if stack is None:
            return None, f"{type(model).__name__}.linear_relu_stack() declined (e.g. dropout is on)"
        layers = [list(x) for x in stack]
        if not layers or not all(type(lin) is nn.Linear for _, lin, _ in layers):
            return None, f"{type(model).__name__}.linear_relu_stack() must name nn.Linear layers"
    elif type(model) is nn.Linear:  # subclasses may override forward
        return [("", model, False)], "nn.Linear"
    elif type(model) is not nn.Sequential:
        return None, (
            f"{type(model).__name__} is not a plain nn.Linear or nn.Sequential and has no "
            "linear_relu_stack()"
        )
    else:
        layers = _sequential_layers(model)
        if isinstance(layers, str):
            return None, layers
    if not layers:
        return None, "no nn.Linear layer"
    if layers[-1][2]:
        return None, "the last layer is a ReLU"
    for (_, a, _), (_, b, _) in itertools.pairwise(layers):
        if a.out_features != b.in_features:
            return None, "layer widths do not chain"
    return [tuple(x) for x in layers], "Linear/ReLU stack " + ", ".join(
        f"Linear({lin.in_features},{lin.out_features})" + ("+ReLU" if r else "")
        for _, lin, r in layers
    )


def _sequential_layers(model: nn.Sequential) -> list[list[Any]] | str:
    """``[name, Linear, relu_after]`` rows of a plain Sequential, or why it does not qualify."""
    layers: list[list[Any]] = []
    for name, mod in model.named_children():
        if isinstance(mod, nn.Identity):
            continue
        if type(mod) is nn.Flatten:
            if (mod.start_dim, mod.end_dim) != (1, -1):
                return f"nn.Flatten({mod.start_dim}, {mod.end_dim}) (fast path: default arguments)"
            continue
        if type(mod) is nn.Linear:
            layers.append([name, mod, False])
        elif type(mod) is nn.ReLU:
            if not layers or layers[-1][2]:
                return "nn.ReLU not directly after an nn.Linear"
            layers[-1][2] = True
        else:
            return f"layer {name} is {type(mod).__name__} (fast path: Linear/ReLU/Flatten/Identity)"
    return layers


def _pname(mod: str, what: str) -> str:
    return f"{mod}.{what}" if mod else what


#: ``acc(t, beta, alpha)`` sets ``t = beta * t + alpha * grad`` in place for one parameter's
#: gradient ``grad`` (never materialised: a GEMM or embedding_bag accumulates into ``t``)
_Accumulate = Callable[[Tensor, float, float], Any]


@dataclass
class _Batch:
    """One stream batch of ``B`` samples as the first layer sees it (``m`` models).

    Shared mode: ``xb`` ``(B, [1 +] K)``, ``yb`` ``(B,)``, ``coef`` ``(B, m)`` (each sample's
    weight in each model's masked mean loss), and when there are rare inputs the batch's
    non-zeros: ``ln`` ``(B,)`` per sample, their columns ``sp_cols`` and values ``sp_vals``
    (sample order). Compact mode: ``xb`` ``(sum k, [1 +] K)`` (each model's members in turn),
    ``yb`` and ``coef`` ``(m, k_max)`` (zero-padded), ``spans`` the ``(model, its rows of xb,
    k)`` of the models with members.
    """

    bsz: int
    xb: Tensor
    yb: Tensor
    coef: Tensor
    spans: list[tuple[int, Tensor, int]] = field(default_factory=list)
    ln: Tensor | None = None
    sp_cols: Tensor | None = None
    sp_vals: Tensor | None = None


class FastStack:
    """Training state and step of ``m`` stacked Linear/ReLU models (see the module docstring).

    Args:
        layers: the plan from :func:`fast_plan`.
        params: stacked parameters ``{name: (m, ...)}`` at initialisation (not modified).
        x: the training inputs ``(n, ...)`` (flattened to ``(n, d)``).
        recipe: normalised recipe (sgd).
        compact: first-layer mode (see the module docstring).
    """

    def __init__(
        self,
        layers: list[tuple[str, nn.Linear, bool]],
        params: Mapping[str, Tensor],
        x: Tensor,
        recipe: Mapping[str, Any],
        compact: bool,
    ) -> None:
        self.layers = layers
        self.mu = float(recipe["momentum"])
        self.wd = float(recipe["weight_decay"])
        self.compact = bool(compact)
        x = x.reshape(x.shape[0], -1)
        name0, lin0, _ = layers[0]
        self.m = int(params[_pname(name0, "weight")].shape[0])
        self.dtype = x.dtype
        self.init_params = params  # untouched; the dropped columns are read from here
        self.bias0 = lin0.bias is not None
        self._index_inputs(x)
        self._stack_params(params)

    def _index_inputs(self, x: Tensor) -> None:
        """Kept input columns (dense first, then rare) and the first-layer inputs ``xa``
        ``(n, [1 +] K)``: [bias input,] dense inputs, rare inputs."""
        freq = (x != 0).to(x.dtype).mean(0)  # fraction of samples where each input is non-zero
        if self.wd == 0.0:
            kept = (freq > 0).nonzero().flatten()
        else:
            kept = torch.arange(x.shape[1], device=x.device)
        n_dense = len(kept)
        # shared mode on the CPU: rarely non-zero inputs (e.g. MNIST's outer pixels) go through a
        # weighted embedding_bag over each sample's non-zeros (rows of W), the others through a GEMM
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            rare = freq.index_select(0, kept) <= _SPARSE_MAX_DENSITY
            kept = torch.cat([kept[~rare], kept[rare]])
            n_dense = int((~rare).sum())
        self.kept = kept  # input column of each weight row after the bias row
        cols = [x.index_select(1, kept)]
        if self.bias0:
            cols.insert(0, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device))
        self.xa = torch.cat(cols, 1).contiguous()
        self.n_dense = int(self.bias0) + n_dense
        self._index_rare(self.xa[:, self.n_dense :])

    def _index_rare(self, rest: Tensor) -> None:
        """The non-zeros of the rare inputs ``rest`` ``(n, K_rare)`` in CSR form (sample order):
        ``_nnz`` per sample, ``_indptr`` its first, ``_cols`` (row of ``W[n_dense:]``), ``_vals``."""
        nnz = (rest != 0).sum(1)
        self.sparse = bool(nnz.sum() > 0)
        if self.sparse:
            r, c = rest.nonzero(as_tuple=True)
            self._nnz = nnz
            self._indptr = torch.cumsum(nnz, 0) - nnz
            self._cols = c
            self._vals = rest[r, c]

    def _stack_params(self, params: Mapping[str, Tensor]) -> None:
        """Working copies of the parameters in the layouts of the module docstring, and zero
        momentum buffers when the recipe has momentum."""
        name0 = self.layers[0][0]
        w0 = params[_pname(name0, "weight")].index_select(2, self.kept)  # (m, H, K)
        parts = [w0.transpose(1, 2)]  # (m, K, H)
        if self.bias0:
            parts.insert(0, params[_pname(name0, "bias")].unsqueeze(1))  # (m, 1, H)
        w0 = torch.cat(parts, 1)  # (m, [1 +] K, H)
        self.h0 = int(w0.shape[2])
        if not self.compact:
            w0 = w0.permute(1, 2, 0).reshape(w0.shape[1], self.h0 * self.m)  # (K [+1], H * m)
        self.p: list[Tensor] = [w0.contiguous().clone()]
        self.p_bias: list[Tensor | None] = [None]
        for name, lin, _ in self.layers[1:]:
            self.p.append(params[_pname(name, "weight")].contiguous().clone())  # (m, out, in)
            self.p_bias.append(
                params[_pname(name, "bias")].unsqueeze(2).clone() if lin.bias is not None else None
            )
        momentum = self.mu != 0.0
        self.buf = [torch.zeros_like(t) for t in self.p] if momentum else None
        self.buf_bias = (
            [None if b is None else torch.zeros_like(b) for b in self.p_bias] if momentum else None
        )
        if self.compact:  # per-model views of the first layer (updated in place: stay valid)
            self._p0 = self.p[0].unbind(0)
            self._buf0 = self.buf[0].unbind(0) if self.buf is not None else None

    # ------------------------------------------------------------------ state
    def _first_weight(self) -> Tensor:
        """The first layer's working weights per model, ``(m, [1 +] K, H)`` (a view)."""
        w0 = self.p[0]
        if not self.compact:
            w0 = w0.view(w0.shape[0], self.h0, self.m).permute(2, 0, 1)
        return w0

    def state(self) -> dict[str, Tensor]:
        """The current parameters.

        Returns:
            Stacked parameters ``{name: (m, ...)}`` in ``nn.Linear`` layout (copies).
        """
        out: dict[str, Tensor] = {}
        name0, _, _ = self.layers[0]
        w0 = self._first_weight()
        b0 = int(self.bias0)
        full = self.init_params[_pname(name0, "weight")].clone()
        full.index_copy_(2, self.kept, w0[:, b0:].transpose(1, 2))
        out[_pname(name0, "weight")] = full
        if self.bias0:
            out[_pname(name0, "bias")] = w0[:, 0].clone()
        for (name, _, _), w, b in zip(self.layers[1:], self.p[1:], self.p_bias[1:], strict=True):
            out[_pname(name, "weight")] = w.clone()
            if b is not None:
                out[_pname(name, "bias")] = b.squeeze(2).clone()
        return out

    def finite(self) -> Tensor:
        """Which models are intact.

        Returns:
            bool ``(m,)``: all parameters of the model are finite.
        """
        ok = torch.ones(self.m, dtype=torch.bool, device=self.xa.device)
        for t in [self._first_weight(), *self.p[1:], *(b for b in self.p_bias if b is not None)]:
            ok &= torch.isfinite(t.reshape(self.m, -1)).all(1)
        return ok

    # ------------------------------------------------------------------ step
    def step(self, idx: Tensor, w_t: Tensor, labels: Tensor, lr: float) -> Tensor | None:
        """One SGD step of every model on one stream batch.

        Args:
            idx: int64 ``(B,)`` device indices of the stream batch's training samples.
            w_t: float 0/1 ``(B, m)``: which samples belong to which model.
            labels: int64 ``(n,)`` labels of all training samples.
            lr: learning rate of this step.

        Returns:
            None, or a bool ``(m,)`` of models whose logits were not finite on this batch.
        """
        counts = w_t.sum(0)  # (m,) exact small integers
        active = counts > 0
        if not bool(active.any()):  # every model skips this step
            return None
        inactive = None if bool(active.all()) else (~active).nonzero().flatten()
        scale = 1.0 / counts.clamp(min=1.0)
        if self.compact:
            batch, z0 = self._first_forward_compact(idx, w_t, labels, counts, scale)
        else:
            batch, z0 = self._first_forward_shared(idx, w_t, labels, scale)
        zs, acts = self._forward(batch, z0)
        bad = self._logit_grads(batch, zs[-1])
        saved = None
        if inactive is not None and (self.mu != 0.0 or self.wd != 0.0):
            saved = [(t, ix, d, t.index_select(d, ix)) for t, ix, d in self._slices(inactive)]
        g = self._backward_hidden(zs, acts, lr)
        if self.compact:
            self._update_first_compact(batch, g, lr)
        else:
            self._update_first_shared(batch, g, lr)
        if saved is not None:
            for t, ix, d, old in saved:
                t.index_copy_(d, ix, old)
        return bad

    def _first_forward_compact(
        self, idx: Tensor, w_t: Tensor, labels: Tensor, counts: Tensor, scale: Tensor
    ) -> tuple[_Batch, Tensor]:
        """Compact first layer: each model's members (stream order) concatenated, one gather,
        then one GEMM per model (a loop of mm beats a bmm padded to the largest member count);
        later layers work on ``(m, k_max, .)`` tensors padded with zero rows of zero weight.
        Returns the batch and the pre-activations ``(m, k_max, H)``."""
        r_ids, j = (w_t.t() > 0).nonzero(as_tuple=True)  # sorted by model, then stream position
        ks = counts.long()
        k_list = ks.tolist()
        k_max = max(k_list)
        starts = torch.cumsum(ks, 0) - ks
        sel = idx.index_select(0, j)
        xb = self.xa.index_select(0, sel)  # (sum k, K+1)
        pos = torch.arange(len(sel), device=sel.device) - starts.index_select(0, r_ids)
        yb = torch.zeros(self.m, k_max, dtype=labels.dtype, device=labels.device)
        yb[r_ids, pos] = labels.index_select(0, sel)
        coef = (
            (torch.arange(k_max, device=ks.device) < ks.unsqueeze(1))
            .to(self.dtype)
            .mul_(scale.unsqueeze(1))
        )
        z = torch.zeros(self.m, k_max, self.h0, dtype=self.dtype, device=xb.device)
        spans = [
            (r, xr, k) for r, (xr, k) in enumerate(zip(xb.split(k_list), k_list, strict=True)) if k
        ]
        zr = z.unbind(0)
        nd = self.n_dense
        if nd:
            for r, xr, k in spans:
                torch.mm(xr[:, :nd], self._p0[r][:nd], out=zr[r][:k])
        if self.sparse:  # rare inputs: one embedding_bag over the rows of all models' weights
            ln, off, at, total = self._nonzeros(sel)
            k1 = self.p[0].shape[1]
            rows = self._cols.index_select(0, at) + torch.repeat_interleave(
                r_ids * k1 + nd, ln, output_size=total
            )
            zsp = F.embedding_bag(
                rows,
                self.p[0].view(-1, self.h0),
                off,
                mode="sum",
                per_sample_weights=self._vals.index_select(0, at),
            )
            z.index_put_((r_ids, pos), zsp, accumulate=True)
        return _Batch(len(idx), xb, yb, coef, spans), z

    def _first_forward_shared(
        self, idx: Tensor, w_t: Tensor, labels: Tensor, scale: Tensor
    ) -> tuple[_Batch, Tensor]:
        """Shared first layer: one wide GEMM over the dense inputs plus, for the rare ones,
        ``sum_j x[i, j] W[j]`` over the non-zero inputs ``j`` of sample ``i`` (embedding_bag).
        Returns the batch and the pre-activations, ``(B, H, m)`` for a one-layer model, else
        ``(m, B, H)`` (later layers work per model)."""
        bsz = len(idx)
        batch = _Batch(bsz, self.xa.index_select(0, idx), labels.index_select(0, idx), w_t * scale)
        nd = self.n_dense
        z = None
        if nd:
            out = self._out((bsz, self.h0 * self.m))
            z = torch.mm(batch.xb[:, :nd], self.p[0][:nd], out=out)
        if self.sparse:
            batch.ln, off, pos, _ = self._nonzeros(idx)
            batch.sp_cols, batch.sp_vals = (
                self._cols.index_select(0, pos),
                self._vals.index_select(0, pos),
            )
            zs_ = F.embedding_bag(
                batch.sp_cols, self.p[0][nd:], off, mode="sum", per_sample_weights=batch.sp_vals
            )
            z = zs_ if z is None else z.add_(zs_)
        z = z.view(bsz, self.h0, self.m)
        return batch, (z if len(self.layers) == 1 else z.permute(2, 0, 1).contiguous())

    def _nonzeros(self, rows: Tensor) -> tuple[Tensor, Tensor, Tensor, int]:
        """The rare inputs' non-zeros of the samples ``rows`` ``(b,)``, in that order:
        ``(count per sample (b,), offset of each sample's first, positions in _cols/_vals,
        total)``."""
        ln = self._nnz.index_select(0, rows)
        off = torch.cumsum(ln, 0) - ln
        total = int(ln.sum())
        at = torch.repeat_interleave(
            self._indptr.index_select(0, rows) - off, ln, output_size=total
        ) + torch.arange(total, device=ln.device)
        return ln, off, at, total

    @staticmethod
    def _rows(zs: list[Tensor], i: int) -> Tensor:
        """Pre-activation of layer ``i`` as ``(m, b, features)``."""
        return zs[i] if i == 0 else zs[i].transpose(1, 2)

    def _forward(self, batch: _Batch, z0: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """Later layers' forward: ``(zs, acts)`` with ``acts[l]`` the input of layer ``l >= 1``
        ``(m, b, in)`` and ``zs[l]`` the pre-activation of layer ``l``: ``zs[0]`` as returned
        by the first layer, ``zs[l >= 1]`` ``(m, out, b)``."""
        zs, acts = [z0], [batch.xb]
        for li in range(1, len(self.layers)):
            prev = self._rows(zs, li - 1)
            a = torch.relu(prev) if self.layers[li - 1][2] else prev
            acts.append(a)
            b = self.p_bias[li]
            zs.append(
                torch.bmm(self.p[li], a.transpose(1, 2))
                if b is None
                else torch.baddbmm(b, self.p[li], a.transpose(1, 2))
            )
        return zs, acts

    def _logit_grads(self, batch: _Batch, logits: Tensor) -> Tensor | None:
        """Turn ``logits`` in place into d(masked mean CE)/d logits; returns None or the bool
        ``(m,)`` of models with non-finite logits. ``logits``: ``(m, C, b)`` (several layers),
        ``(B, C, m)`` (one layer, shared) or ``(m, k, C)`` (one layer, compact)."""
        yb, bsz, coef = batch.yb, batch.bsz, batch.coef
        if len(self.layers) > 1:
            yl = yb.unsqueeze(1) if yb.dim() == 2 else yb.view(1, 1, bsz).expand(self.m, 1, bsz)
            cf = coef.unsqueeze(1) if self.compact else coef.t().unsqueeze(1)
            bad = self._dlogits_(logits, 1, yl, cf)
            return None if bad is None else bad.flatten(1).any(1)
        if not self.compact:
            c = logits.shape[1]
            bad = self._dlogits_(logits, 1, None, coef.unsqueeze(1))
            # rows (b, y_b, :) of the (B * C, m) view are contiguous: one index_add_
            logits.view(bsz * c, self.m).index_add_(
                0, torch.arange(bsz, device=yb.device) * c + yb, coef, alpha=-1.0
            )
            return None if bad is None else bad.flatten(1).any(0)
        bad = self._dlogits_(logits, 2, yb.unsqueeze(-1), coef.unsqueeze(-1))
        return None if bad is None else bad.flatten(1).any(1)

    @staticmethod
    def _dlogits_(logits: Tensor, cdim: int, labels: Tensor | None, coef: Tensor) -> Tensor | None:
        """Turn ``logits`` in place into d(masked mean CE)/d logits = ``coef * (softmax - onehot)``
        along class axis ``cdim``; ``labels`` and ``coef`` have size 1 at ``cdim``. Returns
        None, or the bool mask (shape of ``coef``) of rows whose logits are not all finite."""
        mx = logits.amax(cdim, keepdim=True)
        bad = None
        if not bool(torch.isfinite(mx.sum())):
            # NaN or +inf in a row; rows of finite logits give finite losses
            bad = ~torch.isfinite(mx)
        logits.sub_(mx).exp_()
        logits.mul_(coef / logits.sum(cdim, keepdim=True))
        if labels is not None:  # else the caller subtracts coef at the labels
            logits.scatter_add_(cdim, labels, -coef)
        return bad

    def _backward_hidden(self, zs: list[Tensor], acts: list[Tensor], lr: float) -> Tensor:
        """Backward through layers ``L-1 .. 1`` from the logit gradients ``zs[-1]``, updating
        each layer's weights and biases after its input gradient is taken. Returns the gradient
        of the first layer's pre-activations in the layout of ``zs[0]``."""
        g = zs[-1]
        for li in range(len(self.layers) - 1, 0, -1):  # g: (m, out, b)
            a = acts[li]
            d_prev = torch.bmm(g.transpose(1, 2), self.p[li])  # (m, b, in), before the update
            self._update(li, False, functools.partial(_baddbmm_, g, a), lr)
            if self.p_bias[li] is not None:
                gb = g.sum(2, keepdim=True)
                self._update(li, True, functools.partial(_add_scaled_, gb), lr)
            if self.layers[li - 1][2]:  # ReLU backward: keep where the pre-activation is > 0
                d_prev = relu_backward(d_prev, self._rows(zs, li - 1))
            g = d_prev if li == 1 else d_prev.transpose(1, 2)
        return g

    def _update_first_compact(self, batch: _Batch, g: Tensor, lr: float) -> None:
        """First-layer step per model, so that each model's weights and momentum stay in cache
        between the gradient GEMM and the parameter update; models without members are not
        touched. ``g``: ``(m, k_max, H)``."""
        gs = g.unbind(0)
        for r, xr, k in batch.spans:
            buf = None if self._buf0 is None else self._buf0[r]
            acc = functools.partial(_addmm_, xr.t(), gs[r][:k])
            self._sgd_(self._p0[r], buf, acc, lr)

    def _update_first_shared(self, batch: _Batch, g: Tensor, lr: float) -> None:
        """First-layer step of all models at once: ``W.addmm_(x.T, G)`` over the dense rows,
        an embedding_bag over the rows of ``G`` for the rare ones. ``g``: ``(B, H, m)`` for a
        one-layer model, else ``(m, B, H)``."""
        xb, nd = batch.xb, self.n_dense
        g0 = g if len(self.layers) == 1 else g.permute(1, 2, 0)  # (B, H, m)
        g0 = g0.reshape(batch.bsz, self.h0 * self.m)
        if not self.sparse:
            self._update(0, False, functools.partial(_addmm_, xb.t(), g0), lr)
            return
        u = self._rare_rows_grad(batch, g0)

        def acc(t: Tensor, beta: float, alpha: float) -> None:
            if nd:
                t[:nd].addmm_(xb[:, :nd].t(), g0, beta=beta, alpha=alpha)
            rest = t[nd:]
            if beta != 1.0:
                rest.mul_(beta)
            rest.add_(u, alpha=alpha)

        self._update(0, False, acc, lr)

    def _rare_rows_grad(self, batch: _Batch, g0: Tensor) -> Tensor:
        """Gradient rows of the rare inputs, ``(K_rare, H * m)``: ``sum_i x[i, nd + j] * G[i]``
        over the batch's non-zeros of column ``j``, an embedding_bag over the rows of ``G``
        ``(B, H * m)`` (the forward's non-zeros, sorted by sample, re-sorted by column)."""
        sp_cols, ln = batch.sp_cols, batch.ln
        order = torch.argsort(sp_cols, stable=True)
        r = torch.repeat_interleave(
            torch.arange(batch.bsz, device=ln.device), ln, output_size=len(sp_cols)
        ).index_select(0, order)
        lc = torch.bincount(sp_cols, minlength=batch.xb.shape[1] - self.n_dense)
        return F.embedding_bag(
            r,
            g0,
            torch.cumsum(lc, 0) - lc,
            mode="sum",
            per_sample_weights=batch.sp_vals.index_select(0, order),
        )

    def _slices(self, inactive: Tensor) -> list[tuple[Tensor, Tensor, int]]:
        """(tensor, index, dim) of every state slice owned by the inactive models."""
        out = []
        tensors = [self.p, self.p_bias] + (
            [self.buf, self.buf_bias] if self.buf is not None else []
        )
        for group in tensors:
            for i, t in enumerate(group):
                if t is None:
                    continue
                if i == 0 and not self.compact:  # columns h*m + r
                    idx = (
                        inactive.unsqueeze(0)
                        + self.m * torch.arange(self.h0, device=inactive.device).unsqueeze(1)
                    ).flatten()
                    out.append((t, idx, 1))
                else:
                    out.append((t, inactive, 0))
        return out

    def _update(self, i: int, bias: bool, acc: _Accumulate, lr: float) -> None:
        """SGD step of parameter ``i`` (weight or bias) of the stacked state."""
        buf = None
        if self.buf is not None:
            buf = (self.buf_bias if bias else self.buf)[i]
        self._sgd_((self.p_bias if bias else self.p)[i], buf, acc, lr)

    def _sgd_(self, p: Tensor, buf: Tensor | None, acc: _Accumulate, lr: float) -> None:
        """SGD step of ``p`` with momentum buffer ``buf`` (None without momentum) where
        ``acc(t, beta, alpha)`` sets ``t = beta * t + alpha * grad`` in place (torch.optim.SGD:
        ``g += wd * p``, ``buf = mu * buf + g``, ``p -= lr * buf``)."""
        if buf is None:
            if self.wd != 0.0:
                p.mul_(1.0 - lr * self.wd)
            acc(p, 1.0, -lr)
            return
        if self.wd != 0.0:
            buf.mul_(self.mu).add_(p, alpha=self.wd)
            acc(buf, 1.0, 1.0)
        else:
            acc(buf, self.mu, 1.0)
        p.add_(buf, alpha=-lr)

    def _out(self, shape: tuple[int, ...]) -> Tensor:
        """A reusable output buffer for the wide first-layer GEMM (no page faults per step)."""
        buf = getattr(self, "_mm_buf", None)
        n = math.prod(shape)
        if buf is None or buf.numel() < n:
            buf = self._mm_buf = torch.empty(n, dtype=self.dtype, device=self.xa.device)
        return buf[:n].view(shape)


def _baddbmm_(g: Tensor, a: Tensor, t: Tensor, beta: float, alpha: float) -> None:
    """``t = beta * t + alpha * g @ a`` in place (stacked weight gradients ``(m, out, in)``)."""
    t.baddbmm_(g, a, beta=beta, alpha=alpha)


def _addmm_(x_t: Tensor, g: Tensor, t: Tensor, beta: float, alpha: float) -> None:
    """``t = beta * t + alpha * x_t @ g`` in place (a weight gradient accumulated by a GEMM)."""
    t.addmm_(x_t, g, beta=beta, alpha=alpha)


def _add_scaled_(g: Tensor, t: Tensor, beta: float, alpha: float) -> None:
    """``t = beta * t + alpha * g`` in place (a bias gradient)."""
    if beta != 1.0:
        t.mul_(beta).add_(g, alpha=alpha)
    else:
        t.add_(g, alpha=alpha)
