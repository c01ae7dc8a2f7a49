"""Attributors. Every one: ``cache(train)``, ``attribute(train, test) -> (n_train, n_test)``,
``self_attribute(train) -> (n_train,)``."""

from tdabench.algorithm.base import BaseAttributor
from tdabench.algorithm.influence_function import (
    IFAttributorArnoldi,
    IFAttributorCG,
    IFAttributorExplicit,
    IFAttributorLiSSA,
)

__all__ = [
    "BaseAttributor",
    "IFAttributorArnoldi",
    "IFAttributorCG",
    "IFAttributorExplicit",
    "IFAttributorLiSSA",
]
