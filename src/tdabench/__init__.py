"""tdabench: training-data attribution with one torch.func API, and a retraining benchmark.

Sub-packages are imported lazily so that ``import tdabench`` stays cheap and never
imports optional dependencies (snakemake, dvc, submitit).

Score convention (every method but one): ``attribute(train_loader, test_loader)`` returns
a tensor of shape ``(n_train, n_test)``; a high score means that training sample *helps*
the test prediction, i.e. removing it would *raise* the test loss. The exception is
``KNNShapleyAttributor``, which returns dattri's ``(n_test, n_train)`` and declares it
(``score_layout = "test_train"``).
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_SUBMODULES = (
    "algorithm",
    "benchmark",
    "errors",
    "func",
    "groundtruth",
    "metric",
    "model_util",
    "pipeline",
    "task",
)

__all__ = ["__version__", *_SUBMODULES]


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
