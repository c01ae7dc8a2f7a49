"""Forward hooks on models (dattri's ``model_util.hook``): the final layer's inputs and outputs.

>>> import torch
>>> from torch import nn
>>> from torch.utils.data import DataLoader, TensorDataset
>>> model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
>>> loader = DataLoader(TensorDataset(torch.randn(5, 3), torch.zeros(5)), batch_size=2)
>>> feat, out = get_final_layer_io(model, "2", loader)
>>> tuple(feat.shape), tuple(out.shape)
((5, 4), (5, 2))
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from tdabench.errors import ConfigError, DataError

__all__ = ["get_final_layer_io"]


def _layer(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        names = [n for n, _ in model.named_modules() if n]
        raise ConfigError(f"the model has no layer {name!r}; its layers are {names}") from exc


def get_final_layer_io(
    model: nn.Module,
    final_linear_layer_name: str,
    dataloader: Iterable[Any],
    device: str | torch.device = "cpu",
) -> tuple[Tensor, Tensor]:
    """Inputs and outputs of one layer (typically the final linear layer) over a loader.

    The model runs in its current mode (call ``model.eval()`` first for deterministic
    features) under ``torch.no_grad()``; each batch's first element is the model input.

    Args:
        model: the model; its parameters must be on ``device``.
        final_linear_layer_name: the layer's name in ``model.named_modules()`` (dotted names work).
        dataloader: yields ``(inputs, ...)`` batches (or bare input tensors).
        device: where inputs are moved and the results are returned.

    Returns:
        ``(features, outputs)``: the layer's first input ``(n, m)`` and its output ``(n, c)``,
        stacked over every sample of the loader in order.

    Raises:
        ConfigError: unknown layer name, or the layer ran a number of times other than once
            per forward pass.
        DataError: the loader is empty.
    """
    layer = _layer(model, final_linear_layer_name)
    feats: list[Tensor] = []
    outs: list[Tensor] = []

    def hook(_module: nn.Module, inputs: tuple[Any, ...], output: Tensor) -> None:
        feats.append(inputs[0].detach())
        outs.append(output.detach())

    handle = layer.register_forward_hook(hook)
    try:
        with torch.no_grad():
            for batch in dataloader:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                before = len(feats)
                model(x.to(device))
                if len(feats) != before + 1:
                    raise ConfigError(
                        f"layer {final_linear_layer_name!r} ran {len(feats) - before} times in one forward pass; "
                        "name a layer that is called exactly once per forward"
                    )
    finally:
        handle.remove()
    if not feats:
        raise DataError("the dataloader is empty; pass a loader over at least one sample")
    return torch.cat(feats).to(device), torch.cat(outs).to(device)
