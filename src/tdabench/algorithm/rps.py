"""Representer point selection (Yeh et al., 2018).

The final ``nn.Linear`` layer is re-fitted on the fixed features ``f_i`` (its inputs) with an
L2 penalty, and at that stationary point the representer theorem writes every refitted
pre-activation as a sum over the training set::

    f_t W*^T = sum_i alpha_i <f_i, f_t>,   alpha_i = -1 / (2 l2_strength) * dL/dz_i

(``L`` the refit's data loss, ``z_i = f_i W*^T``). The score of training sample ``i`` for test
sample ``j`` is its contribution to the pre-activation of the class explained for the test
sample, ``score[i, j] = alpha_i[c_j] <f_i, f_j>``: positive = helpful (it raises that class).

Two refits, chosen by ``refit_loss``:

* ``"labels"`` (tdabench's): ``L = (1/n) sum_i CE(z_i, y_i)`` against the true labels
  ``y_i = data[1]``; the task's functions are not used. ``dCE/dz = softmax(z) - onehot(y)``,
  so ``alpha_i[y_i] >= 0``. If the layer has a bias, a constant 1 is appended to every feature
  and the bias is fitted (and L2-regularised) as the last column of ``W``; with
  ``normalize_preactivate=True`` the features are scaled to unit norm before that, and before
  the refit. ``c_j`` is the test label.
* ``"outputs"`` (dattri's): the task's target function (``target_func``, else ``loss_func``)
  is an output loss ``f(pre_activations (n, C), targets (n, C))``, the targets are the
  model's own predictions ``softmax(layer output)`` (``sigmoid`` for a single-logit layer), and
  ``W`` is the weight only (``z = f W^T``, no bias), as dattri's ``rps_finetune_theta``.
  ``f`` must be a mean (or a sum) over rows: ``dL/dz_i`` is ``f``'s gradient on row ``i``
  alone, divided by ``n`` for a mean (detected on the cached rows; anything else raises).
  ``c_j`` is the test label with several classes; with one logit every test sample's score
  uses ``alpha_i[0]``. ``normalize_preactivate=True`` normalises the features in the inner
  products only, as dattri does. Differences from dattri 0.3.0: the refit is solved exactly
  (below) where dattri runs gradient descent with a backtracking line search; and dattri
  divides the gradient of ``f`` over the *scored* rows by ``2 l2_strength n_scored`` again,
  which scales all its scores by ``n_cached / n_scored**2`` (a mean loss) relative to the
  theorem's; ours satisfy the decomposition above exactly (tested).
* ``"auto"`` (default): ``"outputs"`` when the task's target function returns a scalar when
  called as ``f(layer outputs, predicted probabilities)`` on the first batch, ``"labels"``
  otherwise (a ``f(params, data)`` function fails there: ``params`` must be a dict).

Fitting: L-BFGS (strong-Wolfe line search) in float64 on the full batch, started from the
checkpoint's layer, for at most ``epoch`` iterations; it stops earlier once the largest
gradient entry is below ``1e-10``. Up to 5 Newton-CG steps (exact Hessian-vector products)
then polish the solution to rounding level. The objective is strictly convex (for a convex
``f``), so this reaches the unique optimum; the final gradient norm is kept in
``stationarity`` (and logged as a warning when it is not small).

Without :meth:`~RPSAttributor.cache`, ``attribute``/``self_attribute`` refit on the training
loader they are given, for that call only (dattri's behaviour; logged as a warning).
Batches must be ``(inputs, labels, ...)``: the model is called as ``model(inputs)``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tdabench.algorithm.arguments import RPSArguments
from tdabench.algorithm.base import BaseAttributor, arguments_from
from tdabench.errors import ConfigError, DataError, ShapeError
from tdabench.func.solvers import conjugate_gradient
from tdabench.func.utils import Batch, check_finite
from tdabench.task import AttributionTask

__all__ = ["RPSAttributor"]

logger = logging.getLogger(__name__)

_GRAD_TOL = 1e-10
_REFIT_LOSSES = ("auto", "labels", "outputs")


def _soft_targets(out: Tensor) -> Tensor:
    """dattri's refit targets: ``sigmoid`` of a single logit ``(n, 1)``, else ``softmax``."""
    return torch.sigmoid(out) if out.shape[1] == 1 else torch.softmax(out, dim=1)


