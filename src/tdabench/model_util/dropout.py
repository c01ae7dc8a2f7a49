"""Dropout at attribution time: MC-dropout switches and dropout-mask ensembles.

* :func:`activate_dropout` puts a model in eval mode but keeps (some of) its dropout
  layers active, the usual way to sample sub-networks of one trained model.
* :func:`dropout_checkpoints` turns one trained model into ``num_models`` *deterministic*
  state dicts, each with a fixed dropout mask baked into its weights, so an ensemble
  method (TRAK, TracIn) can use them as ``AttributionTask(..., checkpoints=that_list)``
  without any randomness at attribution time.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from tdabench._compat import PUBLIC_DROPOUT_TYPES
from tdabench.errors import ConfigError

__all__ = ["DROPOUT_TYPES", "activate_dropout", "dropout_checkpoints", "dropout_masks"]

DROPOUT_TYPES: tuple[type[nn.Module], ...] = PUBLIC_DROPOUT_TYPES
"""Module types treated as dropout layers (torch's public dropout classes)."""

_MASKABLE = (nn.Linear, nn.Conv2d)


def _check_prob(p: float, name: str = "dropout_prob") -> float:
    if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0.0 <= float(p) < 1.0:
        raise ConfigError(f"{name} must be a float in [0, 1), got {p!r}")
    return float(p)


def activate_dropout(
    model: nn.Module,
    layer_positions: Sequence[int | str] | int | str | None = None,
    dropout_prob: float | None = None,
) -> nn.Module:
    """Put ``model`` in eval mode except the selected dropout layers (in train mode).

    Args:
        model: any module; changed in place and returned.
        layer_positions: which dropout layers to activate. ``None``: all of them. Ints index
            the list of dropout modules (types in :data:`DROPOUT_TYPES`) in
            ``model.named_modules()`` order (``0`` = the first dropout layer, negative
            indices count from the end); strings are module names as in
            ``named_modules()`` (e.g. ``"drop1"``, ``"blocks.0.dropout"``).
        dropout_prob: if given, set ``p`` of the activated layers to it (in ``[0, 1)``);
            ``None`` keeps each layer's ``p``.

    Returns:
        ``model``. Non-selected dropout layers, batch-norm, etc. are in eval mode.

    Raises:
        ConfigError: unknown positions/names, a name that is not a dropout layer, a model
            without dropout layers, or an invalid ``dropout_prob``.
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module, got {type(model).__name__}")
    if dropout_prob is not None:
        dropout_prob = _check_prob(dropout_prob)
    drops = [(name, m) for name, m in model.named_modules() if isinstance(m, DROPOUT_TYPES)]
    if not drops:
        raise ConfigError(
            f"{type(model).__name__} has no dropout layer ({', '.join(t.__name__ for t in DROPOUT_TYPES)}); "
            "add nn.Dropout modules to the model or use dropout_checkpoints to mask Linear layers"
        )
    names = [n for n, _ in drops]
    if layer_positions is None:
        selected = list(range(len(drops)))
    elif isinstance(layer_positions, (int, str)):
        selected = [_dropout_position(layer_positions, names)]
    else:
        selected = [_dropout_position(w, names) for w in layer_positions]
    model.eval()
    for i in sorted(set(selected)):
        m = drops[i][1]
        m.train()
        if dropout_prob is not None:
            m.p = dropout_prob
    return model


def _dropout_position(w: int | str, names: list[str]) -> int:
    """Index into ``names`` (the dropout modules in order) of a position or module name."""
    if isinstance(w, bool) or not isinstance(w, (int, str)):
        raise ConfigError(f"layer_positions entries must be ints or module names, got {w!r}")
    if isinstance(w, int):
        if not -len(names) <= w < len(names):
            raise ConfigError(
                f"dropout position {w} out of range: the model has {len(names)} dropout layers {names}"
            )
        return w % len(names)
    if w not in names:
        raise ConfigError(f"{w!r} is not a dropout module of the model; dropout modules: {names}")
    return names.index(w)


def _default_layers(model: nn.Module) -> list[str]:
    modules = list(model.named_modules())
    follows: list[str] = []
    pending = False
    for name, m in modules:
        if isinstance(m, DROPOUT_TYPES):
            pending = True
        elif pending and isinstance(m, _MASKABLE):
            follows.append(name)
            pending = False
    if any(isinstance(m, DROPOUT_TYPES) for _, m in modules):
        return follows
    linears = [name for name, m in modules if isinstance(m, nn.Linear)]
    return linears[1:]


def _member_generator(seed: int, k: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(k)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device="cpu").manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def dropout_masks(
    model: nn.Module,
    num_models: int,
    dropout_prob: float = 0.1,
    seed: int = 0,
    layer_names: Sequence[str] | None = None,
) -> list[dict[str, Tensor]]:
    """The input-feature masks used by :func:`dropout_checkpoints`.

    Args:
        model: the trained model (only its module structure is read).
        num_models: ensemble size.
        dropout_prob: ``p`` in ``[0, 1)``: the chance that a feature is dropped.
        seed: member ``k``'s masks depend only on ``(seed, k)``.
        layer_names: module names of the ``nn.Linear``/``nn.Conv2d`` layers to mask (``None``:
            the default selection of :func:`dropout_checkpoints`).

    Returns:
        ``num_models`` dicts ``{layer name: bool mask}``; the mask of an ``nn.Linear`` has
        shape ``(in_features,)``, of an ``nn.Conv2d`` ``(in_channels,)``. ``True`` = kept.
        Member ``k``'s masks depend only on ``(seed, k)``, the selected layers and their
        sizes: they are drawn, layer by layer in the order of ``layer_names`` (default:
        module order), from a ``torch.Generator`` seeded from ``(seed, k)``.
    """
    if not isinstance(num_models, int) or num_models < 1:
        raise ConfigError(f"num_models must be an int >= 1, got {num_models!r}")
    p = _check_prob(dropout_prob)
    modules = dict(model.named_modules())
    names = _masked_layers(model, modules, layer_names)
    sizes = {
        n: (modules[n].in_features if isinstance(modules[n], nn.Linear) else modules[n].in_channels)
        for n in names
    }
    out = []
    for k in range(num_models):
        gen = _member_generator(seed, k)
        out.append(
            {n: torch.rand(sizes[n], generator=gen, dtype=torch.float64) >= p for n in names}
        )
    return out


def _masked_layers(
    model: nn.Module, modules: dict[str, nn.Module], layer_names: Sequence[str] | str | None
) -> list[str]:
    """The names of the layers :func:`dropout_masks` masks (checked), in mask-drawing order."""
    if layer_names is None:
        names = _default_layers(model)
        if not names:
            candidates = [n for n, m in modules.items() if isinstance(m, _MASKABLE)]
            raise ConfigError(
                "no layer to mask by default (no Linear/Conv2d follows a dropout layer, and the model "
                f"has at most one Linear layer); pass layer_names=[...] from {candidates}"
            )
    else:
        names = [layer_names] if isinstance(layer_names, str) else list(layer_names)
        if not names:
            raise ConfigError(
                "layer_names is empty; pass None for the default selection or a list of layer names"
            )
        for n in names:
            if n not in modules:
                raise ConfigError(
                    f"layer {n!r} is not a module of the model; modules: {[m for m in modules if m][:30]}"
                )
            if not isinstance(modules[n], _MASKABLE):
                raise ConfigError(
                    f"layer {n!r} is a {type(modules[n]).__name__}; only nn.Linear and nn.Conv2d inputs can be masked"
                )
    return names


def _apply_mask(weight: Tensor, module: nn.Module, mask: Tensor, scale: float) -> Tensor:
    m = mask.to(device=weight.device, dtype=weight.dtype) * scale
    if isinstance(module, nn.Linear):
        return weight * m[None, :]
    # Conv2d weight: (out, in / groups, kh, kw); output channel o of group g reads input
    # channels g * (in / groups) + j.
    groups = module.groups
    out_c, in_per_group = weight.shape[0], weight.shape[1]
    per_out = m.reshape(groups, in_per_group).repeat_interleave(
        out_c // groups, dim=0
    )  # (out, in/groups)
    return weight * per_out[:, :, None, None]


# Spelled out: the arguments of dropout_masks, which it calls (each a public function)
def dropout_checkpoints(
    model: nn.Module,
    num_models: int,
    dropout_prob: float = 0.1,
    seed: int = 0,
    layer_names: Sequence[str] | None = None,
) -> list[dict[str, Tensor]]:
    """An ensemble of deterministic dropout "checkpoints" of one trained model.

    Member ``k`` applies a fixed Bernoulli(``1 - dropout_prob``) mask to the *input
    features* of each selected ``nn.Linear`` (input *channels* of each ``nn.Conv2d``),
    with inverted-dropout scaling ``1 / (1 - dropout_prob)``. The mask is baked into the
    weights (column ``j`` of the weight is multiplied by ``mask_j / (1 - p)``; the bias is
    unchanged), which is exactly a dropout mask on the layer input shared by every sample
    (and, for convolutions, by every spatial position). The model's ``nn.Dropout`` layers
    are untouched; evaluate the members in eval mode.

    Default selection (``layer_names=None``): walking ``model.named_modules()`` in order,
    the first ``nn.Linear``/``nn.Conv2d`` after each dropout layer (the layer a dropout
    in a ``Sequential`` feeds); if the model has no dropout layer, every ``nn.Linear``
    but the first (never the raw input features). Module order is registration order, not
    necessarily forward order: pass ``layer_names`` for models where they differ.

    Args:
        model: the trained model (not modified).
        num_models: ensemble size.
        dropout_prob: ``p`` in ``[0, 1)``.
        seed: member ``k`` depends only on ``(seed, k)`` (see :func:`dropout_masks`).
        layer_names: module names of the ``nn.Linear``/``nn.Conv2d`` layers to mask.

    Returns:
        ``num_models`` full state dicts (parameters and buffers, detached from ``model``)
        loadable with ``model.load_state_dict`` / usable as ``AttributionTask`` checkpoints.
        Unmasked entries are one shared copy across members (do not modify them in place).
    """
    masks = dropout_masks(model, num_models, dropout_prob, seed, layer_names)
    scale = 1.0 / (1.0 - float(dropout_prob))
    modules = dict(model.named_modules())
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = []
    for member in masks:
        sd = copy.copy(base)
        for name, mask in member.items():
            key = f"{name}.weight" if name else "weight"
            sd[key] = _apply_mask(base[key], modules[name], mask, scale)
        out.append(sd)
    return out
