"""SIGKILL a shard-producing subprocess at random points; the rerun must give a bit-identical store.

The harness lives in benchmarks/kill_resume.py (which runs >= 20 trials); here a few.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "kill_resume.py"


def _harness():
    spec = importlib.util.spec_from_file_location("kill_resume", _SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_kill_and_resume_is_bit_identical(tmp_path):
    summary = _harness().run_trials(trials=2, seed=123, max_kills=1, base=str(tmp_path))
    problems = [r["problems"] for r in summary["results"] if not r["ok"]]
    assert summary["passed"] == 2, problems
    assert summary["kills"] >= 1  # the trials really interrupted something
