"""Attributors. Every one: ``cache(train)``, ``attribute(train, test) -> (n_train, n_test)``,
``self_attribute(train) -> (n_train,)``."""

from tdabench.algorithm.base import BaseAttributor

__all__ = ["BaseAttributor"]
