"""Parameter flattening and the one shared per-sample-gradient utility.

Data convention: a *batch* is a tensor or a tuple/list of tensors whose first dimension
is the batch dimension (what a ``DataLoader`` yields). User functions ``f(params, data)``
receive a batch; per-sample functions here call them on batches of size one, so the
same ``loss_func`` serves training (any batch size) and attribution (one sample).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, vmap

from tdabench.errors import ConfigError, DataError, NonFiniteError, ShapeError

__all__ = [
    "ParamSpec",
    "batch_size_of",
    "batch_slice",
    "batch_to",
    "check_finite",
    "concat_batches",
    "flatten_params",
    "iter_batches",
    "per_sample_grads",
    "per_sample_grads_named",
    "per_sample_values",
    "rechunk_batches",
    "select_param_names",
    "take_rows",
    "unflatten_params",
]


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and offsets of a set of named parameters in one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[torch.Size, ...]

    @classmethod
    def from_params(
        cls, params: Mapping[str, Tensor], names: Iterable[str] | None = None
    ) -> ParamSpec:
        """The spec of ``params`` (``{name: tensor}``), in ``names``' order (default: theirs)."""
        names = tuple(params) if names is None else tuple(names)
        return cls(names, tuple(params[n].shape for n in names))

    @property
    def numels(self) -> tuple[int, ...]:
        """Number of entries of each parameter, in order."""
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @property
    def dim(self) -> int:
        """Total number of scalar parameters ``d``."""
        return sum(self.numels)

    def flatten(self, params: Mapping[str, Tensor]) -> Tensor:
        """Concatenate ``params[name]`` for every name into a vector of shape ``(d,)``."""
        return torch.cat([params[n].reshape(-1) for n in self.names])

    def unflatten(self, vec: Tensor) -> dict[str, Tensor]:
        """Split a vector of shape ``(d,)`` into a ``{name: tensor}`` dict (views)."""
        if vec.dim() != 1 or vec.shape[0] != self.dim:
            raise ShapeError(
                f"expected a flat parameter vector of shape ({self.dim},), got {tuple(vec.shape)}; "
                "pass the vector returned by ParamSpec.flatten / AttributionTask.flat_params"
            )
        out: dict[str, Tensor] = {}
        offset = 0
        for name, shape, numel in zip(self.names, self.shapes, self.numels, strict=True):
            out[name] = vec[offset : offset + numel].view(shape)
            offset += numel
        return out

    def offsets(self, name: str) -> tuple[int, int]:
        """``(start, stop)`` of parameter ``name`` inside the flat vector."""
        offset = 0
        for n, numel in zip(self.names, self.numels, strict=True):
            if n == name:
                return offset, offset + numel
            offset += numel
        raise KeyError(name)


def flatten_params(params: Mapping[str, Tensor]) -> Tensor:
    """Flatten a ``{name: tensor}`` dict into one vector ``(d,)`` (in dict order), ``d`` the
    total number of entries."""
    return ParamSpec.from_params(params).flatten(params)


