"""Data value embedding (DVEmb; Wang et al., 2024): trajectory-aware influence of training data.

A model trained by SGD, ``theta_{s+1} = theta_s - eta_s sum_{j in B_s} g_j(theta_s)`` (with
``eta_s = lr_s / |B_s|`` for a mean loss), is unrolled to first order. Removing sample ``i`` from
step ``t`` moves ``theta_{t+1}`` by ``+eta_t g_i(theta_t)``; each later step multiplies that
change by its Jacobian ``I - eta_s H_s``, where DVEmb replaces the batch Hessian ``H_s`` by the
Gauss-Newton-like ``G_s = sum_{j in B_s} g_j g_j^T`` of the per-sample gradients. The influence
on a test sample with gradient ``g_test`` at the final parameters is then

    score(i, test) = sum_{t: i in B_t} g_test^T (I - eta_{T-1} G_{T-1}) ... (I - eta_{t+1} G_{t+1}) eta_t g_i(theta_t)

(positive: removing ``i`` would raise the test loss). The *data value embedding* of ``i`` is the
vector multiplying ``g_test``; it is computed for all samples in one backward pass over the
recorded steps: with ``M = 0`` and steps visited last to first,

    e_j = eta_t (g_j - M g_j)   for j in B_t;   embedding[j] += e_j;   M += sum_{j in B_t} e_j g_j^T

since ``(I - eta_{T-1} G_{T-1}) ... (I - eta_{t+1} G_{t+1}) = I - M`` after the steps ``> t``.
With a projection ``P`` (``proj_dim``), every gradient is replaced by ``P^T g`` and ``M`` is
``(k, k)``. Embeddings are kept per epoch; ``attribute`` sums them (or uses one epoch).

Usage (dattri 0.3.0's call shape)::

    att = DVEmbAttributor(task, proj_dim=None)
    for epoch in range(E):
        for x, y, idx in loader:                       # before each optimizer step
            att.cache_gradients(epoch, (x, y), idx, lr)
            ...optimizer step on task.model...
    att.cache()
    scores = att.attribute(test_loader)                # or att.attribute(train_loader, test_loader)

Gradients are taken at the *live* parameters of ``task.model`` (the model being trained);
``attribute`` takes test gradients at its final parameters.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tdabench.algorithm.arguments import MethodArguments, register_arguments
from tdabench.errors import ConfigError, NonFiniteError, NotCachedError, ShapeError
from tdabench.func.projection import PROJ_TYPES, make_projector
from tdabench.func.utils import (
    Batch,
    batch_size_of,
    batch_to,
    check_finite,
    iter_batches,
    per_sample_grads_named,
    select_param_names,
)
from tdabench.memory import parse_bytes, planner_for
from tdabench.task import AttributionTask

__all__ = ["DVEmbArguments", "DVEmbAttributor"]

logger = logging.getLogger(__name__)

FACTORIZATIONS = ("none", "kronecker", "elementwise")


@register_arguments("DVEmbAttributor")
@dataclass
class DVEmbArguments(MethodArguments):
    """Declared arguments of :class:`DVEmbAttributor`.

    Attributes:
        proj_dim: total projected dimension, or ``None`` for exact gradients. With
            ``"kronecker"`` each of the ``L`` linear layers gets ``floor(sqrt(proj_dim / L))``
            dimensions per factor (``k^2`` features per layer); with ``"elementwise"``
            ``floor(proj_dim / L)``.
        proj_seed: seed of the projection (non-negative).
        factorization_type: ``"none"`` (per-sample gradients of the selected parameters, a
            loss ``f(params, data)``), ``"kronecker"`` or ``"elementwise"`` (per-sample
            gradients of linear layers from their input and output-gradient factors, a loss
            ``f(model, data, device)``).
        layer_names: parameters (``"none"``: names or module prefixes) or ``nn.Linear``
            modules (factorised) to use; ``None`` for all parameters / all linear layers.
        proj_type: the random projection's distribution (``"gaussian"``, ``"rademacher"``,
            ``"sparse"``, or ``"identity"`` for ``"none"`` without reduction).
        memory_budget: the planner budget for ``M`` and the embeddings, or ``None``.
    """

    proj_dim: int | None = None
    proj_seed: int = 0
    factorization_type: str = "none"
    layer_names: str | list[str] | None = None
    proj_type: str = "gaussian"
    memory_budget: Any = None

    def __post_init__(self) -> None:
        if self.layer_names is not None and not isinstance(self.layer_names, str):
            if (
                not isinstance(self.layer_names, (list, tuple))
                or not self.layer_names
                or not all(isinstance(n, str) for n in self.layer_names)
            ):
                raise ConfigError(
                    f"layer_names must be None, a name or a non-empty list of names, got {self.layer_names!r}"
                )
            self.layer_names = list(self.layer_names)
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, total=2**40)
        if self.proj_dim is not None and (
            isinstance(self.proj_dim, bool)
            or not isinstance(self.proj_dim, int)
            or self.proj_dim < 1
        ):
            raise ConfigError(f"proj_dim must be None or an integer >= 1, got {self.proj_dim!r}")
        if (
            isinstance(self.proj_seed, bool)
            or not isinstance(self.proj_seed, int)
            or self.proj_seed < 0
        ):
            raise ConfigError(f"proj_seed must be a non-negative integer, got {self.proj_seed!r}")
        if self.factorization_type not in FACTORIZATIONS:
            raise ConfigError(
                f"factorization_type must be one of {FACTORIZATIONS}, got {self.factorization_type!r}"
            )
        if self.proj_type not in PROJ_TYPES:
            raise ConfigError(f"proj_type must be one of {PROJ_TYPES}, got {self.proj_type!r}")
        if self.proj_type == "identity" and self.factorization_type != "none":
            raise ConfigError(
                "proj_type='identity' is for factorization_type='none'; pass proj_dim=None instead"
            )


def _required_args(func: Any) -> int:
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return -1
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(1 for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty)


class DVEmbAttributor:
    """Data value embedding attributor (see the module docstring for the maths).

    Args:
        task: the :class:`~tdabench.task.AttributionTask`; its ``model`` is the model being
            trained (its checkpoints are not used). ``loss_func`` is ``f(params, data)`` for
            ``factorization_type="none"`` and ``f(model, data, device)`` otherwise, returning
            the mean loss of the batch.
        proj_dim: projected dimension or ``None`` (see :class:`DVEmbArguments`).
        proj_seed: seed of the projection.
        factorization_type: ``"none"``, ``"kronecker"`` or ``"elementwise"``.
        layer_names: which parameters / linear layers to use; ``None`` for all.
        proj_type: the projection's distribution (keyword only; ours).
        device: where gradients and embeddings live; default: the model's device.
        memory_budget: the planner budget for the ``(k, k)`` matrix ``M``.
    """

    def __init__(
        self,
        task: AttributionTask,
        proj_dim: int | None = None,
        proj_seed: int = 0,
        factorization_type: str | None = "none",
        layer_names: str | list[str] | None = None,
        *,
        proj_type: str = "gaussian",
        device: str | torch.device | None = None,
        memory_budget: int | float | str | None = None,
    ) -> None:
        if not isinstance(task, AttributionTask):
            raise ConfigError(f"task must be an AttributionTask, got {type(task).__name__}")
        self.args = DVEmbArguments(
            proj_dim, proj_seed, factorization_type or "none", layer_names, proj_type, memory_budget
        )
        self.task = task
        self.model: nn.Module = task.model
        first = next(iter(self.model.parameters()), None)
        self.device = (
            torch.device(device)
            if device is not None
            else (first.device if first is not None else torch.device("cpu"))
        )
        self.memory_budget = memory_budget
        self.factorization_type = self.args.factorization_type
        self.use_factorization = self.factorization_type != "none"
        self.proj_seed = proj_seed
        self.layer_names = [layer_names] if isinstance(layer_names, str) else layer_names
        want = 3 if self.use_factorization else 2
        if _required_args(task.loss_func) not in (want, -1):
            form = "f(model, data, device)" if self.use_factorization else "f(params, data)"
            raise ConfigError(
                f"Wrong loss function format for factorization_type={self.factorization_type!r}: "
                f"the task's loss_func must be {form}"
            )
        self._names: list[str] = []
        self._linear: list[nn.Linear] = []
        self._setup_dims()
        self._linear_layers = self._linear  # dattri's attribute name
        self.projector: Any = None
        self.random_projectors: list[tuple[Any, Any]] | None = None
        self.cached_gradients: dict[int, list[Tensor]] = {}
        self.cached_factors: dict[int, list[list[dict[str, Any]]]] = {}
        self.learning_rates: dict[int, list[float]] = {}
        self.data_indices: dict[int, list[Tensor]] = {}
        self.embeddings: dict[int, Tensor] = {}

    # ------------------------------------------------------------------ set-up
    def _setup_dims(self) -> None:
        """Parameter names (``"none"``) or linear layers (factorised) and the feature dimension."""
        proj_dim = self.args.proj_dim
        if not self.use_factorization:
            all_names = [n for n, _ in self.model.named_parameters()]
            self._names = select_param_names(all_names, self.layer_names)
            params = dict(self.model.named_parameters())
            self._grad_dim = sum(params[n].numel() for n in self._names)
            self.projection_dim = proj_dim
            return
        modules = dict(self.model.named_modules())
        if self.layer_names is None:
            self._linear = [m for m in self.model.modules() if isinstance(m, nn.Linear)]
        else:
            missing = [
                n
                for n in self.layer_names
                if n not in modules or not isinstance(modules[n], nn.Linear)
            ]
            if missing:
                linear = [n for n, m in modules.items() if isinstance(m, nn.Linear)]
                raise ConfigError(
                    f"layer_names {missing} are not nn.Linear modules of the model; linear layers: {linear}"
                )
            self._linear = [modules[n] for n in self.layer_names]
        if not self._linear:
            raise ConfigError(
                "No Linear layers found for gradient factorization; use factorization_type='none'"
            )
        n_layers = len(self._linear)
        if proj_dim is None:
            self.projection_dim = None
            self._grad_dim = sum(p.numel() for m in self._linear for p in m.parameters())
        elif self.factorization_type == "kronecker":
            self.projection_dim = int(math.sqrt(proj_dim / n_layers))
            self._grad_dim = n_layers * self.projection_dim**2
        else:
            self.projection_dim = proj_dim // n_layers
            self._grad_dim = n_layers * self.projection_dim
        if self.projection_dim is not None and self.projection_dim < 1:
            raise ConfigError(
                f"proj_dim={proj_dim} leaves no dimension per layer for {n_layers} linear layers; raise it"
            )

    def _project(self, g: Tensor) -> Tensor:
        if self.projection_dim is None and self.args.proj_type != "identity":
            return g
        if self.projector is None:
            self.projector = make_projector(
                g.shape[1],
                self.projection_dim,
                seed=self.proj_seed,
                proj_type=self.args.proj_type,
                device=self.device,
                dtype=g.dtype,
            )
        return self.projector.project(g)

    def _layer_projectors(self, dtype: torch.dtype) -> list[tuple[Any, Any]]:
        if self.random_projectors is None:
            k, seed = self.projection_dim, self.proj_seed
            self.random_projectors = [
                (
                    make_projector(
                        m.in_features,
                        k,
                        seed=seed + 2 * i,
                        proj_type=self.args.proj_type,
                        device=self.device,
                        dtype=dtype,
                    ),
                    make_projector(
                        m.out_features,
                        k,
                        seed=seed + 2 * i + 1,
                        proj_type=self.args.proj_type,
                        device=self.device,
                        dtype=dtype,
                    ),
                )
                for i, m in enumerate(self._linear)
            ]
        return self.random_projectors

    # ------------------------------------------------------------------ features
    def _full_gradients(self, batch: Batch) -> Tensor:
        """``(B, k)`` per-sample gradients of the selected parameters at the live parameters."""
        live = {n: p.detach().to(self.device) for n, p in self.model.named_parameters()}
        selected = {n: live[n] for n in self._names}
        fixed = {n: t for n, t in live.items() if n not in selected}
        user = self.task.loss_func

        def f(sel: dict[str, Tensor], data: Batch) -> Tensor:
            return user({**fixed, **sel}, data)

        g = check_finite(
            per_sample_grads_named(f, selected, batch), "per-sample gradient of the loss"
        )
        return self._project(g)

    def _factors(self, batch: Batch) -> list[tuple[Tensor, Tensor, bool]]:
        """Per linear layer: input ``A`` and per-sample output gradient ``B`` (2-d or 3-d)."""
        store: list[dict[str, Any]] = [{} for _ in self._linear]
        handles = []
        for i, layer in enumerate(self._linear):

            def fwd(_m: nn.Module, inp: tuple[Tensor, ...], out: Tensor, i: int = i) -> None:
                store[i]["A"] = inp[0].detach()
                if out.requires_grad:  # the gradient w.r.t. the layer's output, per sample
                    out.register_hook(lambda grad, i=i: store[i].__setitem__("B", grad.detach()))

            handles.append(layer.register_forward_hook(fwd))
        try:
            self.model.zero_grad(set_to_none=True)
            data = batch_to(batch, self.device)
            loss = self.task.loss_func(self.model, data, self.device)
            (loss * batch_size_of(data)).backward()  # mean loss -> per-sample output gradients
        finally:
            for h in handles:
                h.remove()
            self.model.zero_grad(set_to_none=True)
        return [
            (s["A"], s["B"], layer.bias is not None)
            for s, layer in zip(store, self._linear, strict=True)
        ]

    @staticmethod
    def _reconstruct(factors: list[dict[str, Any]]) -> Tensor:
        """Exact per-sample gradients ``(B, d)`` of the linear layers from their factors."""
        parts: list[Tensor] = []
        for f in factors:
            a, b = f["A"], f["B"]
            three = a.dim() == 3
            parts.append(
                (
                    torch.einsum("bli,blo->boi", a, b) if three else b[:, :, None] * a[:, None, :]
                ).flatten(1)
            )
            if f["has_bias"]:
                parts.append(b.sum(1) if three else b)
        return check_finite(torch.cat(parts, dim=1), "per-sample gradient of the loss")

    def _factored_gradients(self, batch: Batch) -> Tensor:
        factors = self._factors(batch)
        if self.projection_dim is None:
            return self._reconstruct([{"A": a, "B": b, "has_bias": hb} for a, b, hb in factors])
        k, parts = self.projection_dim, []
        for (pa, pb), (a, b, _) in zip(
            self._layer_projectors(factors[0][0].dtype), factors, strict=True
        ):
            shape = a.shape[:-1]
            ap = pa.project(a.reshape(-1, a.shape[-1])).reshape(*shape, k)
            bp = pb.project(b.reshape(-1, b.shape[-1])).reshape(*shape, k)
            if self.factorization_type == "kronecker":
                g = (
                    torch.einsum("blk,blj->bkj", ap, bp)
                    if a.dim() == 3
                    else bp[:, :, None] * ap[:, None, :]
                )
            else:
                g = ((ap * bp).sum(1) if a.dim() == 3 else ap * bp) * math.sqrt(k)
            parts.append(g.flatten(1))
        return check_finite(torch.cat(parts, dim=1), "projected per-sample gradient of the loss")

    def _features(self, batch: Batch) -> Tensor:
        return (
            self._factored_gradients(batch)
            if self.use_factorization
            else self._full_gradients(batch)
        )

    # ------------------------------------------------------------------ training-time API
    def cache_gradients(
        self, epoch: int, batch_data: Batch, indices: Tensor | Sequence[int], learning_rate: float
    ) -> None:
        """Record one training step (call before the optimizer step).

        Args:
            epoch: the epoch of the step.
            batch_data: the step's batch, e.g. ``(inputs, labels)``.
            indices: ``(B,)`` training-set indices of the batch's samples.
            learning_rate: the step's learning rate (the loss is a batch mean, so each
                sample's step size is ``learning_rate / B``).
        """
        idx = torch.as_tensor(indices).reshape(-1).long().cpu()
        b = batch_size_of(batch_data)
        if idx.numel() != b:
            raise ShapeError(f"indices has {idx.numel()} entries for a batch of {b} samples")
        if not math.isfinite(float(learning_rate)):
            raise ConfigError(f"learning_rate must be finite, got {learning_rate!r}")
        batch = batch_to(batch_data, self.device)
        if (
            self.use_factorization and self.projection_dim is None
        ):  # keep the factors (smaller); rebuilt in cache()
            factors = [
                {"A": a.cpu(), "B": b.cpu(), "has_bias": hb} for a, b, hb in self._factors(batch)
            ]
            self.cached_factors.setdefault(epoch, []).append(factors)
        else:
            self.cached_gradients.setdefault(epoch, []).append(self._features(batch).cpu())
        self.learning_rates.setdefault(epoch, []).append(float(learning_rate) / b)
        self.data_indices.setdefault(epoch, []).append(idx)

    def clear_cache(self) -> None:
        """Drop the recorded gradients (or factors), learning rates and indices."""
        self.cached_factors.clear()
        self.cached_gradients.clear()
        self.learning_rates.clear()
        self.data_indices.clear()

    def cache(
        self,
        gradients: dict[int, list[Tensor]] | None = None,
        learning_rates: dict[int, list[float]] | None = None,
        memory_saving: bool | None = True,
    ) -> None:
        """Compute the data value embeddings of every epoch from the recorded steps.

        Args:
            gradients: optional ``{epoch: [(B_t, k) per-sample gradients of step t]}``
                replacing the recorded ones (the recorded indices are used).
            learning_rates: optional ``{epoch: [per-sample step size of step t]}``.
            memory_saving: drop the recorded steps afterwards.
        """
        if gradients is not None and not isinstance(gradients, dict):
            raise ConfigError(
                f"DVEmbAttributor.cache takes the recorded gradients (a dict), not a {type(gradients).__name__}: "
                "DVEmb records the training trajectory with cache_gradients() during training, then cache(); "
                "a pipeline's attribute stage needs a train stage that records it"
            )
        if gradients is not None:
            if self.cached_factors:
                raise ConfigError(
                    "external gradients cannot replace recorded factors; use factorization_type='none' or a proj_dim"
                )
            self.cached_gradients = gradients
        if learning_rates is not None:
            self.learning_rates = learning_rates
        steps = self.cached_factors or self.cached_gradients
        n, k, dtype = self._check_recorded(steps)
        m = torch.zeros(k, k, dtype=dtype, device=self.device)
        self.embeddings = {}
        for epoch in sorted(steps, reverse=True):
            emb = torch.zeros(n, k, dtype=dtype, device=self.device)
            for t in reversed(range(len(steps[epoch]))):
                g = self._recorded(steps[epoch][t])
                e = self.learning_rates[epoch][t] * (g - g @ m.T)
                emb.index_add_(0, self.data_indices[epoch][t].to(self.device), e)
                m += e.T @ g
                if not bool(torch.isfinite(m).all()):
                    raise NonFiniteError(
                        f"DVEmb diverged at epoch {epoch}, step {t}: the learning rate may be too high for the gradients"
                    )
            self.embeddings[epoch] = emb
        if memory_saving:
            self.clear_cache()

    def _recorded(self, step: Tensor | list[dict[str, Any]]) -> Tensor:
        if isinstance(step, Tensor):
            return step.to(self.device)
        return self._reconstruct(
            [{**f, "A": f["A"].to(self.device), "B": f["B"].to(self.device)} for f in step]
        )

    def _check_recorded(self, steps: dict[int, list[Any]]) -> tuple[int, int, torch.dtype]:
        """``(n_train, k, dtype)`` of the recorded steps; checks counts and the memory budget."""
        if not any(steps.values()):
            raise NotCachedError(
                "No gradients cached. Call `cache_gradients` during training first."
            )
        for e in steps:
            c = (
                len(steps[e]),
                len(self.learning_rates.get(e, [])),
                len(self.data_indices.get(e, [])),
            )
            if len(set(c)) != 1:
                raise ShapeError(
                    f"epoch {e} has {c[0]} gradient steps, {c[1]} learning rates and {c[2]} index sets; they must match"
                )
        n = int(max(int(torch.cat(v).max()) for v in self.data_indices.values() if v)) + 1
        first = next(g for v in steps.values() for g in v)
        dtype = first.dtype if isinstance(first, Tensor) else first[0]["A"].dtype
        k = first.shape[1] if isinstance(first, Tensor) else self._grad_dim
        item = torch.empty((), dtype=dtype).element_size()
        planner_for(self.device, self.memory_budget).require(
            (k * k + 2 * n * k) * item, "DVEmb's (k, k) matrix and embeddings", "set proj_dim"
        )
        return n, k, dtype

    # ------------------------------------------------------------------ scores
    def _test_features(self, loader: Iterable[Batch]) -> Tensor:
        was = self.model.training
        self.model.eval()
        try:
            return torch.cat(
                [
                    self._features(batch_to(b, self.device))
                    for b in iter_batches(loader, "test loader")
                ]
            )
        finally:
            self.model.train(was)

    def _active(self, epoch: int | None) -> Tensor:
        if not self.embeddings:
            raise NotCachedError(
                "Embeddings not computed. Call cache() first (after cache_gradients during training)."
            )
        if epoch is None:
            return torch.stack(list(self.embeddings.values())).sum(0)
        if epoch not in self.embeddings:
            raise ConfigError(
                f"Embeddings for epoch {epoch} not found; recorded epochs: {sorted(self.embeddings)}"
            )
        return self.embeddings[epoch]

    def attribute(
        self,
        train_or_test_loader: Iterable[Batch],
        test_loader: Iterable[Batch] | None = None,
        epoch: int | None = None,
        train_data_indices: Sequence[int] | Tensor | None = None,
    ) -> Tensor:
        """Scores ``(n_train, n_test)``: embeddings times test gradients at the final parameters.

        Two call forms: ``attribute(test_loader, epoch=None, train_data_indices=None)``
        (dattri's) and ``attribute(train_loader, test_loader, ...)`` (every tdabench
        attributor's; the train loader only fixes ``n_train``, the embeddings come from
        training). ``n_train`` is otherwise the largest recorded index + 1.

        Args:
            train_or_test_loader: the test loader (dattri form) or the train loader.
            test_loader: the test loader (tdabench form).
            epoch: use only this epoch's embeddings; ``None`` sums every epoch.
            train_data_indices: only these training rows.
        """
        if isinstance(test_loader, int) and not isinstance(test_loader, bool):
            raise ConfigError(
                "pass epoch by keyword (attribute(test_loader, epoch=...)); the second positional argument is the test loader"
            )
        emb = self._active(epoch)
        if test_loader is None:
            test_loader = train_or_test_loader
        else:
            n_train = sum(
                batch_size_of(b) for b in iter_batches(train_or_test_loader, "train loader")
            )
            if n_train < emb.shape[0]:
                raise ShapeError(
                    f"the train loader holds {n_train} samples but training recorded indices up to {emb.shape[0] - 1}"
                )
            emb = torch.cat([emb, emb.new_zeros(n_train - emb.shape[0], emb.shape[1])])
        if train_data_indices is not None:
            emb = emb[torch.as_tensor(train_data_indices, dtype=torch.long, device=emb.device)]
        return emb @ self._test_features(test_loader).to(emb.dtype).T

    def self_attribute(self, train_loader: Iterable[Batch], epoch: int | None = None) -> Tensor:
        """``(n_train,)``: each sample's embedding times its own gradient at the final parameters
        (the diagonal of ``attribute(train_loader, train_loader)``)."""
        g = self._test_features(train_loader)
        emb = self._active(epoch)
        if g.shape[0] < emb.shape[0]:
            raise ShapeError(
                f"the train loader holds {g.shape[0]} samples but training recorded indices up to {emb.shape[0] - 1}"
            )
        emb = torch.cat([emb, emb.new_zeros(g.shape[0] - emb.shape[0], emb.shape[1])])
        return (emb * g.to(emb.dtype)).sum(1)

    def hyperparameters(self) -> dict[str, Any]:
        """Resolved hyper-parameters, for provenance metadata."""
        return {"method": type(self).__name__, **self.args.to_dict()}

    def __repr__(self) -> str:
        return f"DVEmbAttributor({self.args!r})"
