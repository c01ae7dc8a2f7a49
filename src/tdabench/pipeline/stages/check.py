"""``tdabench check-config``: build every benchmark's and attributor's arguments, run nothing.

Everything the stages would reject later is rejected here, before a job starts: unknown or
invalid setting overrides (``n_train: -5``), recipes (``lr: .inf``), attributor parameters
(``max_iter: -1``, ``regularization: -0.5``, unknown keys, validated by the methods' declared
arguments) and work estimates beyond reason (LiSSA ``recursion_depth: 1e12``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tdabench.errors import ConfigError
from tdabench.groundtruth.optim import normalize_recipe
from tdabench.pipeline.config import stage_spec
from tdabench.pipeline.stages._common import setting
from tdabench.pipeline.stages.attributor import (
    MAX_PASSES,
    WARN_PASSES,
    attributor_arguments,
    check_work,
)

__all__ = ["MAX_PASSES", "WARN_PASSES", "check_config", "check_work"]


def _check_recipe(s: Any, where: str) -> None:
    recipe = normalize_recipe(s.recipe)
    if not math.isfinite(recipe["lr"]):
        raise ConfigError(f"{where}: recipe lr is {recipe['lr']}; set a finite learning rate")


def check_benchmark(cfg: Mapping[str, Any], benchmark: str) -> list[str]:
    """Build ``benchmark``'s setting, recipe, model and every attributor's arguments.

    Returns:
        Warnings.

    Raises:
        ConfigError: naming the config file and the problem.
    """
    bfile = Path(cfg["configs_dir"]) / "benchmarks" / f"{benchmark}.yaml"
    try:
        s = setting(stage_spec(cfg, "train", benchmark))
        _check_recipe(s, str(bfile))
        model = s.build_model()
    except ConfigError as exc:
        raise ConfigError(f"{bfile}: {exc}") from exc
    warnings: list[str] = []
    for name in cfg["benchmark_configs"][benchmark]["attributors"]:
        a = cfg["attributor_configs"][name]
        afile = Path(cfg["configs_dir"]) / "attributors" / f"{name}.yaml"
        try:
            _cls, kwargs = attributor_arguments(a, model, s, a["checkpoints"]["count"])
            warnings += check_work(kwargs, s.n_train, f"{afile} on {benchmark}")
        except ConfigError as exc:
            raise ConfigError(f"{afile} (benchmark {benchmark}): {exc}") from exc
    return warnings


def check_config(cfg: Mapping[str, Any]) -> list[str]:
    """:func:`check_benchmark` for every benchmark of a resolved run configuration."""
    return [w for b in cfg["benchmarks"] for w in check_benchmark(cfg, b)]
