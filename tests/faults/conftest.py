"""Fixtures of the fault tests: a tiny real run, built once and copied per test.

Fault tests damage one output of the copy and check that the consuming stage refuses it with a
typed error naming the file, or repairs it on resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from fault_helpers import Run, tiny_config


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny") / "results"
    Run(tiny_config(root), root).all()
    return root


@pytest.fixture
def tiny(tiny_base, tmp_path) -> Run:
    """A private copy of the tiny run (damage it freely)."""
    root = tmp_path / "results"
    shutil.copytree(tiny_base, root, symlinks=True)
    return Run(tiny_config(root), root)
