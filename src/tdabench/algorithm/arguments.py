"""Declared arguments: one dataclass per attribution method.

Each attributor's hyper-parameters (everything its constructor takes besides the task,
callables and the device) are one dataclass here. The dataclass validates in
``__post_init__`` (raising :class:`~tdabench.errors.ConfigError` that names the argument and
the fix), serialises with :meth:`MethodArguments.to_dict` (JSON-able, for provenance next to
the scores) and parses a config with :meth:`MethodArguments.from_dict` (an unknown key is a
``ConfigError`` listing the valid keys). ``attributor.hyperparameters()`` is derived from it.

A registry maps attributor class names to their argument classes, so that configuration
checks validate through the same code as the constructors::

    from tdabench.algorithm.arguments import arguments_for
    arguments_for("IFAttributorCG").from_dict({"max_iter": 20, "regularization": 0.01})

New methods register theirs with :func:`register_arguments`::

    @register_arguments("IFAttributorEKFAC")
    @dataclass
    class EKFACArguments(MethodArguments):
        damping: float = 0.0
        def __post_init__(self) -> None:
            check_real("damping", self.damping, 0.0)

Task-dependent checks (a ``weight_list`` of one weight per checkpoint, a layer that exists)
stay in the constructors, which know the task.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar

from tdabench._validate import check_choice, check_int, check_real
from tdabench.errors import ConfigError
from tdabench.func.projection import resolve_projector_kwargs
from tdabench.memory import parse_bytes

__all__ = [
    "HESSIANS",
    "HVP_MODES",
    "ArnoldiArguments",
    "GradCosArguments",
    "GradDotArguments",
    "IFCGArguments",
    "IFExplicitArguments",
    "LiSSAArguments",
    "MethodArguments",
    "RPSArguments",
    "TRAKArguments",
    "TracInArguments",
    "arguments_for",
    "register_arguments",
    "registered_methods",
]

HVP_MODES = ("rev-rev", "rev-fwd")
"""How Hessian-vector products are differentiated."""

HESSIANS = ("exact", "ggn")
"""Curvature of the influence functions: the exact Hessian or the Gauss-Newton matrix."""

GGN_OUTPUTS = ("cross_entropy", "mse")
"""Output losses whose Hessian has a closed form (see :mod:`tdabench.func.curvature`)."""

TRAK_DEFAULT_PROJECTOR = {"proj_dim": 512, "proj_type": "gaussian", "seed": 0}

_REGISTRY: dict[str, type[MethodArguments]] = {}

A = TypeVar("A", bound="MethodArguments")


def register_arguments(*class_names: str) -> Callable[[type[A]], type[A]]:
    """Class decorator: ``arguments_for(name)`` returns the decorated class for each name.

    Raises:
        ConfigError: a name is already registered to another class.
    """

    def deco(cls: type[A]) -> type[A]:
        for name in class_names:
            old = _REGISTRY.get(name)
            if old is not None and old is not cls and old.__qualname__ != cls.__qualname__:
                raise ConfigError(f"arguments for {name!r} are already registered ({old.__name__})")
            _REGISTRY[name] = cls
        return cls

    return deco


def arguments_for(method: str | type) -> type[MethodArguments]:
    """The argument dataclass of an attributor class (or its name).

    Raises:
        ConfigError: the method has no registered arguments (names the registered ones).
    """
    name = method if isinstance(method, str) else method.__name__
    if name not in _REGISTRY:
        raise ConfigError(
            f"unknown attribution method {name!r}; registered methods: {sorted(_REGISTRY)}"
        )
    return _REGISTRY[name]


def registered_methods() -> list[str]:
    """Names of every attributor class with registered arguments."""
    return sorted(_REGISTRY)


# ---------------------------------------------------------------------- shared checks
def _check_layer_name(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, Sequence) and value and all(isinstance(v, str) for v in value):
        return list(value)
    raise ConfigError(
        f"layer_name must be None, a parameter/module name or a non-empty list of them, got {value!r}; "
        "pass e.g. layer_name='fc2'"
    )


def _check_budget(value: Any) -> Any:
    if value is not None:
        parse_bytes(value, total=2**40)  # the form only; the device resolves fractions
    return value


def _check_bool(name: str, value: Any) -> bool:
    if isinstance(value, int) and value in (0, 1):  # bool is an int; 0/1 as given by YAML/JSON
        return bool(value)
    if not isinstance(value, bool):
        raise ConfigError(
            f"{name} must be true or false, got {value!r}; pass {name}=True or {name}=False"
        )
    return value


@dataclass
class MethodArguments:
    """Base of every method's arguments: serialisation and parsing."""

    #: keys of :meth:`to_dict` that describe *how* a result is computed, not *what*
    #: (excluded from :meth:`result_dict`).
    execution_keys: ClassVar[tuple[str, ...]] = ("memory_budget",)

    def to_dict(self) -> dict[str, Any]:
        """Every argument, JSON-able (lists for tuples, nested dicts copied)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = dict(v)
            out[f.name] = v
        return out

    def result_dict(self) -> dict[str, Any]:
        """:meth:`to_dict` without the execution-only keys (what determines the scores)."""
        return {k: v for k, v in self.to_dict().items() if k not in self.execution_keys}

    @classmethod
    def keys(cls) -> list[str]:
        """Accepted keys."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls: type[A], values: Mapping[str, Any]) -> A:
        """Arguments from a mapping (a config's ``params``), validated.

        Raises:
            ConfigError: an unknown key (the valid keys are named) or an invalid value.
        """
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"{cls.__name__} needs a mapping of arguments, got {type(values).__name__}"
            )
        unknown = sorted(set(values) - set(cls.keys()))
        if unknown:
            raise ConfigError(
                f"unknown argument(s) {unknown} for {cls.__name__}; valid keys: {cls.keys()}"
            )
        required = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [k for k in required if k not in values]
        if missing:
            raise ConfigError(f"{cls.__name__} needs argument(s) {missing}; pass them")
        return cls(**dict(values))


