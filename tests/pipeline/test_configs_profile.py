"""`tdabench install-profile` refuses impossible requests: bad numbers, and requests the cluster's
partition cannot satisfy (issue 16.3, 14)."""

from __future__ import annotations

import math

import pytest

from tdabench.errors import ConfigError
from tdabench.pipeline.cli import main
from tdabench.pipeline.launcher import SlurmSettings
from tdabench.pipeline.profile import (
    PartitionInfo,
    check_request,
    parse_slurm_minutes,
    render_slurm_profile,
    shard_request,
)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--mem-gb", "-5"),
        ("--mem-gb", "0"),
        ("--timeout-min", "0"),
        ("--cpus-per-task", "0"),
        ("--gpus-per-node", "-1"),
        ("--jobs", "0"),
        ("--array-parallelism", "0"),
    ],
)
def test_bad_numbers_are_refused(flag, value, tmp_path, capsys):
    rc = main(
        [
            "install-profile",
            "--account",
            "lab",
            "--partition",
            "p",
            "--dest",
            str(tmp_path),
            "--no-cluster-check",
            flag,
            value,
        ]
    )
    assert rc == 2 and flag in capsys.readouterr().err
    assert not (tmp_path / "config.yaml").exists()


def test_good_numbers_render():
    request = shard_request("lab", "gpu", gpus_per_node=0, mem_gb=0.5, timeout_min=5)
    text = render_slurm_profile(request)
    assert "mem_mb: 512" in text and "runtime: 5" in text
    assert "shard_mem_mb: 512" in text and "shard_runtime: 5" in text


@pytest.mark.parametrize(
    ("text", "minutes"),
    [
        ("UNLIMITED", math.inf),
        ("INFINITE", math.inf),
        ("30", 30),
        ("30:00", 30),
        ("2:00:00", 120),
        ("1-00:00:00", 1440),
        ("1-2", 1560),
        ("1-02:30", 1590),
    ],
)
def test_parse_slurm_minutes(text, minutes):
    assert parse_slurm_minutes(text) == minutes


def test_unsatisfiable_request_names_every_resource():
    info = PartitionInfo("debug", max_cpus=2, max_mem_mb=4096, max_gpus=0, max_time_min=60)
    fits = SlurmSettings(gpus_per_node=0, cpus_per_task=2, mem_mb=4096, timeout_min=60)
    check_request(info, fits)
    with pytest.raises(ConfigError) as e:
        check_request(
            info, SlurmSettings(gpus_per_node=1, cpus_per_task=4, mem_mb=16384, timeout_min=240)
        )
    msg = str(e.value)
    for part in (
        "--cpus-per-task 4",
        "--mem-gb 16",
        "--gpus-per-node 1",
        "--timeout-min 240",
        "PENDING",
    ):
        assert part in msg, msg
