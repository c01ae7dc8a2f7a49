"""Representer point selection (Yeh et al., 2018).

The final ``nn.Linear`` layer is re-fitted on the fixed features ``f_i`` (its inputs)::

    W* = argmin_W  (1/n) sum_i CE(f_i W^T, y_i) + l2_strength * ||W||_F^2

At such a stationary point the representer theorem writes every logit as a sum over the
training set::

    f_t W*^T = sum_i alpha_i <f_i, f_t>,   alpha_i = -1 / (2 l2_strength n) * dCE(z_i, y_i)/dz_i

(``alpha_i`` is a vector over classes, ``dCE/dz = softmax(z) - onehot(y)``). The score
of training sample ``i`` for test sample ``j`` is its contribution to the logit of the
test sample's label ``c_j`` (``data[1]``)::

    score[i, j] = alpha_i[c_j] * <f_i, f_j>

Sign: a positive score raises the logit of the test sample's true class, i.e. lowers its
loss, so positive = helpful, the project's convention. (``alpha_i[y_i] = (1 - p_i) /
(2 l2_strength n) >= 0``: a sample pushes its own class up; ``alpha_i[c] <= 0`` for
``c != y_i``.) Summing a column over the cached training set gives the fine-tuned logit
of the test sample's class exactly (the theorem; tested).

Bias: if the layer has a bias, a constant 1 is appended to every feature and the bias is
fitted (and L2-regularised) as the last column of ``W``; inner products ``<f_i, f_j>``
include that constant. With ``normalize_preactivate=True`` the features are scaled to unit
norm *before* the constant is appended.

Fitting: L-BFGS (strong-Wolfe line search) in float64 on the full batch, started from the
checkpoint's layer, for at most ``epoch`` iterations; it stops earlier once the largest
gradient entry is below ``1e-10``. Up to 5 Newton-CG steps (exact Hessian-vector products)
then polish the solution to rounding level. The objective is strictly convex, so this
reaches the unique optimum; the final gradient norm is kept in ``stationarity`` (and logged as a
warning when it is not small). Batches must be ``(inputs, labels, ...)``: the model is
called as ``model(inputs)`` and ``labels`` are class indices ``(B,)``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tdabench.algorithm.arguments import RPSArguments
from tdabench.algorithm.base import BaseAttributor
from tdabench.errors import ConfigError, DataError, ShapeError
from tdabench.func.solvers import conjugate_gradient
from tdabench.func.utils import Batch, check_finite
from tdabench.task import AttributionTask

__all__ = ["RPSAttributor"]

logger = logging.getLogger(__name__)

_GRAD_TOL = 1e-10


class RPSAttributor(BaseAttributor):
    """Representer points of the final linear layer.

    Args:
        task: the task (its ``loss_func`` is not used: RPS refits with cross-entropy).
        final_linear_layer_name: module name of the final ``nn.Linear`` (e.g. ``"fc3"``).
        normalize_preactivate: L2-normalise the features before fitting and scoring.
        l2_strength: ``> 0``, the L2 weight of the refit.
        epoch: maximum number of L-BFGS iterations of the refit.
        device: where features, the refit and scores live (scores are returned there).
        checkpoint_index: which checkpoint provides the features and the initial layer
            (default ``-1``: the last one).
        memory_budget: bytes (or ``"8GiB"``, or a fraction of the device) the method may hold.
    """

    requires_cache = True

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
    ) -> None:
        super().__init__(task, None, device, memory_budget)
        linears = [n for n, m in task.model.named_modules() if isinstance(m, nn.Linear)]
        if not isinstance(final_linear_layer_name, str) or final_linear_layer_name not in linears:
            raise ConfigError(
                f"final_linear_layer_name {final_linear_layer_name!r} is not an nn.Linear module of the "
                f"model; its nn.Linear modules are {linears}"
            )
        self.arguments = RPSArguments(
            final_linear_layer_name=final_linear_layer_name,
            normalize_preactivate=normalize_preactivate,
            l2_strength=l2_strength,
            epoch=epoch,
            checkpoint_index=checkpoint_index,
            memory_budget=memory_budget,
        )
        lam, epoch = self.arguments.l2_strength, self.arguments.epoch
        n_ckpt = task.num_checkpoints
        if not -n_ckpt <= checkpoint_index < n_ckpt:
            raise ConfigError(
                f"checkpoint_index must be an integer in [{-n_ckpt}, {n_ckpt - 1}], got {checkpoint_index!r}"
            )
        self.final_linear_layer_name = final_linear_layer_name
        self.normalize_preactivate = bool(normalize_preactivate)
        self.l2_strength = lam
        self.epoch = epoch
        self.checkpoint_index = checkpoint_index % n_ckpt
        self.weight: Tensor | None = None  # (C, m [+1]) fitted layer, float64
        self.num_cached_train = 0
        self.stationarity = float("nan")
        self.iterations = 0

    # ------------------------------------------------------------------ features
    def _layer(self) -> nn.Linear:
        self.task.get_params(self.checkpoint_index)  # loads the checkpoint into task.model
        return self.task.model.get_submodule(self.final_linear_layer_name)

    def _features(self, loader: Iterable[Batch], what: str) -> tuple[Tensor, Tensor]:
        """Features ``(n, m [+1])`` (float64, bias-augmented) and labels ``(n,)`` of ``loader``."""
        params = {
            n: t.to(self.device) for n, t in self.task.get_params(self.checkpoint_index).items()
        }
        buffers = {n: b.detach().to(self.device) for n, b in self.task.model.named_buffers()}
        layer = self._layer()
        captured: list[Tensor] = []

        def hook(module: nn.Module, inputs: tuple[Any, ...]) -> None:
            captured.append(inputs[0].detach())

        feats, labels = [], []
        handle = layer.register_forward_pre_hook(hook)
        was_training = self.task.model.training
        try:
            self.task.model.eval()
            for batch in self._batches(loader, what):
                if not isinstance(batch, (tuple, list)) or len(batch) < 2:
                    raise DataError(
                        f"RPS needs batches of (inputs, labels); the {what} yields {type(batch).__name__}"
                    )
                captured.clear()
                with torch.no_grad():
                    functional_call(self.task.model, {**buffers, **params}, (batch[0],))
                if len(captured) != 1:
                    raise ConfigError(
                        f"layer {self.final_linear_layer_name!r} ran {len(captured)} times in one forward pass; "
                        "pass the final linear layer, called once per forward"
                    )
                f = captured[0]
                y = batch[1]
                if (
                    f.dim() != 2
                    or y.dim() != 1
                    or y.shape[0] != f.shape[0]
                    or y.is_floating_point()
                ):
                    raise ShapeError(
                        f"RPS needs features (B, m) and integer labels (B,), got features {tuple(f.shape)} and "
                        f"labels {tuple(y.shape)} {y.dtype}; use a classification model whose final layer sees 2-D inputs"
                    )
                feats.append(f.to(torch.float64))
                labels.append(y.to(self.device))
        finally:
            handle.remove()
            self.task.model.train(was_training)
        feat = torch.cat(feats)
        if self.normalize_preactivate:
            feat = feat / feat.norm(dim=1, keepdim=True).clamp_min(1e-30)
        if layer.bias is not None:
            feat = torch.cat(
                [feat, torch.ones(feat.shape[0], 1, dtype=feat.dtype, device=feat.device)], dim=1
            )
        return check_finite(feat, "RPS features"), torch.cat(labels).long()

    def _initial_weight(self) -> Tensor:
        layer = self._layer()
        w = layer.weight.detach().to(self.device, torch.float64)
        if layer.bias is not None:
            w = torch.cat(
                [w, layer.bias.detach().to(self.device, torch.float64).unsqueeze(1)], dim=1
            )
        return w

    def _loss_and_gradient(self, w: Tensor, feat: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """The refit objective and its closed-form gradient ``(C, m)`` (no autograd graph)."""
        with torch.no_grad():
            rows = torch.arange(labels.shape[0], device=labels.device)
            logp = torch.log_softmax(feat @ w.T, dim=1)
            loss = -logp[rows, labels].mean() + self.l2_strength * (w * w).sum()
            resid = logp.exp_()
            resid[rows, labels] -= 1.0
            return loss, resid.T @ feat / feat.shape[0] + 2.0 * self.l2_strength * w

    def _gradient(self, w: Tensor, feat: Tensor, labels: Tensor) -> Tensor:
        """Closed-form gradient of the refit objective, ``(C, m)``."""
        return self._loss_and_gradient(w, feat, labels)[1]

    def _newton_polish(self, w: Tensor, feat: Tensor, labels: Tensor, steps: int = 5) -> Tensor:
        """A few Newton-CG steps from the L-BFGS solution (float64 line-search methods stall
        near ``|grad| ~ 1e-9``; Newton's quadratic convergence reaches rounding level)."""
        n, (c, m) = feat.shape[0], w.shape
        grad = self._gradient(w, feat, labels)
        for _ in range(steps):
            gmax = float(grad.abs().max())
            if gmax <= 1e-15:
                break
            probs = torch.softmax(feat @ w.T, dim=1)

            def hvp(v: Tensor, probs: Tensor = probs) -> Tensor:  # (k, C*m) -> (k, C*m)
                vs = v.reshape(-1, c, m)
                z = torch.einsum("nm,kcm->knc", feat, vs)
                j = probs * z - probs * (probs * z).sum(-1, keepdim=True)
                return (
                    torch.einsum("knc,nm->kcm", j, feat) / n + 2.0 * self.l2_strength * vs
                ).reshape(v.shape[0], -1)

            step = conjugate_gradient(
                hvp, -grad.reshape(1, -1), max_iter=min(c * m, 500), tol=1e-13
            )
            candidate = w + step.reshape(c, m)
            cand_grad = self._gradient(candidate, feat, labels)
            if not float(cand_grad.abs().max()) < gmax:
                break
            w, grad = candidate, cand_grad
        return w

    # ------------------------------------------------------------------ API
    def cache(self, full_train_loader: Iterable[Batch]) -> None:
        """Extract the training features and refit the final layer (L-BFGS, float64)."""
        feat, labels = self._features(full_train_loader, "full train loader")
        w = self._initial_weight().clone().requires_grad_(True)
        n_classes = w.shape[0]
        if int(labels.min()) < 0 or int(labels.max()) >= n_classes:
            raise DataError(
                f"labels must be class indices in [0, {n_classes - 1}], got range [{int(labels.min())}, {int(labels.max())}]"
            )
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
            loss, w.grad = self._loss_and_gradient(w, feat, labels)
            return loss

        opt.step(closure)
        state = opt.state[w]
        self.iterations = int(state.get("n_iter", 0))
        w = self._newton_polish(w.detach(), feat, labels)
        grad = self._gradient(w, feat, labels)
        self.stationarity = float(grad.abs().max())
        if self.stationarity > 1e-6:
            logger.warning(
                "RPS refit stopped after %d L-BFGS iterations with max |gradient| %.3g; the representer "
                "decomposition is approximate. Raise epoch or l2_strength.",
                self.iterations,
                self.stationarity,
            )
        self.weight = check_finite(w, "RPS fitted weights", "raise l2_strength")
        self.num_cached_train = int(feat.shape[0])
        self._cached = True

    def alpha(self, feat: Tensor, labels: Tensor) -> Tensor:
        """Representer values ``alpha`` ``(n, C)`` of samples with (augmented) features ``feat`` and labels."""
        self._require_cache()
        assert self.weight is not None
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= self.weight.shape[0]):
            raise DataError(f"labels must be class indices in [0, {self.weight.shape[0] - 1}]")
        probs = torch.softmax(feat @ self.weight.T, dim=1)
        probs[torch.arange(labels.shape[0], device=labels.device), labels] -= 1.0
        return probs.mul_(-1.0 / (2.0 * self.l2_strength * self.num_cached_train))

    def attribute(self, train_loader: Iterable[Batch], test_loader: Iterable[Batch]) -> Tensor:
        """Representer scores ``alpha_i[c_j] <f_i, f_j>``.

        Args:
            train_loader: training samples ``(inputs, labels)`` (any subset of the cached set).
            test_loader: test samples ``(inputs, labels)``; ``labels`` choose the class explained.

        Returns:
            Tensor ``(n_train, n_test)`` on ``device``.

        Raises:
            NotCachedError: before :meth:`cache`.
        """
        self._require_cache()
        f_tr, y_tr = self._features(train_loader, "train loader")
        f_te, y_te = self._features(test_loader, "test loader")
        n_classes = self.weight.shape[0] if self.weight is not None else 0
        if int(y_te.min()) < 0 or int(y_te.max()) >= n_classes:
            raise DataError(f"test labels must be class indices in [0, {n_classes - 1}]")
        a = self.alpha(f_tr, y_tr)  # (n_train, C)
        scores = a[:, y_te] * (f_tr @ f_te.T)
        return check_finite(scores.to(self.dtype), "RPS scores")

    def self_attribute(self, train_loader: Iterable[Batch]) -> Tensor:
        """``alpha_i[y_i] ||f_i||^2 >= 0``: the diagonal of ``attribute(train, train)``; ``(n_train,)``."""
        self._require_cache()
        f_tr, y_tr = self._features(train_loader, "train loader")
        a = self.alpha(f_tr, y_tr)
        own = a.gather(1, y_tr.unsqueeze(1)).squeeze(1)
        return check_finite((own * (f_tr * f_tr).sum(dim=1)).to(self.dtype), "RPS self-influence")

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
        return out