# ---------------------------------------------------------------------- influence functions
@dataclass
class _IFArguments(MethodArguments):
    layer_name: Any = None
    hessian: str = "exact"
    ggn_output: Any = None
    memory_budget: Any = None

    def __post_init__(self) -> None:
        self.layer_name = _check_layer_name(self.layer_name)
        check_choice(
            "hessian", self.hessian, HESSIANS, "the curvature: exact Hessian or Gauss-Newton"
        )
        if self.ggn_output is not None and isinstance(self.ggn_output, str):
            check_choice("ggn_output", self.ggn_output, GGN_OUTPUTS, "the output loss of the GGN")
        self.memory_budget = _check_budget(self.memory_budget)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        if out.get("ggn_output") is not None and not isinstance(out["ggn_output"], str):
            out["ggn_output"] = repr(out["ggn_output"])
        return out


def _check_mode(mode: Any) -> str:
    return str(check_choice("mode", mode, HVP_MODES, "how Hessian-vector products are computed"))


@register_arguments("IFAttributorExplicit")
@dataclass
class IFExplicitArguments(_IFArguments):
    """Arguments of :class:`~tdabench.algorithm.IFAttributorExplicit`."""

    regularization: float = 0.0
    max_dense_bytes: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.regularization = check_real("regularization", self.regularization, 0.0)
        if self.max_dense_bytes is not None:
            self.max_dense_bytes = check_int("max_dense_bytes", self.max_dense_bytes, 1)


@register_arguments("IFAttributorCG")
@dataclass
class IFCGArguments(_IFArguments):
    """Arguments of :class:`~tdabench.algorithm.IFAttributorCG`."""

    max_iter: int = 10
    tol: float = 1e-7
    mode: str = "rev-rev"
    regularization: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.max_iter = check_int("max_iter", self.max_iter, 1)
        self.tol = check_real("tol", self.tol, 0.0)
        self.mode = _check_mode(self.mode)
        self.regularization = check_real("regularization", self.regularization, 0.0)


@register_arguments("IFAttributorLiSSA")
@dataclass
class LiSSAArguments(_IFArguments):
    """Arguments of :class:`~tdabench.algorithm.IFAttributorLiSSA`."""

    batch_size: int = 1
    num_repeat: int = 1
    recursion_depth: int = 5000
    damping: float = 0.0
    scaling: float = 50.0
    mode: str = "rev-rev"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.batch_size = check_int("batch_size", self.batch_size, 1)
        self.num_repeat = check_int("num_repeat", self.num_repeat, 1)
        self.recursion_depth = check_int("recursion_depth", self.recursion_depth, 1)
        self.damping = check_real(
            "damping", self.damping, 0.0, below=1.0, fix="pass e.g. damping=0.001"
        )
        self.scaling = check_real(
            "scaling",
            self.scaling,
            0.0,
            strict=True,
            fix="pass a value above half the largest Hessian eigenvalue, e.g. scaling=50",
        )
        self.mode = _check_mode(self.mode)
        self.seed = check_int("seed", self.seed, 0)


# Spelled out: each class lists dattri's own defaults for its solver (CG and Arnoldi share names,
# not defaults: max_iter 10 vs 100), so the fields and their checks repeat per class.
@register_arguments("IFAttributorArnoldi")
@dataclass
class ArnoldiArguments(_IFArguments):
    """Arguments of :class:`~tdabench.algorithm.IFAttributorArnoldi`."""

    precompute_data_ratio: float = 1.0
    proj_dim: int = 100
    max_iter: int = 100
    norm_constant: float = 1.0
    tol: float = 1e-7
    regularization: float = 0.0
    seed: int = 0
    residual: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        self.residual = _check_bool("residual", self.residual)
        if self.residual and not (
            isinstance(self.regularization, (int, float)) and self.regularization > 0
        ):
            raise ConfigError(
                "residual=True divides the residual by regularization: pass regularization > 0"
            )
        self.precompute_data_ratio = check_real(
            "precompute_data_ratio",
            self.precompute_data_ratio,
            0.0,
            strict=True,
            at_most=1.0,
            fix="pass e.g. precompute_data_ratio=1.0",
        )
        self.proj_dim = check_int("proj_dim", self.proj_dim, 1)
        self.max_iter = check_int("max_iter", self.max_iter, 1)
        self.norm_constant = check_real("norm_constant", self.norm_constant, 0.0, strict=True)
        self.tol = check_real("tol", self.tol, 0.0)
        self.regularization = check_real("regularization", self.regularization, 0.0)
        self.seed = check_int("seed", self.seed, 0)


