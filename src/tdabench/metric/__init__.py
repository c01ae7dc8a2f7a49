"""tdabench.metric: LDS, LOO correlation, mislabel-detection AUC and their aggregation.

See :mod:`tdabench.metric.metrics` for the exact definitions.
"""

from __future__ import annotations

from tdabench.metric.brittleness import BrittlenessRunner, brittleness
from tdabench.metric.ground_truth import calculate_lds_ground_truth, calculate_loo_ground_truth
from tdabench.metric.metrics import (
    NoiseCeiling,
    bootstrap_ci,
    lds,
    loo_corr,
    mean_dropna,
    mislabel_detection_auc,
    noise_ceiling,
    pearson_columns,
    spearman_columns,
    summarize,
)
from tdabench.metric.noise import stored_noise_ceiling

# Spelled out (ruff checks re-exports against a literal list), so it repeats metrics.__all__.
__all__ = [
    "BrittlenessRunner",
    "NoiseCeiling",
    "bootstrap_ci",
    "brittleness",
    "calculate_lds_ground_truth",
    "calculate_loo_ground_truth",
    "lds",
    "loo_corr",
    "mean_dropna",
    "mislabel_detection_auc",
    "noise_ceiling",
    "pearson_columns",
    "spearman_columns",
    "stored_noise_ceiling",
    "summarize",
]
