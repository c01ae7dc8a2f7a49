"""Fixtures of the pipeline tests: a scratch copy of the workflow, toy stages, the SLURM cluster."""

from __future__ import annotations

import os
import subprocess

import pytest
from pipeline_helpers import BIN, REPO

# The toy stages (toy_stages.py, a test double) live here: subprocesses and launcher workers
# (local or SLURM) import them by name, so this directory goes on their PYTHONPATH.
_HERE = str(REPO / "tests" / "pipeline")
if _HERE not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (_HERE, os.environ.get("PYTHONPATH")) if p
    )


def _cluster_up() -> bool:
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return out.returncode == 0 and any(
        s.strip() in ("idle", "mixed", "allocated") for s in out.stdout.split()
    )


def pytest_collection_modifyitems(config, items):
    if any("slurm" in item.keywords for item in items) and not _cluster_up():
        skip = pytest.mark.skip(
            reason="no SLURM cluster (start it: bash tests/slurm/cluster.sh start)"
        )
        for item in items:
            if "slurm" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def toy_env(monkeypatch, tmp_path):
    """Environment for subprocesses: toy stages, this checkout's code, a call trace file."""
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("TDABENCH_STAGES", "toy_stages")
    monkeypatch.setenv("TDABENCH_TOY_TRACE", str(trace))
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PATH", os.pathsep.join([str(BIN), os.environ["PATH"]]))
    return trace


@pytest.fixture
def real_env(monkeypatch, tmp_path):
    """Environment for subprocesses running the REAL stages (library code, real MNIST digits)."""
    monkeypatch.delenv("TDABENCH_STAGES", raising=False)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PATH", os.pathsep.join([str(BIN), os.environ["PATH"]]))
