"""The memory planner: budgets from the device, overrides, and row sizing."""

from __future__ import annotations

import pytest
import torch

from tdabench.errors import ConfigError, MemoryLimitError
from tdabench.memory import CPU_STREAM_BYTES, GiB, MemoryPlanner, MiB, parse_bytes, planner_for


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("8GiB", 8 * GiB),
        ("512MB", 512 * 1000**2),
        ("1024", 1024),
        (" 2 mib ", 2 * MiB),
        (4096, 4096),
    ],
)
def test_parse_bytes_units(text, expected):
    assert parse_bytes(text) == expected


def test_parse_bytes_fraction_of_total():
    assert parse_bytes("0.5", total=1000) == 500
    assert parse_bytes(0.25, total=1000) == 250


@pytest.mark.parametrize("bad", ["lots", "-1GiB", 0, -5, True, "8 parsecs", float("nan"), [1]])
def test_parse_bytes_rejects(bad):
    with pytest.raises(ConfigError, match="memory_budget"):
        parse_bytes(bad, total=1000)


def test_cpu_budget_is_derived_from_available_ram(monkeypatch):
    monkeypatch.delenv("TDABENCH_MEMORY_BUDGET", raising=False)
    monkeypatch.setattr("tdabench.memory._available_ram", lambda: 10 * GiB)
    plan = planner_for("cpu")
    assert plan.budget == 5 * GiB


def test_override_argument_beats_environment(monkeypatch):
    monkeypatch.setenv("TDABENCH_MEMORY_BUDGET", "1GiB")
    assert planner_for("cpu").budget == GiB
    assert planner_for("cpu", memory_budget="2GiB").budget == 2 * GiB


def test_rows_stream_cap_on_cpu_only():
    cpu = MemoryPlanner(torch.device("cpu"), budget=100 * GiB, threads=1)
    gpu = MemoryPlanner(torch.device("cuda"), budget=100 * GiB)
    assert cpu.rows(MiB, stream=True) == CPU_STREAM_BYTES // MiB
    assert cpu.rows(MiB) == 100 * 1024
    assert gpu.rows(MiB, stream=True) == 100 * 1024
    assert cpu.rows(10 * GiB, stream=True) == 1  # one row is always possible
    assert cpu.rows(1, maximum=7) == 7
    assert cpu.rows(MiB, fraction=0.5) == 50 * 1024


def test_require_names_the_fix():
    plan = MemoryPlanner(torch.device("cpu"), budget=GiB)
    plan.require(GiB, "x", "fix it")
    with pytest.raises(MemoryLimitError, match=r"dense Hessian.*use CG.*memory_budget"):
        plan.require(2 * GiB, "the dense Hessian", "use CG")
