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

import itertools
import math
from collections.abc import Mapping
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
    """``(layers, reason)``: the Linear layers (module name, layer, ReLU after it) when the fast
    path applies, else ``(None, why not)``."""
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
        freq = (x != 0).to(x.dtype).mean(0)  # fraction of samples where each input is non-zero
        if self.wd == 0.0:
            kept = (freq > 0).nonzero().flatten()
        else:
            kept = torch.arange(x.shape[1], device=x.device)
        # shared mode on the CPU: rarely non-zero inputs (e.g. MNIST's outer pixels) go through a
        # weighted embedding_bag over each sample's non-zeros (rows of W), the others through a GEMM
        hybrid = x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64)
        if hybrid:
            rare = freq.index_select(0, kept) <= _SPARSE_MAX_DENSITY
            kept = torch.cat([kept[~rare], kept[rare]])
        self.kept = kept  # input column of each weight row after the bias row
        self.init_params = params  # untouched; the dropped columns are read from here
        self.bias0 = lin0.bias is not None
        b0 = int(self.bias0)
        cols = [x.index_select(1, kept)]
        if self.bias0:
            cols.insert(0, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device))
        self.xa = torch.cat(
            cols, 1
        ).contiguous()  # (n, [1 +] K): [bias input,] dense inputs, rare inputs
        self.n_dense = b0 + (int((~rare).sum()) if hybrid else len(kept))
        rest = self.xa[:, self.n_dense :]
        nnz = (rest != 0).sum(1)
        self.sparse = bool(nnz.sum() > 0)
        if self.sparse:
            r, c = rest.nonzero(as_tuple=True)
            self._nnz = nnz
            self._indptr = torch.cumsum(nnz, 0) - nnz
            self._cols = c  # row of W[n_dense:]
            self._vals = rest[r, c]
        w0 = params[_pname(name0, "weight")].index_select(2, kept)  # (m, H, K)
        parts = [w0.transpose(1, 2)]  # (m, K, H)
        if self.bias0:
            parts.insert(0, params[_pname(name0, "bias")].unsqueeze(1))  # (m, 1, H)
        w0 = torch.cat(parts, 1)  # (m, [1 +] K, H)
        self.h0 = int(w0.shape[2])
        if not self.compact:
            w0 = w0.permute(1, 2, 0).reshape(w0.shape[1], self.h0 * self.m)  # (K [+1], H * m)
        self.p: list[Tensor] = [w0.contiguous().clone()]
        self.p_bias: list[Tensor | None] = [None]
        for name, lin, _ in layers[1:]:
            self.p.append(params[_pname(name, "weight")].contiguous().clone())  # (m, out, in)
            self.p_bias.append(
                params[_pname(name, "bias")].unsqueeze(2).clone() if lin.bias is not None else None
            )
        self.buf = [torch.zeros_like(t) for t in self.p] if self.mu != 0.0 else None
        self.buf_bias = (
            [None if b is None else torch.zeros_like(b) for b in self.p_bias]
            if self.mu != 0.0
            else None
        )
        if (
            self.compact
        ):  # per-model views of the first layer (updated in place, so they stay valid)
            self._p0 = self.p[0].unbind(0)
            self._buf0 = self.buf[0].unbind(0) if self.buf is not None else None

    # ------------------------------------------------------------------ state
    def state(self) -> dict[str, Tensor]:
        """Stacked parameters ``{name: (m, ...)}`` in ``nn.Linear`` layout (copies)."""
        out: dict[str, Tensor] = {}
        name0, _, _ = self.layers[0]
        w0 = self.p[0]
        if not self.compact:
            w0 = w0.view(w0.shape[0], self.h0, self.m).permute(2, 0, 1)  # (m, K [+1], H)
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
        """bool ``(m,)``: all parameters of the model are finite."""
        ok = torch.ones(self.m, dtype=torch.bool, device=self.xa.device)
        w0 = self.p[0]
        if not self.compact:
            w0 = w0.view(w0.shape[0], self.h0, self.m).permute(2, 0, 1)
        for t in [w0, *self.p[1:], *(b for b in self.p_bias if b is not None)]:
            ok &= torch.isfinite(t.reshape(self.m, -1)).all(1)
        return ok

    # ------------------------------------------------------------------ step
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

    def _update(self, i: int, bias: bool, acc: Any, lr: float) -> None:
        """SGD step of parameter ``i`` (weight or bias) where ``acc(t, beta, alpha)`` sets
        ``t = beta * t + alpha * grad`` in place (torch.optim.SGD: ``g += wd * p``,
        ``buf = mu * buf + g``, ``p -= lr * buf``)."""
        p = (self.p_bias if bias else self.p)[i]
        if self.mu == 0.0:
            if self.wd != 0.0:
                p.mul_(1.0 - lr * self.wd)
            acc(p, 1.0, -lr)
            return
        buf = (self.buf_bias if bias else self.buf)[i]
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

    @staticmethod
    def _dlogits_(logits: Tensor, cdim: int, labels: Tensor | None, coef: Tensor) -> Tensor | None:
        """Turn ``logits`` in place into d(masked mean CE)/d logits = ``coef * (softmax - onehot)``
        along class axis ``cdim``; ``labels`` and ``coef`` have size 1 at ``cdim``. Returns
        None, or the bool mask (shape of ``coef``) of rows whose logits are not all finite."""
        mx = logits.amax(cdim, keepdim=True)
        bad = None
        if not bool(torch.isfinite(mx.sum())):
            bad = ~torch.isfinite(
                mx
            )  # NaN or +inf in a row; rows of finite logits give finite losses
        logits.sub_(mx).exp_()
        logits.mul_(coef / logits.sum(cdim, keepdim=True))
        if labels is not None:  # else the caller subtracts coef at the labels
            logits.scatter_add_(cdim, labels, -coef)
        return bad

    def step(self, idx: Tensor, w_t: Tensor, labels: Tensor, lr: float) -> Tensor | None:
        """One SGD step on stream batch ``idx`` (device indices, ``B``). ``w_t`` (``(B, m)``,
        float 0/1) says which samples belong to which model. Returns None, or a bool ``(m,)`` of
        models whose logits were not finite on this batch."""
        counts = w_t.sum(0)  # (m,) exact small integers
        active = counts > 0
        if not bool(active.any()):  # every model skips this step
            return None
        inactive = None if bool(active.all()) else (~active).nonzero().flatten()
        scale = 1.0 / counts.clamp(min=1.0)
        n_layers = len(self.layers)
        bsz = len(idx)
        if self.compact:
            # each model's members (stream order) concatenated: one gather, then one GEMM per
            # model (a loop of mm beats a bmm padded to the largest member count); later layers
            # work on (m, k_max, .) tensors padded with zero rows of zero weight
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
                (r, xr, k)
                for r, (xr, k) in enumerate(zip(xb.split(k_list), k_list, strict=True))
                if k
            ]
            zr = z.unbind(0)
            p0 = self._p0
            nd = self.n_dense
            if nd:
                for r, xr, k in spans:
                    torch.mm(xr[:, :nd], p0[r][:nd], out=zr[r][:k])
            if self.sparse:  # rare inputs: one embedding_bag over the rows of all models' weights
                ln = self._nnz.index_select(0, sel)
                off = torch.cumsum(ln, 0) - ln
                total = int(ln.sum())
                at = torch.repeat_interleave(
                    self._indptr.index_select(0, sel) - off, ln, output_size=total
                ) + torch.arange(total, device=ln.device)
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
            zs = [z]  # (m, k_max, H)
        else:
            coef = w_t * scale  # (B, m)
            xb = self.xa.index_select(0, idx)  # (B, K+1)
            yb = labels.index_select(0, idx)
            nd = self.n_dense
            z = None
            if nd:
                z = torch.mm(xb[:, :nd], self.p[0][:nd], out=self._out((bsz, self.h0 * self.m)))
            if self.sparse:  # + sum_j x[i, j] W[j] over the non-zero rare inputs j of sample i
                ln = self._nnz.index_select(0, idx)
                off = torch.cumsum(ln, 0) - ln
                total = int(ln.sum())
                pos = torch.repeat_interleave(
                    self._indptr.index_select(0, idx) - off, ln, output_size=total
                ) + torch.arange(total, device=ln.device)
                sp_cols, sp_vals = self._cols.index_select(0, pos), self._vals.index_select(0, pos)
                zs_ = F.embedding_bag(
                    sp_cols, self.p[0][nd:], off, mode="sum", per_sample_weights=sp_vals
                )
                z = zs_ if z is None else z.add_(zs_)
            z = z.view(bsz, self.h0, self.m)
            # (B, H, m); later layers work per model on (m, B, H)
            zs = [z if n_layers == 1 else z.permute(2, 0, 1).contiguous()]

        # forward; acts[l] = input of layer l (l >= 1) as (m, b, in), zs[l] = pre-activation of
        # layer l: zs[0] (m, b, H) (compact / multi-layer) or (B, C, m); zs[l >= 1] (m, out, b)
        def rows(i: int) -> Tensor:
            return zs[i] if i == 0 else zs[i].transpose(1, 2)  # (m, b, features)

        acts: list[Tensor] = [xb]
        for li in range(1, n_layers):
            a = torch.relu(rows(li - 1)) if self.layers[li - 1][2] else rows(li - 1)
            acts.append(a)
            b = self.p_bias[li]
            zs.append(
                torch.bmm(self.p[li], a.transpose(1, 2))
                if b is None
                else torch.baddbmm(b, self.p[li], a.transpose(1, 2))
            )
        if n_layers > 1:  # (m, C, b)
            yl = yb.unsqueeze(1) if yb.dim() == 2 else yb.view(1, 1, bsz).expand(self.m, 1, bsz)
            cf = coef.unsqueeze(1) if self.compact else coef.t().unsqueeze(1)
            bad = self._dlogits_(zs[-1], 1, yl, cf)
            if bad is not None:
                bad = bad.flatten(1).any(1)
        elif not self.compact:  # (B, C, m)
            c = zs[-1].shape[1]
            bad = self._dlogits_(zs[-1], 1, None, coef.unsqueeze(1))
            # rows (b, y_b, :) of the (B * C, m) view are contiguous: one index_add_
            zs[-1].view(bsz * c, self.m).index_add_(
                0, torch.arange(bsz, device=yb.device) * c + yb, coef, alpha=-1.0
            )
            if bad is not None:
                bad = bad.flatten(1).any(0)
        else:  # (m, k, C)
            bad = self._dlogits_(zs[-1], 2, yb.unsqueeze(-1), coef.unsqueeze(-1))
            if bad is not None:
                bad = bad.flatten(1).any(1)
        g = zs[-1]
        saved = None
        if inactive is not None and (self.mu != 0.0 or self.wd != 0.0):
            saved = [(t, ix, d, t.index_select(d, ix)) for t, ix, d in self._slices(inactive)]
        for li in range(n_layers - 1, 0, -1):  # g: (m, out, b)
            a = acts[li]
            d_prev = torch.bmm(g.transpose(1, 2), self.p[li])  # (m, b, in), before the update
            # (the update callbacks run inside _update, bound to this iteration's tensors)
            self._update(
                li,
                False,
                lambda t, beta, alpha, g=g, a=a: t.baddbmm_(g, a, beta=beta, alpha=alpha),
                lr,
            )
            if self.p_bias[li] is not None:
                gb = g.sum(2, keepdim=True)
                self._update(
                    li,
                    True,
                    lambda t, beta, alpha, gb=gb: (
                        t.mul_(beta).add_(gb, alpha=alpha)
                        if beta != 1.0
                        else t.add_(gb, alpha=alpha)
                    ),
                    lr,
                )
            if self.layers[li - 1][2]:  # ReLU backward: keep where the pre-activation is > 0
                d_prev = relu_backward(d_prev, rows(li - 1))
            g = d_prev if li == 1 else d_prev.transpose(1, 2)
        if self.compact:
            # per model, so that each model's weights and momentum stay in cache between the
            # gradient GEMM and the parameter update; models without members are not touched
            p0, buf0, gs = self._p0, self._buf0, g.unbind(0)
            for r, xr, k in spans:
                pr = p0[r]
                xr, gr = xr.t(), gs[r][:k]
                if buf0 is None:
                    if self.wd != 0.0:
                        pr.mul_(1.0 - lr * self.wd)
                    pr.addmm_(xr, gr, alpha=-lr)
                    continue
                br = buf0[r]
                if self.wd != 0.0:
                    br.mul_(self.mu).add_(pr, alpha=self.wd)
                    br.addmm_(xr, gr)
                else:
                    br.addmm_(xr, gr, beta=self.mu)
                pr.add_(br, alpha=-lr)
        else:
            g0 = g if n_layers == 1 else g.permute(1, 2, 0)  # (B, H, m)
            g0 = g0.reshape(bsz, self.h0 * self.m)
            nd = self.n_dense
            if not self.sparse:
                self._update(
                    0,
                    False,
                    lambda t, beta, alpha: t.addmm_(xb.t(), g0, beta=beta, alpha=alpha),
                    lr,
                )
            else:
                # rows of rare inputs: W[nd + j] += sum_i x[i, nd + j] * G[i] over the batch's
                # non-zeros of column j, an embedding_bag over the rows of G
                # the forward's non-zeros (sorted by sample), re-sorted by column
                order = torch.argsort(sp_cols, stable=True)
                r = torch.repeat_interleave(
                    torch.arange(bsz, device=ln.device), ln, output_size=len(sp_cols)
                ).index_select(0, order)
                lc = torch.bincount(sp_cols, minlength=xb.shape[1] - nd)
                u = F.embedding_bag(
                    r,
                    g0,
                    torch.cumsum(lc, 0) - lc,
                    mode="sum",
                    per_sample_weights=sp_vals.index_select(0, order),
                )

                def acc(t: Tensor, beta: float, alpha: float) -> None:
                    if nd:
                        t[:nd].addmm_(xb[:, :nd].t(), g0, beta=beta, alpha=alpha)
                    rest = t[nd:]
                    if beta != 1.0:
                        rest.mul_(beta)
                    rest.add_(u, alpha=alpha)

                self._update(0, False, acc, lr)
        if saved is not None:
            for t, ix, d, old in saved:
                t.index_copy_(d, ix, old)
        return bad
