"""Per-sample layer inputs and output gradients from module hooks (Linear and Conv2d).

Kronecker-factored curvature (K-FAC, EK-FAC) and factorised gradient projections (LoGra,
FactGraSS) never need a full per-sample gradient: for a layer ``s = W a (+ b)`` the gradient of
sample ``i``'s loss with respect to ``W`` is a sum over *positions* ``t`` (tokens of a sequence,
spatial locations of a convolution, 1 for a plain vector input) of outer products::

    ∂L_i/∂W̃ = Σ_t g_{i,t} a_{i,t}ᵀ          W̃ = [W | b]  (d_out, d_in + 1 with a bias)

with ``a_{i,t}`` the layer input (plus a trailing ``1`` when the layer has a bias) and
``g_{i,t} = ∂L_i/∂s_{i,t}`` the gradient of the *per-sample* loss with respect to the layer's
pre-activation output. This module records ``a`` and ``g`` for selected modules during one
forward/backward pass of a batch.

Shapes (``B`` samples, ``T`` positions, ``d_in``/``d_out`` the layer's widths):

* ``nn.Linear`` on ``(B, d_in)``: ``a`` ``(B, 1, d_in [+1])``, ``g`` ``(B, 1, d_out)``.
* ``nn.Linear`` on ``(B, T, d_in)`` (sequence models; more middle dimensions are flattened into
  ``T``): ``a`` ``(B, T, d_in [+1])``, ``g`` ``(B, T, d_out)`` -- the token axis is kept.
* ``nn.Conv2d`` (``groups=1``, zero padding): the input is unfolded into patches (``F.unfold``),
  ``T = H_out · W_out``, ``a`` ``(B, T, C_in·k_h·k_w [+1])``, ``g`` ``(B, T, C_out)``; the weight
  matrix is ``weight.reshape(C_out, -1)``, in the same column order as the patches.
* A module called several times in one forward (weight sharing) gets its calls concatenated
  along ``T``, which keeps the sum over positions equal to the per-sample gradient.

Other module types (and grouped or non-zero-padded convolutions) are skipped with a logged
notice by :func:`select_modules`.

**Per-sample scale.** A loss function in this library returns the batch *mean*
(``loss_func(params, data)``; see :class:`~tdabench.task.AttributionTask`), so the gradient of
the batch loss with respect to ``s_{i,t}`` is ``(1/B) ∂L_i/∂s_{i,t}``. :func:`capture` therefore
differentiates ``B · loss`` (``scale=B``): the captured ``g`` is the gradient of each sample's
own loss. A function that returns the batch *sum* needs ``scale=1``. For a sequence loss that is
the mean over ``B · T`` tokens, ``B · loss`` is the sum over samples of each sample's mean over
its tokens (with ``T`` equal for every sample).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tdabench.errors import ConfigError, ShapeError

__all__ = [
    "SUPPORTED_MODULES",
    "LayerIO",
    "ModuleCapture",
    "capture",
    "capture_task",
    "layer_param_names",
    "select_modules",
]

logger = logging.getLogger(__name__)

SUPPORTED_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerIO:
    """What one module saw for one batch.

    Attributes:
        a: layer inputs ``(B, T, d_in')``, with a trailing column of ones when the layer has a
            bias (``d_in' = d_in + 1``), else ``d_in' = d_in``.
        g: gradients of each sample's own loss with respect to the layer's pre-activation
            outputs, ``(B, T, d_out)``.
    """

    a: Tensor
    g: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.a.shape[0])

    def per_sample_grad(self) -> Tensor:
        """``Σ_t g_t a_tᵀ``: per-sample gradients of ``W̃ = [W | b]``, shape ``(B, d_out, d_in')``."""
        return torch.einsum("bto,bti->boi", self.g, self.a)


def _conv_supported(m: nn.Conv2d) -> str | None:
    if m.groups != 1:
        return f"groups={m.groups}"
    if m.padding_mode != "zeros":
        return f"padding_mode={m.padding_mode!r}"
    if isinstance(m.padding, str) and m.padding != "valid":
        return f"padding={m.padding!r}"
    return None


def select_modules(
    model: nn.Module, module_name: str | Sequence[str] | None = None
) -> dict[str, nn.Module]:
    """The modules to capture, by ``model.named_modules()`` name, in model order.

    Args:
        model: the network.
        module_name: a module name, a list of them, or ``None`` for every supported module
            (``nn.Linear`` and ``nn.Conv2d``).

    Returns:
        ``{name: module}`` of the supported ones; unsupported ones are skipped with a logged
        notice (an info for ``None``, a warning for an explicitly named module).

    Raises:
        ConfigError: a name is not a module of ``model``, or nothing supported remains.
    """
    named = dict(model.named_modules())
    if module_name is None:
        wanted, explicit = [n for n, m in named.items() if not list(m.children())], False
    else:
        wanted = [module_name] if isinstance(module_name, str) else list(module_name)
        explicit = True
        unknown = [n for n in wanted if n not in named]
        if unknown:
            raise ConfigError(
                f"module_name {unknown} not found in the model; valid names are those of "
                f"model.named_modules(), e.g. {[n for n in named if n][:8]}"
            )
    out: dict[str, nn.Module] = {}
    params = {n for n, _ in model.named_parameters()}
    for name in wanted:
        m = named[name]
        why = (
            None
            if isinstance(m, nn.Linear)
            else _conv_supported(m)
            if isinstance(m, nn.Conv2d)
            else type(m).__name__
        )
        if why is None and not set(layer_param_names(name, m)) <= params:
            why = "its weight is shared with (tied to) another module's parameter"
        if why is None:
            out[name] = m
        elif explicit or any(True for _ in m.parameters(recurse=False)):
            (logger.warning if explicit else logger.info)(
                "module %r (%s) is skipped: only nn.Linear and nn.Conv2d (groups=1, zero padding, own parameters) "
                "are supported",
                name,
                why,
            )
    if not out:
        raise ConfigError(
            f"no nn.Linear or nn.Conv2d module selected (module_name={module_name!r}); name at least one such module"
        )
    return out


def layer_param_names(name: str, module: nn.Module) -> list[str]:
    """Parameter names of a captured module in flat order: ``name.weight`` then ``name.bias``."""
    out = [f"{name}.weight" if name else "weight"]
    if getattr(module, "bias", None) is not None:
        out.append(f"{name}.bias" if name else "bias")
    return out


def _unfold(m: nn.Conv2d, x: Tensor) -> Tensor:
    """Patches of ``x`` ``(B, C, H, W)`` as ``(B, T, C·k_h·k_w)``."""
    if x.dim() != 4:
        raise ShapeError(
            f"Conv2d capture expects (B, C, H, W) inputs, got {tuple(x.shape)}; pass batched images"
        )
    padding = 0 if isinstance(m.padding, str) else m.padding
    cols = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)
    return cols.transpose(1, 2)


def _as_positions(t: Tensor, what: str) -> Tensor:
    if t.dim() < 2:
        raise ShapeError(
            f"{what} of shape {tuple(t.shape)} has no batch dimension; capture needs batched inputs"
        )
    return t.reshape(t.shape[0], -1, t.shape[-1])


class ModuleCapture:
    """Context manager that records each selected module's inputs and outputs during a forward.

    Use :func:`capture` unless you need the hooks yourself: inside the ``with`` block, run a
    forward; then :meth:`collect` differentiates a loss with respect to the recorded outputs.

    Args:
        modules: ``{name: module}`` from :func:`select_modules`.
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self._inputs: dict[str, list[Tensor]] = {}
        self._outputs: dict[str, list[Tensor]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _hook(self, name: str) -> Callable[[nn.Module, tuple[Tensor, ...], Tensor], None]:
        def hook(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0].detach()
            if isinstance(module, nn.Conv2d):
                a = _unfold(module, x)
            else:
                a = _as_positions(x, f"input of {name!r}")
            if module.bias is not None:
                a = torch.cat([a, a.new_ones(*a.shape[:-1], 1)], dim=-1)
            self._inputs.setdefault(name, []).append(a)
            self._outputs.setdefault(name, []).append(output)

        return hook

    def __enter__(self) -> ModuleCapture:
        self._inputs, self._outputs = {}, {}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def collect(self, loss: Tensor, scale: float) -> dict[str, LayerIO]:
        """``{name: LayerIO}`` with ``g = ∂(scale · loss)/∂s`` for every recorded call.

        Raises:
            ConfigError: a selected module was not called, or its output does not depend on
                anything that requires a gradient.
        """
        missing = [n for n in self.modules if n not in self._outputs]
        if missing:
            raise ConfigError(
                f"modules {missing} were not called by the forward pass; select modules the model uses"
            )
        names = list(self.modules)
        outs = [s for n in names for s in self._outputs[n]]
        if not all(s.requires_grad for s in outs):
            raise ConfigError(
                "a captured layer output does not require a gradient: make the captured modules' parameters "
                "require grad (capture_task does) and do not run the forward under torch.no_grad()"
            )
        grads = torch.autograd.grad(loss * scale, outs, allow_unused=True)
        result: dict[str, LayerIO] = {}
        k = 0
        for n in names:
            gs = []
            for s in self._outputs[n]:
                g = grads[k] if grads[k] is not None else torch.zeros_like(s)
                k += 1
                if isinstance(self.modules[n], nn.Conv2d):  # (B, C_out, H, W) -> (B, T, C_out)
                    g = g.flatten(2).transpose(1, 2)
                gs.append(_as_positions(g.detach(), f"output gradient of {n!r}"))
            result[n] = LayerIO(a=torch.cat(self._inputs[n], dim=1), g=torch.cat(gs, dim=1))
        self._inputs, self._outputs = {}, {}
        return result


def capture(
    modules: Mapping[str, nn.Module], closure: Callable[[], Tensor], scale: float
) -> dict[str, LayerIO]:
    """Run ``closure()`` (a forward returning a scalar loss) and capture ``a``/``g`` of ``modules``.

    Args:
        modules: ``{name: module}`` (see :func:`select_modules`).
        closure: runs the forward pass of one batch and returns its scalar loss.
        scale: multiplies the loss before differentiating; ``B`` for a batch-mean loss so that
            ``g`` is the gradient of each sample's own loss (see the module docstring).

    Returns:
        ``{name: LayerIO}`` with ``a`` ``(B, T, d_in')`` and ``g`` ``(B, T, d_out)``.
    """
    with ModuleCapture(modules) as cap:
        loss = closure()
    if loss.dim() != 0:
        raise ShapeError(f"the loss closure must return a scalar, got shape {tuple(loss.shape)}")
    return cap.collect(loss, scale)


def capture_task(
    task: object,
    batch: object,
    modules: Mapping[str, nn.Module],
    which: str = "loss",
    index: int = 0,
    device: torch.device | str | None = None,
    func: Callable[[dict[str, Tensor], object], Tensor] | None = None,
) -> dict[str, LayerIO]:
    """:func:`capture` of a task's batch-mean loss (or target) at checkpoint ``index``.

    Args:
        task: an :class:`~tdabench.task.AttributionTask`.
        batch: a batch (tuple of tensors with a leading batch dimension) on ``device``.
        modules: modules of ``task.model`` (see :func:`select_modules`).
        which: ``"loss"`` (``task.loss_func``) or ``"target"`` (``task.target_func``).
        index: checkpoint index.
        device: where the parameters go (default: where they are).
        func: replaces the task's function; ``func(params, batch)`` must return the batch mean
            (e.g. a loss on labels sampled from the model, for the true Fisher).

    Returns:
        ``{name: LayerIO}`` for every module; ``g`` is per sample (the batch-mean is scaled by ``B``).
    """
    from tdabench.func.utils import batch_size_of

    if func is None:
        if which not in ("loss", "target"):
            raise ConfigError(f"which must be 'loss' or 'target', got {which!r}")
        func = task.loss_func if which == "loss" else task.target_func  # type: ignore[attr-defined]
    resolve = getattr(task, "resolve_sample_mode", None)
    if resolve is not None and resolve(batch, index) == "sample":  # decided outside the hooks
        raise ConfigError(
            "layer hooks need a loss_func that takes a batch (tdabench's convention); this task's "
            "loss_func takes one unbatched sample (dattri's convention): write it for a batch "
            "(returning the batch mean), or use a gradient-based attributor"
        )
    need = {p for n, m in modules.items() for p in layer_param_names(n, m)}
    params = {
        n: p.detach().to(device).requires_grad_(n in need)
        for n, p in task.get_params(index).items()  # type: ignore[attr-defined]
    }
    return capture(modules, lambda: func(params, batch), float(batch_size_of(batch)))


def iter_capture(
    task: object,
    batches: Iterable[object],
    modules: Mapping[str, nn.Module],
    which: str = "loss",
    index: int = 0,
    device: torch.device | str | None = None,
) -> Iterable[dict[str, LayerIO]]:
    """:func:`capture_task` for each batch of ``batches`` (streaming; nothing kept)."""
    for batch in batches:
        yield capture_task(task, batch, modules, which, index, device)