# ---------------------------------------------------------------------- gradient similarity
def _check_projector(value: Any, defaults: Mapping[str, Any] | None = None) -> Any:
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise ConfigError(f"projector_kwargs must be a dict or None, got {type(value).__name__}")
    resolve_projector_kwargs(value, defaults)  # validates keys and values
    return dict(value)


@register_arguments("TracInAttributor")
@dataclass
class TracInArguments(MethodArguments):
    """Arguments of :class:`~tdabench.algorithm.TracInAttributor` (``weight_list``: one
    learning rate per checkpoint; its length is checked against the task)."""

    weight_list: Any
    normalized_grad: bool = False
    projector_kwargs: Any = None
    layer_name: Any = None
    memory_budget: Any = None

    def __post_init__(self) -> None:
        w = self.weight_list
        if hasattr(w, "tolist"):
            w = w.tolist()
        ok = isinstance(w, Sequence) and not isinstance(w, str) and len(w) > 0
        if ok:
            try:
                w = [check_real("weight_list entry", x, None) for x in w]
            except ConfigError:
                ok = False
        if not ok:
            raise ConfigError(
                f"weight_list must be a non-empty list of finite numbers (one per checkpoint), got {self.weight_list!r}"
            )
        self.weight_list = w
        self.normalized_grad = _check_bool("normalized_grad", self.normalized_grad)
        self.projector_kwargs = _check_projector(self.projector_kwargs)
        self.layer_name = _check_layer_name(self.layer_name)
        self.memory_budget = _check_budget(self.memory_budget)


@register_arguments("GradDotAttributor")
@dataclass
class GradDotArguments(MethodArguments):
    """Arguments of :class:`~tdabench.algorithm.GradDotAttributor`."""

    layer_name: Any = None
    projector_kwargs: Any = None
    checkpoint_index: int = -1
    memory_budget: Any = None

    def __post_init__(self) -> None:
        self.layer_name = _check_layer_name(self.layer_name)
        self.projector_kwargs = _check_projector(self.projector_kwargs)
        self.checkpoint_index = check_int("checkpoint_index", self.checkpoint_index)
        self.memory_budget = _check_budget(self.memory_budget)


@register_arguments("GradCosAttributor")
@dataclass
class GradCosArguments(GradDotArguments):
    """Arguments of :class:`~tdabench.algorithm.GradCosAttributor`."""


@register_arguments("RPSAttributor")
@dataclass
class RPSArguments(MethodArguments):
    """Arguments of :class:`~tdabench.algorithm.RPSAttributor`."""

    final_linear_layer_name: str
    normalize_preactivate: bool = False
    l2_strength: float = 0.003
    epoch: int = 3000
    checkpoint_index: int = -1
    memory_budget: Any = None

    def __post_init__(self) -> None:
        if not isinstance(self.final_linear_layer_name, str) or not self.final_linear_layer_name:
            raise ConfigError(
                f"final_linear_layer_name must be the name of an nn.Linear module, got {self.final_linear_layer_name!r}"
            )
        self.normalize_preactivate = bool(self.normalize_preactivate)
        self.l2_strength = check_real(
            "l2_strength",
            self.l2_strength,
            0.0,
            strict=True,
            fix="the representer theorem needs it: pass e.g. l2_strength=0.003",
        )
        self.epoch = check_int("epoch", self.epoch, 1)
        self.checkpoint_index = check_int("checkpoint_index", self.checkpoint_index)
        self.memory_budget = _check_budget(self.memory_budget)


@register_arguments("TRAKAttributor")
@dataclass
class TRAKArguments(MethodArguments):
    """Arguments of :class:`~tdabench.algorithm.TRAKAttributor` (``correct_probability_func``
    is a callable, not an argument here)."""

    projector_kwargs: Any = field(default=None)
    layer_name: Any = None
    regularization: float = 0.0
    memory_budget: Any = None

    def __post_init__(self) -> None:
        self.projector_kwargs = _check_projector(self.projector_kwargs, TRAK_DEFAULT_PROJECTOR)
        self.layer_name = _check_layer_name(self.layer_name)
        self.regularization = check_real("regularization", self.regularization, 0.0)
        self.memory_budget = _check_budget(self.memory_budget)
