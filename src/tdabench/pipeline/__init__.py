"""tdabench.pipeline: configuration, the submitit shard launcher, and the stage CLI.

Nothing here is imported by ``import tdabench``; optional dependencies (submitit, snakemake,
dvc, matplotlib) are imported only inside the functions that need them.
"""

from __future__ import annotations

from tdabench.pipeline.config import load_config, paths, resolve_config, spec_hash, stage_spec
from tdabench.pipeline.launcher import (
    LaunchError,
    LauncherSettings,
    LaunchReport,
    SlurmSettings,
    launch_shards,
)

__all__ = [
    "LaunchError",
    "LaunchReport",
    "LauncherSettings",
    "SlurmSettings",
    "launch_shards",
    "load_config",
    "paths",
    "resolve_config",
    "spec_hash",
    "stage_spec",
]
