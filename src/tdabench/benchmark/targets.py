"""Loss and target functions of the benchmark settings, as ``f(params, data)``.

``params`` is a ``{name: tensor}`` dict for :func:`torch.func.functional_call` (it may hold a
subset of the model's parameters; the rest come from the module), ``data`` a batch
``(inputs, labels)`` with a leading batch dimension. Every function returns the **mean over
the batch**, so on a batch of one sample it is that sample's value.

- classification: ``loss`` = cross-entropy; ``neg_loss`` = minus it; ``margin`` = logit of the
  true class minus the log-sum-exp of the other logits (= ``log p - log(1 - p)``).
- sequence (logits ``(B, T, V)``, labels ``(B, T)``): ``loss`` = mean next-token cross-entropy
  over the sequence's tokens; ``neg_loss`` = minus it; ``margin`` = the token margin averaged
  over the sequence's tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from tdabench.errors import ConfigError, ShapeError

__all__ = [
    "KINDS",
    "TARGETS",
    "make_loss_func",
    "make_probability_func",
    "make_target_func",
    "margin_from_logits",
]

KINDS = ("classification", "sequence")
TARGETS = ("loss", "margin", "neg_loss")

Func = Callable[[Mapping[str, Tensor], Any], Tensor]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ConfigError(f"kind must be one of {KINDS}, got {kind!r}")


def _logits(model: nn.Module, params: Mapping[str, Tensor], inputs: Tensor) -> Tensor:
    if inputs.is_floating_point():
        for p in params.values():
            if p.is_floating_point():
                inputs = inputs.to(p.dtype)
                break
    return functional_call(model, dict(params), (inputs,))


def _split(data: Any) -> tuple[Tensor, Tensor]:
    if not isinstance(data, (tuple, list)) or len(data) < 2:
        raise ShapeError("data must be a batch (inputs, labels); got " + type(data).__name__)
    return data[0], data[1]


def _token_ce(logits: Tensor, labels: Tensor, kind: str) -> Tensor:
    if kind == "classification":
        return F.cross_entropy(logits, labels)
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ShapeError(
            f"sequence logits must be (B, T, V) and labels (B, T); got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def margin_from_logits(logits: Tensor, labels: Tensor) -> Tensor:
    """``z_y - logsumexp_{c != y} z_c`` per row: logits ``(..., C)``, labels ``(...)`` -> ``(...)``."""
    true = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    # (no F.one_hot: it inspects label values, which torch.func.vmap cannot)
    is_true = torch.arange(logits.shape[-1], device=logits.device) == labels.unsqueeze(-1)
    others = logits.masked_fill(is_true, float("-inf")).logsumexp(dim=-1)
    return true - others


def make_loss_func(model: nn.Module, kind: str) -> Func:
    """The training loss ``f(params, data) -> scalar``: mean cross-entropy (classification) or
    mean next-token cross-entropy (sequence) over the batch."""
    _check_kind(kind)

    def loss(params: Mapping[str, Tensor], data: Any) -> Tensor:
        inputs, labels = _split(data)
        return _token_ce(_logits(model, params, inputs), labels, kind)

    return loss


def make_target_func(model: nn.Module, kind: str, name: str) -> Func:
    """A target ``f(params, data) -> scalar`` (mean over the batch): ``"loss"``, ``"neg_loss"`` or ``"margin"``.

    ``neg_loss`` and ``margin`` are higher-is-better (used for LDS ground truth).
    """
    _check_kind(kind)
    if name not in TARGETS:
        raise ConfigError(f"target name must be one of {TARGETS}, got {name!r}")
    loss = make_loss_func(model, kind)
    if name == "loss":
        return loss
    if name == "neg_loss":

        def neg_loss(params: Mapping[str, Tensor], data: Any) -> Tensor:
            return -loss(params, data)

        return neg_loss

    def margin(params: Mapping[str, Tensor], data: Any) -> Tensor:
        inputs, labels = _split(data)
        return margin_from_logits(_logits(model, params, inputs), labels).mean()

    return margin


def make_probability_func(model: nn.Module, kind: str) -> Func:
    """``f(params, data) -> scalar``: mean probability of the correct class (classification) or
    ``exp(-mean token cross-entropy)`` (sequence) -- TRAK's ``correct_probability_func``.

    Consistent with the ``"margin"`` target: for a single sample,
    ``margin = log(p / (1 - p))``.
    """
    _check_kind(kind)
    loss = make_loss_func(model, kind)

    if kind == "sequence":

        def seq_prob(params: Mapping[str, Tensor], data: Any) -> Tensor:
            return torch.exp(-loss(params, data))

        return seq_prob

    def prob(params: Mapping[str, Tensor], data: Any) -> Tensor:
        inputs, labels = _split(data)
        logp = torch.log_softmax(_logits(model, params, inputs), dim=-1)
        return logp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).exp().mean()

    return prob
