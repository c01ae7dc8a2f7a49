"""tdabench.benchmark: data sets, models, training recipes and targets of the benchmark settings.

>>> from tdabench.benchmark import get_setting
>>> s = get_setting("mnist_lr")
>>> s.kind, s.num_classes, s.recipe["lr"], s.metrics
('classification', 10, 0.01, ('lds', 'loo', 'auc'))
"""

from __future__ import annotations

from tdabench.benchmark.data import BenchmarkData, flip_labels
from tdabench.benchmark.models import (
    MLP,
    LogisticRegression,
    MusicTransformer,
    NanoGPT,
    ResNet9,
    count_parameters,
)
from tdabench.benchmark.settings import (
    RECIPE_DEFAULTS,
    BenchmarkSetting,
    get_setting,
    list_settings,
)
from tdabench.benchmark.targets import make_loss_func, make_target_func

__all__ = [
    "MLP",
    "RECIPE_DEFAULTS",
    "BenchmarkData",
    "BenchmarkSetting",
    "LogisticRegression",
    "MusicTransformer",
    "NanoGPT",
    "ResNet9",
    "count_parameters",
    "flip_labels",
    "get_setting",
    "list_settings",
    "make_loss_func",
    "make_target_func",
]
