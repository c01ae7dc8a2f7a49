"""Install the ``slurm`` Snakemake profile for a lab (``tdabench install-profile``).

The requested resources are checked twice: as numbers (positive memory, time, CPUs, ...), and
against the cluster itself (``scontrol show partition`` and ``sinfo``): a partition that does not
exist, or whose nodes or limits cannot satisfy the request, is refused with what it offers, since
SLURM would leave such jobs PENDING forever without a message. Where SLURM's commands are absent
(installing on a laptop for later), the check is skipped with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tdabench._io import atomic_write_bytes
from tdabench._validate import check_int, check_real
from tdabench.errors import ConfigError
from tdabench.pipeline.launcher import LauncherSettings, SlurmSettings

__all__ = [
    "SHARD_RESOURCES",
    "PartitionInfo",
    "check_request",
    "install_profile",
    "launcher_settings",
    "parse_slurm_minutes",
    "partition_info",
    "render_slurm_profile",
    "shard_request",
    "shard_resources",
]

logger = logging.getLogger(__name__)


#: The ground-truth rule's resources in a Snakemake profile (``set-resources: groundtruth:``) and
#: the launcher setting each one sets, in the settings' own units (MB, minutes). Resources, unlike
#: params, never rerun a job: where shards run is not a property of any result.
SHARD_RESOURCES = {
    "launcher": "kind",
    "launcher_parallelism": "array_parallelism",
    "launcher_retries": "max_retries",
    "shard_partition": "slurm.partition",
    "shard_account": "slurm.account",
    "shard_gpus": "slurm.gpus_per_node",
    "shard_cpus": "slurm.cpus_per_task",
    "shard_mem_mb": "slurm.mem_mb",
    "shard_runtime": "slurm.timeout_min",
}


def shard_resources(settings: LauncherSettings) -> dict[str, int | str]:
    """The :data:`SHARD_RESOURCES` of ``settings`` (``None`` names as ``""``)."""
    flat = {**settings.to_dict(), **{f"slurm.{k}": v for k, v in settings.slurm.to_dict().items()}}
    return {res: "" if flat[key] is None else flat[key] for res, key in SHARD_RESOURCES.items()}


def launcher_settings(
    config: Mapping[str, Any] | LauncherSettings, resources: Mapping[str, Any] | None = None
) -> LauncherSettings:
    """The one launcher settings object: the run config's ``launcher`` block, overridden by the
    profile's ``groundtruth`` resources (:data:`SHARD_RESOURCES`; other resources are ignored).

    Raises:
        ConfigError: an unknown ``shard_*``/``launcher*`` resource, or a bad value, naming the
            key and the fix.
    """
    base = config if isinstance(config, LauncherSettings) else LauncherSettings.from_dict(config)
    d = base.to_dict()
    for res, value in dict(resources or {}).items():
        if res not in SHARD_RESOURCES:
            if res.startswith(("shard_", "launcher")):
                raise ConfigError(
                    f"unknown groundtruth resource {res!r} in the profile; allowed: "
                    f"{sorted(SHARD_RESOURCES)}. Fix the key under set-resources: groundtruth:"
                )
            continue
        *outer, key = SHARD_RESOURCES[res].split(".")
        (d[outer[0]] if outer else d)[key] = value
    return LauncherSettings.from_dict(d)


# Spelled out: install-profile's options, one typed keyword each (defaults = the CLI's).
def shard_request(
    account: str,
    partition: str,
    *,
    gpus_per_node: int = 1,
    cpus_per_task: int = 4,
    mem_gb: float = 16,
    timeout_min: int = 240,
    array_parallelism: int = 32,
) -> LauncherSettings:
    """``install-profile``'s options as launcher settings (``--mem-gb`` becomes ``mem_mb`` here,
    once).

    Raises:
        ConfigError: naming the option (``--mem-gb -5``, ``--partition 'a b'``, ...) and the fix.
    """
    for name, value in (("account", account), ("partition", partition)):
        if not value or any(c.isspace() or c in "\"'{}:," for c in value):
            raise ConfigError(
                f"--{name} {value!r} is not a valid SLURM name; pass e.g. --{name} mylab"
            )
    for opt, value, least in (
        ("--gpus-per-node", gpus_per_node, 0),
        ("--cpus-per-task", cpus_per_task, 1),
        ("--timeout-min", timeout_min, 1),
        ("--array-parallelism", array_parallelism, 1),
    ):
        check_int(opt, value, least)
    check_real("--mem-gb", mem_gb, 0.0, strict=True, fix="pass a memory size in GB, e.g. 16")
    slurm = SlurmSettings(
        account=account,
        partition=partition,
        gpus_per_node=gpus_per_node,
        cpus_per_task=cpus_per_task,
        mem_mb=max(1, int(mem_gb * 1024)),
        timeout_min=timeout_min,
    )
    return LauncherSettings(kind="slurm", array_parallelism=array_parallelism, slurm=slurm)


@dataclass(frozen=True)
class PartitionInfo:
    """What a SLURM partition can give one job: the best node and the partition's limits."""

    name: str
    max_cpus: int  # CPUs of the largest node
    max_mem_mb: int  # memory of the largest node (MB), capped by MaxMemPerNode
    max_gpus: int  # GPUs (gres gpu) of the best node
    max_time_min: float  # MaxTime in minutes (inf = UNLIMITED)