def _scalar_or_none(func: Callable[[], Any]) -> Tensor | None:
    try:
        with torch.no_grad():
            value = func()
    except Exception:  # any failure means "not this convention"
        return None
    if isinstance(value, Tensor) and value.numel() == 1 and value.is_floating_point():
        return value.reshape(())
    return None


class _LabelRefit:
    """``(1/n) sum CE(f_i W^T, y_i) + lam ||W||^2`` with closed-form gradient and HVP."""

    def __init__(self, feat: Tensor, labels: Tensor, lam: float) -> None:
        self.feat, self.labels, self.lam = feat, labels, lam

    def loss_and_gradient(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The objective and its gradient ``(C, m)`` (no autograd graph)."""
        feat, labels = self.feat, self.labels
        with torch.no_grad():
            rows = torch.arange(labels.shape[0], device=labels.device)
            logp = torch.log_softmax(feat @ w.T, dim=1)
            loss = -logp[rows, labels].mean() + self.lam * (w * w).sum()
            resid = logp.exp_()
            resid[rows, labels] -= 1.0
            return loss, resid.T @ feat / feat.shape[0] + 2.0 * self.lam * w

    def hvp_at(self, w: Tensor) -> Callable[[Tensor], Tensor]:
        """``v (k, C*m) -> H v`` at ``w``."""
        feat, (n, (c, m)) = self.feat, (self.feat.shape[0], w.shape)
        probs = torch.softmax(feat @ w.T, dim=1)

        def hvp(v: Tensor) -> Tensor:
            vs = v.reshape(-1, c, m)
            z = torch.einsum("nm,kcm->knc", feat, vs)
            j = probs * z - probs * (probs * z).sum(-1, keepdim=True)
            return (torch.einsum("knc,nm->kcm", j, feat) / n + 2.0 * self.lam * vs).reshape(
                v.shape[0], -1
            )

        return hvp


class _OutputRefit:
    """``f(x W^T, T) + lam ||W||^2`` for the user's output loss ``f`` (autograd)."""

    def __init__(self, func: Callable[..., Tensor], x: Tensor, targets: Tensor, lam: float) -> None:
        self.func, self.x, self.targets, self.lam = func, x, targets, lam

    def objective(self, w: Tensor) -> Tensor:
        return self.func(self.x @ w.T, self.targets) + self.lam * (w * w).sum()

    def loss_and_gradient(self, w: Tensor) -> tuple[Tensor, Tensor]:
        """The objective and its gradient ``(C, m)`` (no autograd graph)."""
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            value = self.objective(w)
            (grad,) = torch.autograd.grad(value, w)
        return value.detach(), grad

    def hvp_at(self, w: Tensor) -> Callable[[Tensor], Tensor]:
        """``v (k, C*m) -> H v`` at ``w`` (double backward through one kept gradient graph)."""
        with torch.enable_grad():
            w = w.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self.objective(w), w, create_graph=True)

        def hvp(v: Tensor) -> Tensor:
            rows = [
                torch.autograd.grad(grad, w, row.reshape(w.shape), retain_graph=True)[0]
                for row in v
            ]
            return torch.stack(rows).reshape(v.shape[0], -1)

        return hvp

    def row_gradients(self, z: Tensor, targets: Tensor) -> Tensor:
        """``df(z_i, T_i)/dz_i`` of each row alone, ``(n, C)``."""

        def row(zi: Tensor, ti: Tensor) -> Tensor:
            return self.func(zi.unsqueeze(0), ti.unsqueeze(0))

        try:
            return torch.func.vmap(torch.func.grad(row))(z, targets)
        except Exception:  # a loss vmap cannot trace: one row at a time
            return torch.stack(
                [torch.func.grad(row)(zi, ti) for zi, ti in zip(z, targets, strict=True)]
            )

    def row_scale(self, w: Tensor) -> float:
        """``dL/dz_i = scale * df(z_i alone)/dz_i``: ``1/n`` for a mean over rows, 1 for a sum."""
        z, n = self.x @ w.T, self.x.shape[0]
        whole = self.func(z, self.targets).detach()
        rows = torch.stack([self.func(z[i : i + 1], self.targets[i : i + 1]) for i in range(n)])
        for scale in (1.0 / n, 1.0):
            if torch.allclose(whole, scale * rows.sum(), rtol=1e-9, atol=1e-12):
                return scale
        raise ConfigError(
            f"the RPS output loss gives {float(whole):.6g} on the cached rows but its rows average "
            f"{float(rows.mean()):.6g} and sum to {float(rows.sum()):.6g}; the representer values need "
            "a mean (or a sum) over rows: use reduction='mean' or 'sum'"
        )