def unflatten_params(vec: Tensor, like: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten_params`: ``vec`` ``(d,)`` -> ``{name: tensor}`` shaped like ``like``."""
    return ParamSpec.from_params(like).unflatten(vec)


def select_param_names(
    all_names: Sequence[str], layer_name: str | Sequence[str] | None
) -> list[str]:
    """Resolve ``layer_name`` to parameter names.

    ``None`` selects every parameter. A string (or each string of a list) matches a
    parameter name exactly or a module prefix (``"fc2"`` selects ``fc2.weight`` and
    ``fc2.bias``). Unknown names raise :class:`ConfigError` listing what exists.
    """
    if layer_name is None:
        return list(all_names)
    wanted = [layer_name] if isinstance(layer_name, str) else list(layer_name)
    if not wanted:
        raise ConfigError("layer_name is an empty list; pass None to use every parameter")
    selected: list[str] = []
    for w in wanted:
        hits = [n for n in all_names if n == w or n.startswith(w + ".")]
        if not hits:
            raise ConfigError(
                f"layer_name {w!r} matches no parameter of the model; "
                f"available parameters: {list(all_names)}"
            )
        selected.extend(h for h in hits if h not in selected)
    return [n for n in all_names if n in selected]  # keep model order


Batch = Any  # Tensor | tuple[Tensor, ...] | list[Tensor]


def _tensors(batch: Batch) -> list[Tensor]:
    if isinstance(batch, Tensor):
        return [batch]
    if isinstance(batch, (tuple, list)):
        return [t for t in batch if isinstance(t, Tensor)]
    raise DataError(
        f"a batch must be a tensor or a tuple/list of tensors, got {type(batch).__name__}; "
        "make the DataLoader yield (inputs, labels) tensors"
    )


def batch_size_of(batch: Batch) -> int:
    """Leading dimension shared by every tensor of ``batch``."""
    ts = _tensors(batch)
    if not ts:
        raise DataError("a batch holds no tensor; make the DataLoader yield tensors")
    sizes = {int(t.shape[0]) if t.dim() > 0 else -1 for t in ts}
    if len(sizes) != 1 or -1 in sizes:
        raise ShapeError(
            f"every tensor of a batch needs the same leading (batch) dimension, got sizes {sorted(sizes)}"
        )
    return sizes.pop()


def batch_to(
    batch: Batch, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> Batch:
    """Move a batch to ``device``; floating tensors are cast to ``dtype`` when given."""

    def move(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            return t.to(device=device, dtype=dtype)
        return t.to(device=device)

    if isinstance(batch, Tensor):
        return move(batch)
    return (
        type(batch)(move(t) for t in batch)
        if isinstance(batch, tuple)
        else [move(t) for t in batch]
    )


def batch_slice(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``[start, stop)`` of every tensor of ``batch`` (views; other items kept as they are)."""
    if isinstance(batch, Tensor):
        return batch[start:stop]
    items = [t[start:stop] if isinstance(t, Tensor) else t for t in batch]
    return type(batch)(items) if isinstance(batch, tuple) else items


def iter_batches(loader: Iterable[Batch], what: str = "data loader") -> Iterable[Batch]:
    """Iterate over ``loader``, raising :class:`DataError` if it yields nothing."""
    n = 0
    for batch in loader:
        n += 1
        yield batch
    if n == 0:
        raise DataError(f"the {what} is empty; pass a DataLoader over at least one sample")


def same_samples(a: Any, b: Any) -> bool:
    """Whether two loaders yield the same samples in the same order: the same object, or two
    ``DataLoader`` s over the same dataset object, both sequential (unshuffled), neither dropping
    a last batch, with the same collate function (their batch sizes may differ)."""
    if a is b:
        return True
    from torch.utils.data import DataLoader, SequentialSampler

    if not (isinstance(a, DataLoader) and isinstance(b, DataLoader)):
        return False
    return (
        a.dataset is b.dataset
        and isinstance(a.sampler, SequentialSampler)
        and isinstance(b.sampler, SequentialSampler)
        and not a.drop_last
        and not b.drop_last
        and a.collate_fn is b.collate_fn
    )


def _in_dims(batch: Batch) -> Any:
    if isinstance(batch, Tensor):
        return 0
    return (
        type(batch)(0 if isinstance(t, Tensor) else None for t in batch)
        if isinstance(batch, tuple)
        else [0 if isinstance(t, Tensor) else None for t in batch]
    )


def _as_batch_of_one(sample: Batch) -> Batch:
    if isinstance(sample, Tensor):
        return sample.unsqueeze(0)
    out = [t.unsqueeze(0) if isinstance(t, Tensor) else t for t in sample]
    return tuple(out) if isinstance(sample, tuple) else out


def per_sample_values(
    func: Callable[[Tensor, Batch], Tensor], flat: Tensor, batch: Batch
) -> Tensor:
    """``func(flat, sample)`` for every sample of ``batch`` (each as a batch of one): ``(B,)``."""

    def one(p: Tensor, sample: Batch) -> Tensor:
        return func(p, _as_batch_of_one(sample)).reshape(())

    return vmap(one, in_dims=(None, _in_dims(batch)), randomness="different")(flat, batch)


def per_sample_grads(func: Callable[[Tensor, Batch], Tensor], flat: Tensor, batch: Batch) -> Tensor:
    """Per-sample gradients of a scalar ``func(flat, sample)`` w.r.t. ``flat``.

    Args:
        func: scalar function of a flat parameter vector ``(d,)`` and a batch of one sample.
        flat: parameters, shape ``(d,)``.
        batch: a batch of ``B`` samples.

    Returns:
        Tensor of shape ``(B, d)``: row ``b`` is the gradient for sample ``b``.
    """

    def one(p: Tensor, sample: Batch) -> Tensor:
        return func(p, _as_batch_of_one(sample)).reshape(())

    return vmap(grad(one), in_dims=(None, _in_dims(batch)), randomness="different")(flat, batch)


def per_sample_grads_named(
    func: Callable[[dict[str, Tensor], Batch], Tensor],
    params: Mapping[str, Tensor],
    batch: Batch,
    as_blocks: bool = False,
) -> Tensor | list[Tensor]:
    """Per-sample gradients w.r.t. a ``{name: tensor}`` dict, flattened to ``(B, d)``.

    Same result as :func:`per_sample_grads` on the flattened parameters, but the gradient is
    taken w.r.t. each tensor separately and concatenated once: differentiating through
    slices of one flat vector makes every slice's backward write a full ``d``-vector per
    sample, several times slower for models with many parameter tensors.

    With ``as_blocks=True`` the per-parameter pieces are returned unconcatenated: a list of
    ``(B, d_p)`` tensors in ``params`` order whose column-wise concatenation is the ``(B, d)``
    result (consumers such as a projector can use them without the copy).
    """
    names = list(params)

    def one(p: dict[str, Tensor], sample: Batch) -> Tensor:
        return func(p, _as_batch_of_one(sample)).reshape(())

    grads = vmap(grad(one), in_dims=(None, _in_dims(batch)), randomness="different")(
        dict(params), batch
    )
    blocks = [grads[n].reshape(grads[n].shape[0], -1) for n in names]
    return blocks if as_blocks else torch.cat(blocks, dim=1)


def check_finite(
    t: Tensor, what: str, fix: str = "check the model, the data and the learning rate"
) -> Tensor:
    """``t`` (any shape, rows along dim 0) unchanged if finite.

    Raises:
        NonFiniteError: ``t`` holds NaN/inf; names ``what``, the offending rows and ``fix``.
    """
    if t.is_floating_point() and bool(torch.isfinite(t.sum())):
        return t  # fast path: a NaN/inf anywhere makes the sum non-finite
    finite = torch.isfinite(t)
    if not bool(finite.all()):
        bad = (
            (~finite).reshape(t.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
            if t.dim() > 0
            else []
        )
        raise NonFiniteError(f"{what} contains NaN or inf (rows {bad[:10]}); {fix}")
    return t


def take_rows(batch: Batch, index: Tensor | slice) -> Batch:
    """Rows ``index`` of every tensor of ``batch`` (same structure): ``(B, ...)`` -> ``(b, ...)``."""
    if isinstance(batch, Tensor):
        return batch[index]
    rows = [t[index] for t in batch]
    return tuple(rows) if isinstance(batch, tuple) else rows


def concat_batches(batches: Sequence[Batch]) -> Batch:
    """Concatenate batches of one structure along the batch dimension.

    Raises:
        DataError: the batches do not share one structure.
    """
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(list(batches), dim=0)
    try:
        cols = [torch.cat([b[c] for b in batches], dim=0) for c in range(len(first))]
    except (RuntimeError, IndexError, TypeError) as exc:
        raise DataError(
            f"the cached training batches do not share one structure ({exc}); make every batch of the "
            "cache loader a tuple of tensors with the same trailing shapes"
        ) from exc
    return tuple(cols) if isinstance(first, tuple) else cols


def rechunk_batches(batches: Sequence[Batch], size: int) -> list[Batch]:
    """The samples of ``batches`` regrouped into consecutive chunks of at most ``size``."""
    pool = concat_batches(batches)
    n = sum(batch_size_of(b) for b in batches)
    return [take_rows(pool, slice(s, min(n, s + size))) for s in range(0, n, size)]


# ---------------------------------------------------------------------------------------------
# dattri 0.3.0 names (func.utils): flatten_func, partial_param, get_parameter_chunk_sizes.
# ``flatten_params`` above already has dattri's semantics (dict order, one flat vector).
# ---------------------------------------------------------------------------------------------
def _trainable_spec(model: torch.nn.Module) -> ParamSpec:
    """ParamSpec of the parameters of ``model`` that require a gradient (model order)."""
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}
    if not named:
        raise ConfigError(
            "the model has no parameter with requires_grad=True; flatten_func has nothing to unflatten"
        )
    return ParamSpec.from_params(named)


def _unflatten_arg(arg: Any, spec: ParamSpec) -> dict[str, Tensor]:
    if isinstance(arg, Mapping):
        return dict(arg)  # already named: pass it through unchanged
    if isinstance(arg, (tuple, list)):
        if len(arg) != len(spec.names):
            raise ShapeError(
                f"flatten_func got a tuple of {len(arg)} tensors but the model has {len(spec.names)} trainable "
                "parameter tensors; pass one tensor per parameter (model order) or one flat vector"
            )
        return {n: t.reshape(s) for n, t, s in zip(spec.names, arg, spec.shapes, strict=True)}
    if not isinstance(arg, Tensor):
        raise ConfigError(
            f"flatten_func expected a flat parameter tensor, got {type(arg).__name__}"
        )
    return spec.unflatten(arg)


def flatten_func(
    model: torch.nn.Module, param_num: int = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: let a function of named parameters take one flat parameter vector.

    ``flatten_func(model)(f)`` is ``g`` with ``g(flat, *rest) == f(unflatten(flat), *rest)``,
    where the flat vector of shape ``(d,)`` concatenates the model's trainable parameters in
    ``model.named_parameters()`` order (the inverse of :func:`flatten_params` on them). A tuple
    of per-parameter tensors (layer-wise form) and a ``{name: tensor}`` dict are accepted too.

    Args:
        model: the model whose trainable parameters give names and shapes.
        param_num: position of the parameter argument in the wrapped function's arguments.

    Returns:
        A decorator ``Callable -> Callable``.
    """
    import functools

    spec = _trainable_spec(model)

    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def flattened(*args: Any, **kwargs: Any) -> Any:
            if param_num >= len(args):
                raise ConfigError(
                    f"flatten_func(param_num={param_num}) but the function got {len(args)} positional arguments"
                )
            new_args = list(args)
            new_args[param_num] = _unflatten_arg(args[param_num], spec)
            return function(*new_args, **kwargs)

        return flattened

    return decorator


def partial_param(
    full_param: Mapping[str, Tensor], layer_name: Sequence[str], param_num: int = 0
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator: let a function of the full flat parameters take only some layers' parameters.

    ``partial_param(full, ["fc.weight", "fc.bias"])(f)`` is ``g`` with ``g(part, *rest) ==
    f(flatten_params(full with those entries replaced by slices of part), *rest)``: ``part``
    of shape ``(d_part,)`` concatenates the named parameters in the order of ``layer_name``;
    every other parameter keeps its value in ``full_param``. ``full_param`` is not modified.

    Args:
        full_param: every parameter, ``{name: tensor}`` (its order defines the flat layout).
        layer_name: names of the parameters that become the function's input.
        param_num: position of the parameter argument in the wrapped function's arguments.

    Returns:
        A decorator ``Callable -> Callable``.
    """
    names = [layer_name] if isinstance(layer_name, str) else list(layer_name)
    missing = [n for n in names if n not in full_param]
    if missing:
        raise ConfigError(
            f"partial_param: {missing} are not in full_param (available: {list(full_param)})"
        )
    base = dict(full_param)
    sizes = [int(base[n].numel()) for n in names]
    import functools

    def decorator(function: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(function)
        def partial(*args: Any, **kwargs: Any) -> Any:
            part = args[param_num]
            if part.dim() != 1 or part.shape[0] != sum(sizes):
                raise ShapeError(
                    f"partial_param expected a vector of shape ({sum(sizes)},), got {tuple(part.shape)}"
                )
            params = dict(base)
            for n, piece in zip(names, torch.split(part, sizes), strict=True):
                params[n] = piece.reshape(base[n].shape)
            new_args = list(args)
            new_args[param_num] = flatten_params(params)
            return function(*new_args, **kwargs)

        return partial

    return decorator


def get_parameter_chunk_sizes(
    param_shape_list: Sequence[int], batch_size: int
) -> tuple[int, list[int]]:
    """Group parameter counts into chunks a 32-bit-indexed projection kernel can address.

    A chunk holds at most ``max_chunk_size = (2**32 - 1) // (2 * batch_size)`` parameters
    (so ``batch_size`` rows of one chunk, doubled for the projection's workspace, stay
    below ``2**32``). Consecutive counts are summed greedily; a chunk is closed before a count
    that would reach the limit, and a count of ``max_chunk_size`` or more is split into full
    chunks plus its remainder.

    Args:
        param_shape_list: number of features (parameters) of each block, e.g. per module.
        batch_size: rows projected at once, ``>= 1``.

    Returns:
        ``(max_chunk_size, params_per_chunk)``; ``params_per_chunk`` is ``[0]`` when there is
        nothing to chunk.
    """
    if isinstance(batch_size, bool) or int(batch_size) < 1:
        raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
    max_chunk = (2**32 - 1) // (int(batch_size) * 2)
    chunks: list[int] = []
    acc = 0
    for count in (int(c) for c in param_shape_list):
        if acc + count >= max_chunk and acc > 0:
            chunks.append(acc)
            acc = 0
        full, count = divmod(count, max_chunk) if count >= max_chunk else (0, count)
        chunks.extend([max_chunk] * full)
        acc += count
    if acc > 0:
        chunks.append(acc)
    return max_chunk, chunks or [0]


__all__ += ["flatten_func", "get_parameter_chunk_sizes", "partial_param"]
