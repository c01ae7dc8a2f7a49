"""``AttributionTask``: the model, its loss/target functions and its checkpoints.

A task turns a ``torch.nn.Module`` plus ``loss_func(params, data)`` into functions of one
flat parameter vector, which every attributor uses: per-sample gradients, summed
losses for Hessian-vector products, and parameter vectors of each checkpoint.
"""

from __future__ import annotations

import inspect
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tdabench._compat import mode_dependent_layer_types
from tdabench._sample_mode import SAMPLE_MODES, BatchLoss
from tdabench._task_compat import DattriTaskMethods
from tdabench.errors import CheckpointError, ConfigError, UnsafeFileError
from tdabench.func.utils import (
    Batch,
    ParamSpec,
    check_finite,
    per_sample_grads_named,
    per_sample_values,
    select_param_names,
)

__all__ = ["AttributionTask", "load_state_dict"]

Checkpoint = Mapping[str, Tensor] | str | os.PathLike
LayerName = str | Sequence[str] | None

logger = logging.getLogger(__name__)


_PICKLE_MAGIC = (b"\x80",)  # protocol 2+ pickles start with PROTO opcode


def load_state_dict(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> dict[str, Tensor]:
    """Load a state dict (name -> tensor of the parameter's shape) without executing code.

    ``.safetensors`` files are read with safetensors; anything else with
    ``torch.load(weights_only=True)``, which refuses pickled code. A raw pickle is refused
    before it is opened by torch.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint file {str(p)!r} does not exist; check the path")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p), device=str(map_location))
        except Exception as exc:  # truncated or not a safetensors file
            raise CheckpointError(
                f"cannot read safetensors checkpoint {str(p)!r}: {exc}; re-create the file"
            ) from exc
    with open(p, "rb") as fh:
        head = fh.read(2)
    if head[:1] in _PICKLE_MAGIC:
        raise UnsafeFileError(
            f"{str(p)!r} is a raw pickle; loading it could execute code, so it is refused. "
            "Save weights with safetensors (safetensors.torch.save_file) or torch.save(state_dict)"
        )
    try:
        obj = torch.load(str(p), map_location=map_location, weights_only=True)
    except Exception as exc:
        raise UnsafeFileError(
            f"{str(p)!r} could not be loaded with torch.load(weights_only=True) ({exc}); "
            "tdabench never unpickles arbitrary objects: save a plain state_dict or use safetensors"
        ) from exc
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{str(p)!r} does not hold a state dict (got {type(obj).__name__}); save model.state_dict()"
        )
    return dict(obj)


class AttributionTask(DattriTaskMethods):
    """Everything an attributor needs to know about a model.

    Args:
        loss_func: ``loss_func(params, data) -> scalar`` where ``params`` is a
            ``{name: tensor}`` dict for :func:`torch.func.functional_call` and ``data`` a
            batch (tuple of tensors with a leading batch dimension). It should return the
            *mean* loss over the batch; attributors call it on batches of one sample.
        model: the ``nn.Module`` whose parameters ``params`` replaces.
        checkpoints: a state dict, a path (``.safetensors``, or torch weights loaded with
            ``weights_only=True``), or a list of these (an ensemble / training trajectory).
        target_func: ``target_func(params, data) -> scalar``, the quantity whose change is
            attributed on test samples. Defaults to ``loss_func``.
        checkpoints_load_func: optional ``f(model, checkpoint) -> model`` replacing the
            default loader (``model.load_state_dict``).
        sample_mode: how ``loss_func``/``target_func`` take ``data``: ``"batch"`` (a batch,
            tdabench's convention), ``"sample"`` (one unbatched sample, dattri's convention:
            the task then averages ``vmap``-ed per-sample calls), or ``"auto"`` (default:
            decided on the first batch by calling it both ways; a function that works both
            ways with different values raises :class:`ConfigError` asking for this argument).
            ``task.loss_func`` always has batch semantics; the user's functions stay in
            ``original_loss_func``/``original_target_func``.
    """

    def __init__(
        self,
        loss_func: Callable[[dict[str, Tensor], Batch], Tensor],
        model: nn.Module,
        checkpoints: Checkpoint | Sequence[Checkpoint],
        target_func: Callable[[dict[str, Tensor], Batch], Tensor] | None = None,
        checkpoints_load_func: Callable[[nn.Module, Any], nn.Module] | None = None,
        sample_mode: str = "auto",
    ) -> None:
        if not callable(loss_func):
            raise ConfigError("loss_func must be callable as loss_func(params, data)")
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if target_func is not None and not callable(target_func):
            raise ConfigError("target_func must be callable as target_func(params, data) or None")
        if sample_mode not in SAMPLE_MODES:
            raise ConfigError(f"sample_mode must be one of {SAMPLE_MODES}, got {sample_mode!r}")
        self.original_loss_func = loss_func
        self.original_target_func = target_func if target_func is not None else loss_func
        self._sample_state = [sample_mode]
        self.loss_func = _batch_semantics(loss_func, self._sample_state, "loss_func")
        self.target_func = (
            self.loss_func
            if target_func is None
            else _batch_semantics(target_func, self._sample_state, "target_func")
        )
        self.model = model
        self.checkpoints_load_func = checkpoints_load_func
        if isinstance(checkpoints, (str, os.PathLike, Mapping)):
            ckpts: list[Any] = [checkpoints]
        elif isinstance(checkpoints, Sequence) and len(checkpoints) > 0:
            ckpts = list(checkpoints)
        else:
            raise CheckpointError(
                "checkpoints must be a state dict, a path or a non-empty list of these; "
                f"got {type(checkpoints).__name__} of length {len(checkpoints) if hasattr(checkpoints, '__len__') else '?'}"
            )
        self.checkpoints = ckpts
        stochastic = sorted(
            {
                type(m).__name__
                for m in model.modules()
                if isinstance(m, mode_dependent_layer_types())
            }
        )
        if model.training and stochastic:
            logger.warning(
                "the model is in training mode and has %s layers: gradients then use dropout noise "
                "or batch statistics (BatchNorm also updates its running buffers, which torch.func "
                "refuses); call model.eval() before building the AttributionTask",
                "/".join(stochastic),
            )
        self._all_names = [n for n, _ in model.named_parameters()]
        self._cache_index: int | None = None
        self._cache_params: dict[str, Tensor] | None = None
        self._cache_buffers: dict[str, Tensor] | None = None
        # Validate the first checkpoint now: a mismatch should fail at construction.
        self.get_params(0)

    # ------------------------------------------------------------------ conventions
    @property
    def sample_mode(self) -> str:
        """``"batch"``, ``"sample"``, or ``"auto"`` until the first batch decided it."""
        return self._sample_state[0]

    def adapt(self, func: Callable[..., Tensor], what: str) -> Callable[..., Tensor]:
        """Another ``f(params, data)`` of the user's (e.g. TRAK's probability function) with batch
        semantics under the same convention as the loss (``sample_mode``)."""
        return _batch_semantics(func, self._sample_state, what)

    def resolve_sample_mode(self, batch: Batch, index: int = 0) -> str:
        """Decide ``sample_mode`` on a concrete ``batch`` (no-op once decided)."""
        if self._sample_state[0] != "auto" or not isinstance(self.loss_func, BatchLoss):
            return self._sample_state[0]
        first = next(
            (
                t
                for t in (batch if isinstance(batch, (tuple, list)) else [batch])
                if isinstance(t, Tensor)
            ),
            None,
        )
        dev = first.device if first is not None else None
        params = {n: t.to(dev) for n, t in self.get_params(index).items()}
        return self.loss_func.resolve(params, batch)

    # ------------------------------------------------------------------ checkpoints
    def __len__(self) -> int:
        return len(self.checkpoints)

    @property
    def num_checkpoints(self) -> int:
        """How many checkpoints the task holds."""
        return len(self.checkpoints)

    def _load(self, index: int) -> None:
        if not 0 <= index < len(self.checkpoints):
            raise ConfigError(
                f"checkpoint index {index} out of range; the task has {len(self.checkpoints)}"
            )
        ckpt = self.checkpoints[index]
        if self.checkpoints_load_func is not None:
            model = self.checkpoints_load_func(self.model, ckpt)
            if not isinstance(model, nn.Module):
                raise CheckpointError("checkpoints_load_func must return the loaded nn.Module")
            self.model = model
        else:
            sd = load_state_dict(ckpt) if isinstance(ckpt, (str, os.PathLike)) else ckpt
            if not isinstance(sd, Mapping):
                raise CheckpointError(
                    f"checkpoint {index} is a {type(sd).__name__}, not a state dict or path"
                )
            own = self.model.state_dict()
            missing = [k for k in own if k not in sd]
            unexpected = [k for k in sd if k not in own]
            wrong = [
                f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                for k in own
                if k in sd
                and isinstance(sd[k], Tensor)
                and tuple(sd[k].shape) != tuple(own[k].shape)
            ]
            if missing or unexpected or wrong:
                raise CheckpointError(
                    f"checkpoint {index} does not match the model: missing keys {missing[:5]}, "
                    f"unexpected keys {unexpected[:5]}, shape mismatches {wrong[:5]}; "
                    "pass checkpoints saved from this model architecture (model.state_dict())"
                )
            with torch.no_grad():
                self.model.load_state_dict(sd, strict=True)
        self._cache_index = index
        self._cache_params = {n: p.detach().clone() for n, p in self.model.named_parameters()}
        self._cache_buffers = {n: b.detach().clone() for n, b in self.model.named_buffers()}

    def get_params(self, index: int = 0) -> dict[str, Tensor]:
        """Every named parameter of checkpoint ``index`` (detached copies)."""
        if self._cache_index != index:
            self._load(index)
        assert self._cache_params is not None
        return self._cache_params

    def param_spec(self, layer_name: LayerName = None) -> ParamSpec:
        """The :class:`ParamSpec` of the parameters selected by ``layer_name``."""
        names = select_param_names(self._all_names, layer_name)
        return ParamSpec.from_params(self.get_params(self._cache_index or 0), names)

    def flat_params(
        self,
        index: int = 0,
        layer_name: LayerName = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Parameters of checkpoint ``index`` selected by ``layer_name`` as one vector ``(d,)``."""
        params = self.get_params(index)
        flat = self.param_spec(layer_name).flatten(params)
        return flat.to(device=device, dtype=dtype or flat.dtype)

    # ------------------------------------------------------------------ functions
    def flat_func(
        self,
        which: str = "loss",
        index: int = 0,
        layer_name: LayerName = None,
        device: str | torch.device | None = None,
    ) -> Callable[[Tensor, Batch], Tensor]:
        """``f(flat, data)``: the loss or target as a function of the selected flat parameters.

        Parameters not selected by ``layer_name`` are held at checkpoint ``index``.
        """
        if which not in ("loss", "target"):
            raise ConfigError(f"which must be 'loss' or 'target', got {which!r}")
        user = self.loss_func if which == "loss" else self.target_func
        return self.flat_call(user, index, layer_name, device)

    def flat_call(
        self,
        func: Callable[[dict[str, Tensor], Batch], Any],
        index: int = 0,
        layer_name: LayerName = None,
        device: str | torch.device | None = None,
    ) -> Callable[[Tensor, Batch], Any]:
        """``f(flat, data) = func(params, data)`` with the parameters selected by ``layer_name``
        taken from ``flat`` ``(d,)`` and the others held at checkpoint ``index``."""
        spec = self.param_spec(layer_name)
        all_params = self.get_params(index)
        fixed = {n: t.to(device) for n, t in all_params.items() if n not in spec.names}

        def f(flat: Tensor, data: Batch) -> Any:
            params = dict(fixed)
            params.update(spec.unflatten(flat))
            return func(params, data)

        return f

    def per_sample_grads(
        self,
        flat: Tensor,
        batch: Batch,
        which: str = "loss",
        index: int = 0,
        layer_name: LayerName = None,
        as_blocks: bool = False,
    ) -> Tensor | list[Tensor]:
        """Per-sample gradients ``(B, d)`` of the loss/target at ``flat`` (checks finiteness).

        With ``as_blocks=True``: the same gradients as a list of per-parameter ``(B, d_p)``
        column blocks (in flat-vector order), not concatenated.
        """
        if which not in ("loss", "target"):
            raise ConfigError(f"which must be 'loss' or 'target', got {which!r}")
        self.resolve_sample_mode(batch, index)
        user = self.loss_func if which == "loss" else self.target_func
        spec = self.param_spec(layer_name)
        fixed = {
            n: t.to(flat.device) for n, t in self.get_params(index).items() if n not in spec.names
        }

        def f(selected: dict[str, Tensor], data: Batch) -> Tensor:
            return user({**fixed, **selected}, data)

        g = per_sample_grads_named(f, spec.unflatten(flat), batch, as_blocks=as_blocks)
        what = f"per-sample gradient of the {which}"
        if as_blocks:
            return [check_finite(b, what) for b in g]
        return check_finite(g, what)

    # Spelled out: per_sample_grads' arguments (without as_blocks), typed for callers.
    def per_sample_values(
        self,
        flat: Tensor,
        batch: Batch,
        which: str = "loss",
        index: int = 0,
        layer_name: LayerName = None,
    ) -> Tensor:
        """Per-sample loss/target values ``(B,)``."""
        self.resolve_sample_mode(batch, index)
        func = self.flat_func(which, index, layer_name, device=flat.device)
        return per_sample_values(func, flat, batch)

    def summed_loss(
        self,
        batch: Batch,
        index: int = 0,
        layer_name: LayerName = None,
        device: str | torch.device | None = None,
    ) -> Callable[[Tensor], Tensor]:
        """``g(flat) = Σ_samples loss(flat, sample)`` over ``batch``, independent of the
        user's reduction (each sample is evaluated as a batch of one)."""
        self.resolve_sample_mode(batch, index)
        func = self.flat_func("loss", index, layer_name, device=device)
        return lambda flat: per_sample_values(func, flat, batch).sum()

    def forward(self, params: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> Any:
        """``functional_call(model, params, args)`` with the current checkpoint's buffers."""
        merged = dict(self._cache_buffers or {})
        merged.update(params)
        return functional_call(self.model, merged, args, kwargs)


def _batch_semantics(
    func: Callable[..., Tensor], state: list[str], what: str
) -> Callable[..., Tensor]:
    """``func`` wrapped in :class:`BatchLoss` when it is ``f(params, data)``; other forms (e.g.
    dattri's LoGra/DVEmb ``f(model, data, device)``) are kept as they are."""
    try:
        sig = inspect.signature(func)
    except (TypeError, ValueError):
        return BatchLoss(func, state, what)
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in sig.parameters.values() if p.kind in kinds and p.default is p.empty]
    variadic = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in sig.parameters.values())
    return (
        BatchLoss(func, state, what)
        if len(required) == 2 or (variadic and len(required) < 2)
        else func
    )