class RPSAttributor(BaseAttributor):
    """Representer points of the final linear layer.

    Args:
        task: the task (its target function is the refit's output loss with
            ``refit_loss="outputs"``; unused with ``"labels"``).
        final_linear_layer_name: module name of the final ``nn.Linear`` (e.g. ``"fc3"``).
        normalize_preactivate: L2-normalise the features (see the module docstring).
        l2_strength: ``> 0``, the L2 weight of the refit.
        epoch: maximum number of L-BFGS iterations of the refit.
        device: where features, the refit and scores live (scores are returned there).
        checkpoint_index: which checkpoint provides the features and the initial layer
            (default ``-1``: the last one).
        memory_budget: bytes (or ``"8GiB"``, or a fraction of the device) the method may hold.
        refit_loss: ``"auto"``, ``"labels"`` or ``"outputs"`` (see the module docstring).
    """

    requires_cache = True

    # Spelled out: dattri's constructor signature, then tdabench's keyword extensions.
    def __init__(
        self,
        task: AttributionTask,
        final_linear_layer_name: str,
        normalize_preactivate: bool = False,
        l2_strength: float = 0.003,
        epoch: int = 3000,
        device: str | torch.device = "cpu",
        checkpoint_index: int = -1,
        memory_budget: int | float | str | None = None,
        refit_loss: str = "auto",
    ) -> None:
        super().__init__(task, None, device, memory_budget)
        linears = [n for n, m in task.model.named_modules() if isinstance(m, nn.Linear)]
        if not isinstance(final_linear_layer_name, str) or final_linear_layer_name not in linears:
            raise ConfigError(
                f"final_linear_layer_name {final_linear_layer_name!r} is not an nn.Linear module of the "
                f"model; its nn.Linear modules are {linears}"
            )
        if refit_loss not in _REFIT_LOSSES:
            raise ConfigError(f"refit_loss must be one of {_REFIT_LOSSES}, got {refit_loss!r}")
        self.arguments = arguments_from(RPSArguments, locals())
        n_ckpt = task.num_checkpoints
        if not -n_ckpt <= checkpoint_index < n_ckpt:
            raise ConfigError(
                f"checkpoint_index must be an integer in [{-n_ckpt}, {n_ckpt - 1}], got {checkpoint_index!r}"
            )
        self.final_linear_layer_name = final_linear_layer_name
        self.normalize_preactivate = self.arguments.normalize_preactivate
        self.l2_strength = self.arguments.l2_strength
        self.epoch = self.arguments.epoch
        self.checkpoint_index = checkpoint_index % n_ckpt
        self.refit_loss = refit_loss
        #: the refit in use, ``"labels"`` or ``"outputs"`` (``None`` until ``"auto"`` decides)
        self.convention: str | None = None if refit_loss == "auto" else refit_loss
        self.weight: Tensor | None = None  # (C, m [+1]) fitted layer, float64
        self.num_cached_train = 0
        self.row_scale = 1.0  # "outputs": dL/dz_i per row-alone gradient
        self.stationarity = float("nan")
        self.iterations = 0

    # ------------------------------------------------------------------ features
    def _layer(self) -> nn.Linear:
        self.task.get_params(self.checkpoint_index)  # loads the checkpoint into task.model
        return self.task.model.get_submodule(self.final_linear_layer_name)

    def _batch_io(self, batch: Batch) -> tuple[Tensor, Tensor]:
        """Input ``(B, m)`` and output ``(B, C)`` of the final layer on ``batch`` (detached; the
        caller sets eval mode)."""
        params = {
            n: t.to(self.device) for n, t in self.task.get_params(self.checkpoint_index).items()
        }
        buffers = {n: b.detach().to(self.device) for n, b in self.task.model.named_buffers()}
        captured: list[tuple[Tensor, Tensor]] = []

        def hook(module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
            captured.append((inputs[0].detach(), output.detach()))

        handle = self._layer().register_forward_hook(hook)
        try:
            with torch.no_grad():
                functional_call(self.task.model, {**buffers, **params}, (batch[0],))
        except Exception as exc:
            raise DataError(
                f"the model fails on a batch's inputs ({type(exc).__name__}: {exc}); RPS needs batches "
                "(inputs, labels, ...) with the model's input shape and dtype"
            ) from exc
        finally:
            handle.remove()
        if len(captured) != 1:
            raise ConfigError(
                f"layer {self.final_linear_layer_name!r} ran {len(captured)} times in one forward pass; "
                "pass the final linear layer, called once per forward"
            )
        return captured[0]

    def _check_first_batch(self, batch: Batch, what: str) -> None:
        """Decide ``"auto"`` on the first batch (RPS never calls the task's functions on
        ``(params, data)``; a batch the model cannot take fails in :meth:`_batch_io`)."""
        if self.convention is None:
            self.convention = self._decide(batch)
            logger.info("RPSAttributor: refit_loss='auto' resolved to %r", self.convention)

    def _decide(self, batch: Batch) -> str:
        def probe() -> Tensor:
            _, out = self._batch_io(batch)
            out = out.to(torch.float64)
            return self.task.original_target_func(out, _soft_targets(out))

        return "outputs" if _scalar_or_none(probe) is not None else "labels"

    def _layer_io(self, loader: Iterable[Batch], what: str) -> tuple[Tensor, Tensor, Tensor]:
        """Inputs ``(n, m)`` and outputs ``(n, C)`` of the final layer (float64) and the batches'
        ``data[1]`` ``(n,)`` over ``loader``."""
        was_training = self.task.model.training
        self.task.model.eval()  # no dropout noise in the features (nor in the first-batch checks)
        try:
            return self._read_io(loader, what)
        finally:
            self.task.model.train(was_training)

    def _read_io(self, loader: Iterable[Batch], what: str) -> tuple[Tensor, Tensor, Tensor]:
        feats: list[Tensor] = []
        outs: list[Tensor] = []
        labels: list[Tensor] = []
        for batch in self._batches(loader, what):
            if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                raise DataError(
                    f"RPS needs batches of (inputs, labels); the {what} yields {type(batch).__name__}"
                )
            f, out = self._batch_io(batch)
            y = batch[1]
            if (
                f.dim() != 2
                or y.dim() != 1
                or y.shape[0] != f.shape[0]
                or (y.is_floating_point() and self.convention == "labels")
            ):
                raise ShapeError(
                    f"RPS needs features (B, m) and integer labels (B,), got features {tuple(f.shape)} and "
                    f"labels {tuple(y.shape)} {y.dtype}; use a classification model whose final layer sees 2-D inputs"
                )
            feats.append(f.to(torch.float64))
            outs.append(out.to(torch.float64))
            labels.append(y.to(self.device))
        return torch.cat(feats), torch.cat(outs), torch.cat(labels).long()

    def _label_features(self, feat: Tensor) -> Tensor:
        """``"labels"``: the layer inputs ``(n, m)`` normalised and bias-augmented ``(n, m [+1])``."""
        if self.normalize_preactivate:
            feat = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if self._layer().bias is not None:
            feat = torch.cat(
                [feat, torch.ones(feat.shape[0], 1, dtype=feat.dtype, device=feat.device)], dim=1
            )
        return check_finite(feat, "RPS features")

    def _initial_weight(self) -> Tensor:
        layer = self._layer()
        w = layer.weight.detach().to(self.device, torch.float64)
        if layer.bias is not None and self.convention == "labels":
            w = torch.cat(
                [w, layer.bias.detach().to(self.device, torch.float64).unsqueeze(1)], dim=1
            )
        return w

    # ------------------------------------------------------------------ refit
    def _fit(self, problem: _LabelRefit | _OutputRefit, w0: Tensor) -> Tensor:
        """L-BFGS from ``w0`` then a Newton-CG polish; sets ``iterations`` and ``stationarity``."""
        w = w0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS(
            [w],
            lr=1.0,
            max_iter=self.epoch,
            tolerance_grad=_GRAD_TOL,
            tolerance_change=1e-300,
            history_size=50,
            line_search_fn="strong_wolfe",
        )

        def closure() -> Tensor:
            loss, w.grad = problem.loss_and_gradient(w)
            return loss

        opt.step(closure)
        self.iterations = int(opt.state[w].get("n_iter", 0))
        w = self._newton_polish(problem, w.detach())
        self.stationarity = float(problem.loss_and_gradient(w)[1].abs().max())
        if self.stationarity > 1e-6:
            logger.warning(
                "RPS refit stopped after %d L-BFGS iterations with max |gradient| %.3g; the representer "
                "decomposition is approximate. Raise epoch or l2_strength.",
                self.iterations,
                self.stationarity,
            )
        return check_finite(w, "RPS fitted weights", "raise l2_strength")

    @staticmethod
    def _newton_polish(problem: _LabelRefit | _OutputRefit, w: Tensor, steps: int = 5) -> Tensor:
        """A few Newton-CG steps from the L-BFGS solution (float64 line-search methods stall
        near ``|grad| ~ 1e-9``; Newton's quadratic convergence reaches rounding level)."""
        grad = problem.loss_and_gradient(w)[1]
        for _ in range(steps):
            gmax = float(grad.abs().max())
            if gmax <= 1e-15:
                break
            step = conjugate_gradient(
                problem.hvp_at(w), -grad.reshape(1, -1), max_iter=min(w.numel(), 500), tol=1e-13
            )
            candidate = w + step.reshape(w.shape)
            cand_grad = problem.loss_and_gradient(candidate)[1]
            if not float(cand_grad.abs().max()) < gmax:
                break
            w, grad = candidate, cand_grad
        return w

    def _output_refit(self, x: Tensor, out: Tensor) -> _OutputRefit:
        return _OutputRefit(self.task.original_target_func, x, _soft_targets(out), self.l2_strength)

    # ------------------------------------------------------------------ API
    def cache(self, full_train_loader: Iterable[Batch]) -> None:
        """Extract the training features and refit the final layer (L-BFGS, float64).

        Args:
            full_train_loader: the training set the layer is refitted on.

        Raises:
            DataError: labels out of the model's classes (``"labels"``).
            ConfigError: an output loss that is neither a mean nor a sum over rows (``"outputs"``).
        """
        x, out, labels = self._layer_io(full_train_loader, "full train loader")
        if self.convention == "outputs":
            problem: _LabelRefit | _OutputRefit = self._output_refit(x, out)
        else:
            n_classes = self._layer().weight.shape[0]
            if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
                raise DataError(
                    f"labels must be class indices in [0, {n_classes - 1}], got range "
                    f"[{int(labels.min())}, {int(labels.max())}]"
                )
            problem = _LabelRefit(self._label_features(x), labels, self.l2_strength)
        self.weight = self._fit(problem, self._initial_weight())
        if isinstance(problem, _OutputRefit):
            self.row_scale = problem.row_scale(self.weight)
        self.num_cached_train = int(x.shape[0])
        self._cached = True

    @contextlib.contextmanager
    def _fitted(self, train_loader: Iterable[Batch]) -> Iterator[None]:
        """dattri's behaviour without :meth:`cache`: refit on ``train_loader`` for this call only."""
        if self._cached:
            yield
            return
        logger.warning(
            "RPSAttributor: attribute/self_attribute called before cache(); refitting the final layer "
            "on the train loader for this call (as dattri does). Call cache(full_train_loader) to fit "
            "it once on the full training set."
        )
        self.cache(train_loader)
        try:
            yield
        finally:
            self._cached, self.weight, self.num_cached_train = False, None, 0

    def alpha(self, feat: Tensor, labels: Tensor) -> Tensor:
        """``"labels"``: representer values ``alpha`` ``(n, C)`` of samples with (augmented)
        features ``feat`` ``(n, m [+1])`` and labels ``(n,)``."""
        self._require_cache()
        assert self.weight is not None
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.weight.shape[0]):
            raise DataError(f"labels must be class indices in [0, {self.weight.shape[0] - 1}]")
        probs = torch.softmax(feat @ self.weight.T, dim=1)
        probs[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
        return probs.mul_(-1.0 / (2.0 * self.l2_strength * self.num_cached_train))

    def _output_alpha(self, x: Tensor, out: Tensor) -> Tensor:
        """``"outputs"``: representer values ``(n, C)``: ``-(row_scale / (2 l2_strength))`` times
        the output loss's gradient on each row alone at the refitted pre-activations."""
        assert self.weight is not None
        problem = self._output_refit(x, out)
        grads = problem.row_gradients(x @ self.weight.T, problem.targets)
        return grads * (-self.row_scale / (2.0 * self.l2_strength))

    def _inner(self, x: Tensor, labels: Tensor, what: str) -> tuple[Tensor, Tensor]:
        """Features of the inner products ``(n, m')`` and the explained class of each row ``(n,)``."""
        assert self.weight is not None
        n_classes = self.weight.shape[0]
        if self.convention == "outputs":
            feat = nn.functional.normalize(x, dim=1) if self.normalize_preactivate else x
            if n_classes == 1:  # dattri: one logit explains every test sample
                labels = torch.zeros_like(labels)
        else:
            feat = self._label_features(x)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= n_classes):
            raise DataError(
                f"the {what}'s labels must be class indices in [0, {n_classes - 1}] (the class whose "
                "pre-activation is explained)"
            )
        return feat, labels

    def _train_side(self, loader: Iterable[Batch]) -> tuple[Tensor, Tensor, Tensor]:
        """Representer values ``(n, C)``, inner-product features ``(n, m')`` and classes ``(n,)``."""
        x, out, labels = self._layer_io(loader, "train loader")
        feat, cls = self._inner(x, labels, "train loader")
        if self.convention == "outputs":
            return self._output_alpha(x, out), feat, cls
        return self.alpha(feat, labels), feat, cls

    def attribute(self, train_loader: Iterable[Batch], test_loader: Iterable[Batch]) -> Tensor:
        """Representer scores ``alpha_i[c_j] <f_i, f_j>``.

        Args:
            train_loader: training samples ``(inputs, labels)`` (any subset of the cached set).
            test_loader: test samples ``(inputs, labels)``; ``labels`` choose the class explained
                (unused with one logit and ``refit_loss="outputs"``).

        Returns:
            Tensor ``(n_train, n_test)`` on ``device``, in the model's dtype.
        """
        with self._fitted(train_loader):
            a, f_tr, _ = self._train_side(train_loader)
            x_te, _, y_te = self._layer_io(test_loader, "test loader")
            f_te, c_te = self._inner(x_te, y_te, "test loader")
            scores = a[:, c_te] * (f_tr @ f_te.T)
            return check_finite(scores.to(self.dtype), "RPS scores")

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """``alpha_i[c_i] ||f_i||^2``: the diagonal of ``attribute(train, train)``; ``(n_train,)``."""
        with self._fitted(train_loader):
            a, f_tr, c_tr = self._train_side(train_loader)
            own = a.gather(1, c_tr.unsqueeze(1)).squeeze(1)
            return check_finite(
                (own * (f_tr * f_tr).sum(dim=1)).to(self.dtype), "RPS self-influence"
            )

    def hyperparameters(self) -> dict[str, Any]:
        out = {"method": type(self).__name__, "layer_name": None, **self.arguments.result_dict()}
        out.update(
            final_linear_layer_name=self.final_linear_layer_name,
            normalize_preactivate=self.normalize_preactivate,
            l2_strength=self.l2_strength,
            epoch=self.epoch,
            checkpoint_index=self.checkpoint_index,
            solver="lbfgs-strong-wolfe-float64",
        )
        if self.refit_loss != "auto" or self.convention == "outputs":
            out["refit_loss"] = self.convention or self.refit_loss
        return out
