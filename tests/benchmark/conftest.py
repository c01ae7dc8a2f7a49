"""Fixtures of the benchmark tests: data folders in the official formats, written to tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest
from _benchmark_files import write_cifar, write_maestro


@pytest.fixture
def cifar_root(tmp_path: Path) -> Path:
    write_cifar(tmp_path / "cifar-10-batches-py")
    return tmp_path


@pytest.fixture
def maestro_root(tmp_path: Path) -> Path:
    write_maestro(tmp_path / "maestro-v3.0.0")
    return tmp_path / "maestro-v3.0.0"
