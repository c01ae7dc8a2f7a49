"""The noise ceiling of a stored ground truth (the metric side of the ground-truth store).

:func:`tdabench.metric.noise_ceiling` computes the ceiling from an ``(S, R, n_test)`` array;
:func:`stored_noise_ceiling` reads those values from a merged ground-truth file or a store.
It lives in :mod:`tdabench.metric`, which may read :mod:`tdabench.groundtruth`; the ground-truth
package never imports the metrics (no import cycle between the two).
"""

from __future__ import annotations

import os
from typing import Any

from tdabench.groundtruth.engine import load_runs
from tdabench.metric.metrics import NoiseCeiling, noise_ceiling

__all__ = ["stored_noise_ceiling"]


def stored_noise_ceiling(path: str | os.PathLike[str] | Any, target: str) -> NoiseCeiling:
    """:func:`~tdabench.metric.noise_ceiling` of a stored ground truth with ``num_runs >= 2``.

    Args:
        path: a merged Parquet file, a store directory or a
            :class:`~tdabench.groundtruth.GroundTruthStore`.
        target: the target name (one of the store's ``targets``).

    Returns:
        :class:`~tdabench.metric.NoiseCeiling`, per test point ``(n_test,)``.

    Raises:
        ConfigError: fewer than 2 runs per subset, or an unknown target.
        StoreError: an invalid or incomplete ground truth.
    """
    values, _, _ = load_runs(path, target)
    return noise_ceiling(values)
