"""Build an attributor from its config: what it needs is read from the class, not its name.

A config holds ``method`` (a class of :mod:`tdabench.algorithm`) and ``params``. Whatever a
config cannot hold is supplied according to the constructor's declared parameters:

* ``projector_kwargs`` -- the projector keys found in ``params`` (``proj_dim``, ...);
* ``weight_list`` -- one weight per checkpoint: the recipe's learning rate (TracIn);
* ``correct_probability_func`` -- :func:`~tdabench.benchmark.targets.make_probability_func`;
* ``final_linear_layer_name`` -- ``layer_name`` or the model's last ``nn.Linear`` (RPS);
* ``layer_name`` -- the config's ``layer_name`` (``layer_names`` for LoGra / FactGraSS, ``module_name`` for EK-FAC).

Every remaining key of ``params`` must be a constructor parameter: an unknown one is a
:class:`~tdabench.errors.ConfigError` naming the valid keys, raised before any work. Where the
method declares an argument dataclass (:mod:`tdabench.algorithm.arguments`), the arguments are
validated through it and its ``to_dict()`` is the provenance written next to the scores.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

import tdabench.algorithm as algorithm
from tdabench.algorithm.arguments import arguments_for
from tdabench.benchmark.targets import make_probability_func
from tdabench.errors import ConfigError
from tdabench.func.projection import PROJECTOR_KWARGS

__all__ = [
    "MAX_PASSES",
    "PROJECTOR_KEYS",
    "WARN_PASSES",
    "attributor_arguments",
    "check_work",
    "make_attributor",
    "resolve_class",
]

logger = logging.getLogger(__name__)

#: ``params`` keys that configure the random projector (go into ``projector_kwargs``).
PROJECTOR_KEYS = PROJECTOR_KWARGS

#: Constructor parameters the pipeline supplies itself (never from ``params``).
_SUPPLIED = ("self", "task", "device")


def resolve_class(method: str) -> type:
    """The attributor class named ``method`` (ConfigError naming the known ones)."""
    cls = getattr(algorithm, method, None)
    if cls is None or not isinstance(cls, type):
        known = sorted(n for n in dir(algorithm) if n.endswith("Attributor"))
        raise ConfigError(f"unknown attributor method {method!r}; use one of {known}")
    return cls


def _declared(cls: type) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(cls.__init__).parameters)


def _final_linear(model: nn.Module, layer_name: Any) -> str:
    if layer_name:
        return str(layer_name)
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(
            f"{type(model).__name__} has no nn.Linear layer for RPS; set layer_name in the "
            "attributor config to its final linear layer"
        )
    return linears[-1]


def attributor_arguments(
    a: Mapping[str, Any], model: nn.Module, setting: Any, num_ckpts: int
) -> tuple[type, dict[str, Any]]:
    """The class and constructor keyword arguments (besides ``task`` and ``device``) of ``a``.

    Raises:
        ConfigError: an unknown method or parameter (naming the valid keys), ``cache_params``
            (no ``cache()`` takes any), or an invalid value (via the declared arguments).
    """
    cls = resolve_class(a["method"])
    declared = _declared(cls)
    if a.get("cache_params"):
        raise ConfigError(
            f"cache_params {sorted(a['cache_params'])}: {cls.__name__}.cache() takes only the "
            "train loader; remove cache_params"
        )
    params = dict(a["params"])
    kwargs: dict[str, Any] = {}
    if "projector_kwargs" in declared:
        proj = {k: params.pop(k) for k in PROJECTOR_KEYS if k in params}
        if proj:
            kwargs["projector_kwargs"] = proj
    if "weight_list" in declared and "weight_list" not in params:
        kwargs["weight_list"] = [float(setting.recipe["lr"])] * num_ckpts
    if "final_linear_layer_name" in declared:
        kwargs["final_linear_layer_name"] = _final_linear(model, a.get("layer_name"))
    elif "layer_name" in declared:
        kwargs["layer_name"] = a.get("layer_name")
    elif "layer_names" in declared:  # LoGra / FactGraSS (dattri's name): module names
        kwargs["layer_names"] = a.get("layer_name")
    elif "module_name" in declared:  # EK-FAC/K-FAC: dattri names its layer selection module_name
        kwargs["module_name"] = a.get("layer_name")
    allowed = sorted(set(declared) - set(_SUPPLIED) - set(kwargs) - {"correct_probability_func"})
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        proj = set(PROJECTOR_KEYS) if "projector_kwargs" in declared else set()
        raise ConfigError(
            f"unknown parameter(s) {unknown} for {cls.__name__}; valid keys: "
            f"{sorted(set(allowed) | proj)}; fix params in the attributor's config"
        )
    kwargs.update(params)
    _validate_declared(cls, kwargs)
    return cls, kwargs


#: Passes over the training set per inverse-HVP beyond which a LiSSA configuration is refused
#: (``recursion_depth * num_repeat * batch_size / n_train``), and beyond which it is warned about.
MAX_PASSES = 1e4
WARN_PASSES = 100.0


def check_work(kwargs: Mapping[str, Any], n_train: int, what: str) -> list[str]:
    """Estimate the work a method's arguments ask for; refuse the absurd, warn about the large.

    Returns:
        Warnings (also logged).

    Raises:
        ConfigError: more than :data:`MAX_PASSES` passes over the training data per solve.
    """
    depth = kwargs.get("recursion_depth")
    if depth is None:
        return []
    samples = float(depth) * float(kwargs.get("num_repeat", 1)) * float(kwargs.get("batch_size", 1))
    passes = samples / max(n_train, 1)
    suggest = max(1, int(WARN_PASSES * n_train / max(kwargs.get("batch_size", 1), 1)))
    if passes > MAX_PASSES:
        raise ConfigError(
            f"{what}: recursion_depth={depth:g} means {passes:.3g} passes over the {n_train} "
            f"training samples per inverse-HVP (recursion_depth x num_repeat x batch_size / "
            f"n_train); lower recursion_depth (e.g. to {suggest} or less)"
        )
    if passes > WARN_PASSES:
        msg = f"{what}: recursion_depth={depth:g} means {passes:.3g} passes over the training set"
        logger.warning("%s; this will be slow", msg)
        return [msg]
    return []


def _validate_declared(cls: type, kwargs: Mapping[str, Any]) -> dict[str, Any] | None:
    """Validate through the method's argument dataclass (:mod:`tdabench.algorithm.arguments`);
    a class without registered arguments is validated by its constructor alone."""
    try:
        args_cls = arguments_for(cls)
    except ConfigError:
        return None
    keys = set(args_cls.keys())
    return args_cls.from_dict({k: v for k, v in kwargs.items() if k in keys}).to_dict()


def make_attributor(
    a: Mapping[str, Any], task: Any, model: nn.Module, setting: Any, num_ckpts: int, device: str
) -> tuple[Any, dict[str, Any]]:
    """Instantiate ``a["method"]`` for ``task``; returns ``(attributor, resolved arguments)``.

    The resolved arguments (``hyperparameters()`` of the attributor, JSON-able) are the
    provenance written into the scores' metadata.
    """
    cls, kwargs = attributor_arguments(a, model, setting, num_ckpts)
    check_work(kwargs, setting.n_train, cls.__name__)
    if "correct_probability_func" in _declared(cls):
        kwargs["correct_probability_func"] = make_probability_func(model, setting.kind)
    first = next((n for n in _declared(cls) if n != "self"), None)
    try:  # task positionally where it comes first (dattri's shapes), else by name (KNN-Shapley)
        attributor = (
            cls(task, device=device, **kwargs)
            if first == "task"
            else cls(task=task, device=device, **kwargs)
        )
    except TypeError as exc:  # a parameter the signature check could not see (e.g. **kwargs)
        raise ConfigError(f"{cls.__name__}: {exc}; fix params in the attributor's config") from exc
    resolved = getattr(attributor, "hyperparameters", dict)()
    return attributor, {k: _jsonable(v) for k, v in dict(resolved).items()}


def _jsonable(v: Any) -> Any:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return repr(v)
