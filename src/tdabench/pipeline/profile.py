"""Install the ``slurm`` Snakemake profile for a lab (``tdabench install-profile``)."""

from __future__ import annotations

import os
from pathlib import Path

from tdabench._io import atomic_write_bytes
from tdabench.errors import ConfigError

__all__ = ["install_profile", "render_slurm_profile"]


def render_slurm_profile(
    account: str,
    partition: str,
    gpus_per_node: int = 1,
    cpus_per_task: int = 4,
    mem_gb: float = 16,
    timeout_min: int = 240,
    array_parallelism: int = 32,
    jobs: int = 50,
) -> str:
    """Text of a ``config.yaml`` for ``snakemake --profile slurm`` with the lab's settings.

    GPU-bound rules (train, attribute, evaluate) go to SLURM through Snakemake's slurm executor;
    the ground-truth rule is a local rule on the submit host that sends its retraining shards to
    SLURM as one submitit job array (launcher kind ``slurm``), with the same account/partition.
    """
    for name, value in (("account", account), ("partition", partition)):
        if not value or any(c.isspace() or c in "\"'{}:," for c in value):
            raise ConfigError(
                f"--{name} {value!r} is not a valid SLURM name; pass e.g. --{name} mylab"
            )
    mem_mb = int(mem_gb * 1024)
    gpu_rules = (
        f"  train:\n    gpu: {gpus_per_node}\n  attribute:\n    gpu: {gpus_per_node}\n"
        if gpus_per_node
        else ""
    )
    return f"""\
# Snakemake profile "slurm" for tdabench (installed by `tdabench install-profile`).
# GPU-bound rules run as SLURM jobs (snakemake-executor-plugin-slurm); the ground-truth rule runs
# on this host and submits its retraining shards as one submitit job array (launcher kind slurm).
executor: slurm
jobs: {jobs}
latency-wait: 60
retries: 1
rerun-incomplete: true
printshellcmds: true
slurm-init-seconds-before-status-checks: 20
default-resources:
  slurm_account: "{account}"
  slurm_partition: "{partition}"
  runtime: {timeout_min}
  mem_mb: {mem_mb}
  cpus_per_task: {cpus_per_task}
set-resources:
  groundtruth:              # local job; its retraining shards go out as one submitit job array
    launcher: slurm
    launcher_parallelism: {array_parallelism}
    shard_account: "{account}"
    shard_partition: "{partition}"
    shard_gpus: {gpus_per_node}
    shard_cpus: {cpus_per_task}
    shard_mem_mb: {mem_mb}
    shard_runtime: {timeout_min}
{gpu_rules}"""


def install_profile(
    account: str,
    partition: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    **settings: object,
) -> Path:
    """Write ``<dest>/config.yaml`` (default ``~/.config/snakemake/slurm``); returns ``dest``."""
    target = Path(dest) if dest else Path.home() / ".config" / "snakemake" / "slurm"
    path = target / "config.yaml"
    if path.exists() and not force:
        raise ConfigError(
            f"{path} exists; pass --force to overwrite it (or --dest for another place)"
        )
    target.mkdir(parents=True, exist_ok=True)
    text = render_slurm_profile(account, partition, **settings)  # type: ignore[arg-type]
    atomic_write_bytes(path, text.encode())
    return target
