"""Which calling convention a user's ``loss_func(params, data)`` follows.

tdabench's own convention: ``data`` is a *batch* (a leading batch dimension) and the function
returns the mean over it; attributors call it on batches of one sample. dattri's convention:
``data`` is *one unbatched sample* (its attributors ``vmap`` over samples, and its users write
``image.unsqueeze(0)``). :class:`BatchLoss` turns either into batch semantics, so everything
downstream is written once:

- ``"batch"``: the function is called as it is;
- ``"sample"``: ``f(params, batch) = mean_i user(params, sample_i)`` with ``vmap`` over samples.

``"auto"`` (the default) decides on the first concrete batch the task sees
(:meth:`resolve`): it calls the function both ways. If exactly one works (and gives a scalar per
call), that is the convention. If both work and agree to 1e-5, the batch convention is used
(they are interchangeable on that data). If both work and disagree, :class:`ConfigError` asks
for ``AttributionTask(..., sample_mode="batch" | "sample")``: the result is never silently one
of two different numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from tdabench.errors import ConfigError

__all__ = ["SAMPLE_MODES", "BatchLoss"]

SAMPLE_MODES = ("auto", "batch", "sample")


def _in_dims(data: Any) -> Any:
    if isinstance(data, Tensor):
        return 0
    dims = [0 if isinstance(t, Tensor) else None for t in data]
    return tuple(dims) if isinstance(data, tuple) else dims


def _per_sample_mean(func: Callable[..., Tensor], params: Any, data: Any) -> Tensor:
    values = vmap(
        lambda s: func(params, s).reshape(()), in_dims=(_in_dims(data),), randomness="different"
    )(data)
    return values.mean()


def _attempt(call: Callable[[], Tensor]) -> tuple[Tensor | None, BaseException | None]:
    try:
        out = call()
    except Exception as exc:  # a convention that does not fit raises anything (shape, index, ...)
        return None, exc
    if not isinstance(out, Tensor) or out.numel() != 1:
        return None, ConfigError(
            f"returned {type(out).__name__} of shape "
            f"{tuple(getattr(out, 'shape', ()))}, not a scalar"
        )
    return out, None


class BatchLoss:
    """A user function with batch semantics whatever its convention (see the module docstring).

    Args:
        func: the user's ``f(params, data)``.
        mode: ``"auto"``, ``"batch"`` or ``"sample"``; shared by the loss and target of a task
            through ``state`` (a one-element list), so one decision covers both.
        what: ``"loss_func"`` or ``"target_func"`` (for messages).
    """

    def __init__(self, func: Callable[..., Tensor], state: list[str], what: str) -> None:
        self.func = func
        self.state = state
        self.what = what
        self.__name__ = getattr(func, "__name__", what)
        self.ggn_output = getattr(func, "ggn_output", None)

    @property
    def mode(self) -> str:
        return self.state[0]

    def resolve(self, params: Any, data: Any) -> str:
        """Decide ``"batch"`` or ``"sample"`` on concrete ``params`` and ``data`` (no-op once set)."""
        if self.mode != "auto":
            return self.mode
        with torch.no_grad():
            as_batch, err_b = _attempt(lambda: self.func(params, data))
            as_sample, err_s = _attempt(lambda: _per_sample_mean(self.func, params, data))
        if as_batch is not None and as_sample is not None:
            try:
                same = bool(torch.allclose(as_batch.reshape(()), as_sample, rtol=1e-5, atol=1e-7))
            except RuntimeError:  # under a function transform: no value comparison possible
                same = True
            if not same:
                raise ConfigError(
                    f"{self.what} gives {float(as_batch):.6g} on a batch but a per-sample mean of "
                    f"{float(as_sample):.6g} on the same data: it is unclear whether it takes a batch "
                    "(tdabench's convention) or one unbatched sample (dattri's); pass "
                    "AttributionTask(..., sample_mode='batch') or sample_mode='sample'"
                )
        if as_batch is not None:
            self.state[0] = "batch"
        elif as_sample is not None:
            self.state[0] = "sample"
        else:
            raise ConfigError(
                f"{self.what} fails on a batch ({type(err_b).__name__}: {err_b}) and on single "
                f"unbatched samples ({type(err_s).__name__}: {err_s}); it must return a scalar for "
                "data with a leading batch dimension (or, dattri's convention, for one sample)"
            ) from err_b
        return self.state[0]

    def __call__(self, params: Any, data: Any) -> Tensor:
        mode = self.mode if self.mode != "auto" else self.resolve(params, data)
        if mode == "batch":
            return self.func(params, data)
        return _per_sample_mean(self.func, params, data)
