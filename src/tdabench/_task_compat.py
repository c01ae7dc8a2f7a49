"""dattri 0.3.0's ``AttributionTask`` accessor methods, mixed into :class:`tdabench.task.AttributionTask`.

dattri's attributors call these to get flattened, optionally layer-restricted loss/target
functions and their vmapped gradients; user code written against dattri calls them too.
Semantics follow dattri: the flat vector holds the model's *trainable* parameters in
``model.named_parameters()`` order (or, with ``layer_name``, the named parameters in the
order given); loading a checkpoint through these methods puts the model in eval mode, as
dattri's default checkpoint loader does.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor, nn
from torch.func import grad, vmap

from tdabench.errors import ConfigError
from tdabench.func.utils import flatten_func, flatten_params, partial_param

__all__ = ["DattriTaskMethods"]

LayerNames = str | Sequence[str] | None


class DattriTaskMethods:
    """``get_loss_func``, ``get_grad_loss_func``, ``get_param``, ... with dattri's signatures.

    Expects the host class to provide ``model``, ``loss_func``, ``target_func``, ``checkpoints``,
    ``checkpoints_load_func`` and ``get_params(index) -> {name: tensor}``.
    """

    model: nn.Module
    loss_func: Callable[..., Tensor]
    target_func: Callable[..., Tensor]
    checkpoints: list[Any]
    checkpoints_load_func: Callable[..., nn.Module] | None

    def _dattri_trainable(self, ckpt_idx: int | None) -> dict[str, Tensor]:
        """Trainable parameters of checkpoint ``ckpt_idx`` (loaded; eval mode as in dattri)."""
        params = self.get_params(0 if ckpt_idx is None else int(ckpt_idx))
        if self.checkpoints_load_func is None:
            self.model.eval()
        return {n: params[n] for n, p in self.model.named_parameters() if p.requires_grad}

    def _dattri_user(self, which: str) -> Callable[..., Tensor]:
        """The user's own function (dattri's accessors hand it out unwrapped, in its convention)."""
        name = "original_loss_func" if which == "loss" else "original_target_func"
        fallback = self.loss_func if which == "loss" else self.target_func
        return getattr(self, name, fallback)

    def _dattri_func(
        self,
        user: Callable[..., Tensor],
        flatten: bool,
        layer_name: LayerNames,
        ckpt_idx: int | None,
    ) -> Callable[..., Tensor]:
        if not flatten:
            if layer_name is not None:
                raise ConfigError(
                    "layer_name needs flatten=True (the function then takes the selected flat parameters)"
                )
            return user
        func = flatten_func(self.model)(user)
        if layer_name is not None:
            names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
            func = partial_param(self._dattri_trainable(ckpt_idx), names)(func)
        return func

    def get_loss_func(
        self, flatten: bool = True, layer_name: LayerNames = None, ckpt_idx: int | None = None
    ) -> Callable[..., Tensor]:
        """``f(flat_params (d,), data) -> loss``; ``flatten=False`` returns the user's function.

        With ``layer_name`` (names of ``model.named_parameters()``), ``flat_params`` holds only
        those parameters (in the given order); the others are those of checkpoint ``ckpt_idx``.
        """
        return self._dattri_func(self._dattri_user("loss"), flatten, layer_name, ckpt_idx)

    def get_target_func(
        self, flatten: bool = True, layer_name: LayerNames = None, ckpt_idx: int | None = None
    ) -> Callable[..., Tensor]:
        """As :meth:`get_loss_func` for the target function: ``f(flat_params (d,), data) -> target``."""
        return self._dattri_func(self._dattri_user("target"), flatten, layer_name, ckpt_idx)

    def get_grad_loss_func(
        self,
        in_dims: tuple[int | None, ...] = (None, 1),
        layer_name: LayerNames = None,
        ckpt_idx: int | None = None,
    ) -> Callable[..., Tensor]:
        """``vmap(grad(get_loss_func(...)), in_dims)``: per-sample gradients ``(B, d)``.

        With dattri's default ``in_dims=(None, 1)`` the data tensors are mapped over their
        dimension 1 (callers pass ``data.unsqueeze(0)``-style batches, as in dattri).
        """
        return _vmap_grad(self.get_loss_func(True, layer_name, ckpt_idx), in_dims)

    # Spelled out: dattri's signature (the same as get_grad_loss_func's).
    def get_grad_target_func(
        self,
        in_dims: tuple[int | None, ...] = (None, 1),
        layer_name: LayerNames = None,
        ckpt_idx: int | None = None,
    ) -> Callable[..., Tensor]:
        """As :meth:`get_grad_loss_func` for the target: per-sample gradients ``(B, d)``."""
        return _vmap_grad(self.get_target_func(True, layer_name, ckpt_idx), in_dims)

    def get_param(
        self,
        ckpt_idx: int = 0,
        layer_name: LayerNames = None,
        layer_split: bool = False,
        param_layer_map: Sequence[int] | None = None,
    ) -> tuple[Tensor | tuple[Tensor, ...], list[int] | None]:
        """Parameters of checkpoint ``ckpt_idx``: ``(flat (d,), None)``, or per tensor with a layer map.

        Args:
            ckpt_idx: checkpoint index.
            layer_name: keep only these parameter names (in model order); unknown names are skipped, as dattri.
            layer_split: return a tuple of flattened parameter tensors and a map from each tensor to its
                layer index (consecutive tensors of one module share an index).
            param_layer_map: the map to return instead of the generated one (same length).

        Returns:
            ``(flat, None)`` or ``(tuple of (d_p,) tensors, layer map)``.
        """
        named = self._dattri_trainable(ckpt_idx)
        if layer_name is not None:
            wanted = [layer_name] if isinstance(layer_name, str) else list(layer_name)
            named = {k: named[k] for k in wanted if k in named}
        if not layer_split:
            return flatten_params(named), None
        pieces = tuple(p.reshape(-1) for p in named.values())
        if param_layer_map is not None:
            if len(param_layer_map) != len(named):
                raise ConfigError(
                    f"param_layer_map has {len(param_layer_map)} entries for {len(named)} parameter tensors"
                )
            return pieces, list(param_layer_map)
        return pieces, _layer_map(list(named))

    def get_checkpoints(self) -> list[Any]:
        """The checkpoints of the task (a list)."""
        return self.checkpoints

    def get_model(self) -> nn.Module:
        """The task's model."""
        return self.model


def _layer_map(names: Sequence[str]) -> list[int]:
    """Index of the module of each parameter name (a new index whenever the module prefix changes)."""
    out, current, index = [], None, -1
    for name in names:
        module = name.rsplit(".", 1)[0] if "." in name else ""
        if module != current:
            index, current = index + 1, module
        out.append(index)
    return out


def _vmap_grad(
    func: Callable[..., Tensor], in_dims: tuple[int | None, ...]
) -> Callable[..., Tensor]:
    """``vmap(grad(func), in_dims)`` with independent randomness per sample (dropout)."""
    return vmap(grad(func), in_dims=in_dims, randomness="different")
