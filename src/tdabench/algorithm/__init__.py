"""Attributors. Every one: ``cache(train)``, ``attribute(train, test) -> (n_train, n_test)``,
``self_attribute(train) -> (n_train,)``."""

from tdabench.algorithm.base import BaseAttributor
from tdabench.algorithm.rps import RPSAttributor
from tdabench.algorithm.tracin import GradCosAttributor, GradDotAttributor, TracInAttributor
from tdabench.algorithm.trak import TRAKAttributor

__all__ = [
    "BaseAttributor",
    "GradCosAttributor",
    "GradDotAttributor",
    "RPSAttributor",
    "TRAKAttributor",
    "TracInAttributor",
]
