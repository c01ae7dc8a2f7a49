"""Functional building blocks: flattening, per-sample gradients, solvers, Hessians."""

from tdabench.func.projection import Projector, make_projector
from tdabench.func.solvers import (
    EigenBasis,
    arnoldi_basis,
    conjugate_gradient,
    dense_from_matvec,
    lissa_recursion,
    solve_dense,
)
from tdabench.func.utils import (
    ParamSpec,
    flatten_params,
    per_sample_grads,
    per_sample_values,
    unflatten_params,
)

__all__ = [
    "EigenBasis",
    "ParamSpec",
    "Projector",
    "arnoldi_basis",
    "conjugate_gradient",
    "dense_from_matvec",
    "flatten_params",
    "lissa_recursion",
    "make_projector",
    "per_sample_grads",
    "per_sample_values",
    "solve_dense",
    "unflatten_params",
]