def parse_slurm_minutes(text: str) -> float:
    """SLURM time (``UNLIMITED``, ``M``, ``M:S``, ``H:M:S``, ``D-H``, ``D-H:M``, ``D-H:M:S``) in minutes."""
    text = text.strip()
    if text.upper() in ("UNLIMITED", "INFINITE", "NONE", ""):
        return float("inf")
    days, _, rest = text.rpartition("-")
    parts = [int(x) for x in rest.split(":")]
    if days:
        h, m, s = [*parts, 0, 0][:3]
        return int(days) * 1440 + h * 60 + m + s / 60
    if len(parts) == 3:
        return parts[0] * 60 + parts[1] + parts[2] / 60
    if len(parts) == 2:
        return parts[0] + parts[1] / 60
    return float(parts[0])


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if res.returncode != 0:
        raise ConfigError(f"{' '.join(cmd)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


def partition_info(partition: str) -> PartitionInfo | None:
    """Read a partition's limits and its nodes' resources; ``None`` when SLURM is not installed.

    Raises:
        ConfigError: the partition does not exist (naming the ones that do).
    """
    if shutil.which("scontrol") is None or shutil.which("sinfo") is None:
        return None
    res = subprocess.run(
        ["scontrol", "show", "partition", "-o", partition],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if res.returncode != 0 or f"PartitionName={partition}" not in res.stdout:
        names = sorted({p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"]).split()})
        raise ConfigError(
            f"--partition {partition!r} does not exist on this cluster; use one of {names}"
        )
    fields = dict(tok.split("=", 1) for tok in res.stdout.split() if "=" in tok)
    nodes = [
        line.split()
        for line in _run(["sinfo", "-h", "-N", "-p", partition, "-o", "%c %m %G"]).splitlines()
        if line.strip()
    ]
    cpus = max((int(n[0].rstrip("+")) for n in nodes), default=0)
    mem = max((int(n[1].rstrip("+")) for n in nodes), default=0)
    gpus = max((_gpus(n[2] if len(n) > 2 else "") for n in nodes), default=0)
    cap = fields.get("MaxMemPerNode", "UNLIMITED")
    if cap.isdigit():
        mem = min(mem, int(cap))
    return PartitionInfo(partition, cpus, mem, gpus, parse_slurm_minutes(fields.get("MaxTime", "")))


#: Shortest MinJobAge (s) with which squeue still shows a finished job's state at the plugin's
#: slowest status poll (180 s).
MIN_JOB_AGE_S = 300


def min_job_age() -> int | None:
    """The cluster's ``MinJobAge`` in seconds (``scontrol show config``), ``None`` if unknown."""
    with contextlib.suppress(OSError, subprocess.SubprocessError, ConfigError):
        for line in _run(["scontrol", "show", "config"]).splitlines():
            if line.split("=")[0].strip() == "MinJobAge":
                return int(line.split("=", 1)[1].split()[0])
    return None


def _gpus(gres: str) -> int:
    return sum(int(m.group(1)) for m in re.finditer(r"gpu(?::[^:,()]+)?:(\d+)", gres))


def check_request(info: PartitionInfo, request: SlurmSettings) -> None:
    """Refuse a request no node of the partition can satisfy (SLURM would keep it PENDING).

    Raises:
        ConfigError: listing every unsatisfiable resource (as ``install-profile``'s options),
            what the partition offers, and the fix.
    """
    r, problems = request, []
    if r.cpus_per_task > info.max_cpus:
        problems.append(
            f"--cpus-per-task {r.cpus_per_task} > {info.max_cpus} CPUs on its largest node"
        )
    if r.mem_mb > info.max_mem_mb:
        problems.append(
            f"--mem-gb {r.mem_mb / 1024:g} > {info.max_mem_mb / 1024:.1f} GB on its largest node"
        )
    if r.gpus_per_node > info.max_gpus:
        problems.append(
            f"--gpus-per-node {r.gpus_per_node} > {info.max_gpus} GPUs on its best node"
        )
    if r.timeout_min > info.max_time_min:
        problems.append(f"--timeout-min {r.timeout_min} > its MaxTime of {info.max_time_min:g} min")
    if problems:
        raise ConfigError(
            f"partition {info.name!r} cannot run the requested jobs (they would stay PENDING): "
            + "; ".join(problems)
            + ". Lower the request, pick another partition, or pass --no-cluster-check."
        )


_PROFILE = """\
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
# squeue, not sacct: the plugin (2.8) matches job states exactly, and sacct reports a cancelled
# job as "CANCELLED by <uid>", which it takes for still running: the run would hang forever.
# squeue says "CANCELLED" (needs the cluster's MinJobAge >= 300 s; install-profile checks it).
slurm-status-command: squeue
slurm-requeue: true          # preempted jobs go back to the queue instead of vanishing
default-resources:
  slurm_account: "{account}"
  slurm_partition: "{partition}"
  runtime: {timeout_min}
  mem_mb: {mem_mb}
  cpus_per_task: {cpus_per_task}
set-resources:
  groundtruth:              # local job; its retraining shards go out as one submitit job array
{groundtruth}{gpu_rules}"""


def render_slurm_profile(settings: LauncherSettings, jobs: int = 50) -> str:
    """Text of a ``config.yaml`` for ``snakemake --profile slurm`` with the lab's settings.

    GPU-bound rules (train, attribute, evaluate) go to SLURM through Snakemake's slurm executor
    with ``settings.slurm``'s account, partition and resources; the ground-truth rule is a local
    rule on the submit host that sends its retraining shards to SLURM as one submitit job array
    with all of ``settings`` (its :data:`SHARD_RESOURCES`, read back by :func:`launcher_settings`).
    """
    check_int("--jobs", jobs, 1)
    s = settings.slurm
    gt = "".join(
        f'    {k}: "{v}"\n' if isinstance(v, str) else f"    {k}: {v}\n"
        for k, v in shard_resources(settings).items()
        if k != "launcher_retries"  # the run config's max_retries applies
    )
    gpu = s.gpus_per_node
    gpu_rules = f"  train:\n    gpu: {gpu}\n  attribute:\n    gpu: {gpu}\n" if gpu else ""
    return _PROFILE.format(
        jobs=jobs,
        account=s.account,
        partition=s.partition,
        timeout_min=s.timeout_min,
        mem_mb=s.mem_mb,
        cpus_per_task=s.cpus_per_task,
        groundtruth=gt,
        gpu_rules=gpu_rules,
    )


def install_profile(
    account: str,
    partition: str,
    dest: str | os.PathLike[str] | None = None,
    *,
    jobs: int = 50,
    force: bool = False,
    cluster_check: bool = True,
    **request: Any,
) -> Path:
    """Write ``<dest>/config.yaml`` (default ``~/.config/snakemake/slurm``); returns ``dest``.

    ``request`` holds :func:`shard_request`'s options (``gpus_per_node``, ``mem_gb``, ...). With
    ``cluster_check`` (default), the request is checked against the partition first
    (:func:`check_request`); where SLURM's commands are absent, a warning says it was not.
    """
    settings = shard_request(account, partition, **request)
    text = render_slurm_profile(settings, jobs)
    if cluster_check:
        _check_cluster(settings.slurm)
    target = Path(dest) if dest else Path.home() / ".config" / "snakemake" / "slurm"
    path = target / "config.yaml"
    if path.exists() and not force:
        raise ConfigError(
            f"{path} exists; pass --force to overwrite it (or --dest for another place)"
        )
    target.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, text.encode())
    return target


def _check_cluster(request: SlurmSettings) -> None:
    """:func:`check_request` against the partition, and the cluster's ``MinJobAge``."""
    assert request.partition is not None  # shard_request requires it
    info = partition_info(request.partition)
    if info is None:
        logger.warning(
            "scontrol/sinfo not found: the request was not checked against partition %r",
            request.partition,
        )
        return
    check_request(info, request)
    age = min_job_age()
    if age is not None and age < MIN_JOB_AGE_S:
        logger.warning(
            "this cluster's MinJobAge is %d s (< %d s): squeue may forget a finished job "
            "before Snakemake polls it; ask the admins to raise MinJobAge",
            age,
            MIN_JOB_AGE_S,
        )
