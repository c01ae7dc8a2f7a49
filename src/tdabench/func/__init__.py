"""Functional building blocks: flattening, per-sample gradients, solvers, Hessians."""

from tdabench.func.fisher import (
    fvp,
    fvp_at_x,
    ifvp_at_x_cg,
    ifvp_at_x_explicit,
    ifvp_cg,
    ifvp_explicit,
)
from tdabench.func.hessian import (
    hvp,
    hvp_at_x,
    ihvp_arnoldi,
    ihvp_at_x_arnoldi,
    ihvp_at_x_cg,
    ihvp_at_x_explicit,
    ihvp_at_x_lissa,
    ihvp_cg,
    ihvp_explicit,
    ihvp_lissa,
)
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
    "fvp",
    "fvp_at_x",
    "hvp",
    "hvp_at_x",
    "ifvp_at_x_cg",
    "ifvp_at_x_explicit",
    "ifvp_cg",
    "ifvp_explicit",
    "ihvp_arnoldi",
    "ihvp_at_x_arnoldi",
    "ihvp_at_x_cg",
    "ihvp_at_x_explicit",
    "ihvp_at_x_lissa",
    "ihvp_cg",
    "ihvp_explicit",
    "ihvp_lissa",
    "lissa_recursion",
    "make_projector",
    "per_sample_grads",
    "per_sample_values",
    "solve_dense",
    "unflatten_params",
]
