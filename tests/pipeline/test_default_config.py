"""configs/default.yaml (README command 1) runs to the end at its stated size (issue 16.4).

The shipped default run (two demo benchmarks, every attributor of their lists, 30 subsets x 2 runs
and 10 LOO models each) goes through the real stages in a scratch copy of the workflow, and its
report's table is checked row by row: the benchmark x method rows the configs ask for, finite
metrics inside their confidence intervals, and the LDS of the README's default-run table.
``configs/full.yaml`` and ``configs/gpu_*.yaml`` are not run here (an hour of CPU, or GPU-hours
on a cluster; their header comments say so); ``test_configs.py`` checks that they validate.
"""

from __future__ import annotations

import math
import re
import shutil

import pytest
import yaml
from pipeline_helpers import REPO, make_workspace, snakemake

pytestmark = pytest.mark.slow

_ROW = re.compile(r"^\| (\S+) \| (\S+) \| (.+) \|$")


def _table(text: str) -> dict[tuple[str, str], list[str]]:
    """``{(benchmark, method): [LDS, 95% CI, noise ceiling, LOO corr, AUC, time]}`` of a table."""
    rows = {}
    for line in text.splitlines():
        m = _ROW.match(line.strip())
        if m and m.group(1) not in ("benchmark", "---"):
            rows[(m.group(1), m.group(2))] = [c.strip() for c in m.group(3).split("|")]
    return rows


def _expected_rows() -> set[tuple[str, str]]:
    default = yaml.safe_load((REPO / "configs/default.yaml").read_text())
    out = set()
    for b in default["benchmarks"]:
        bc = yaml.safe_load((REPO / f"configs/benchmarks/{b}.yaml").read_text())
        out |= {(b, m) for m in bc.get("attributors") or default["attributors"]}
    return out


def test_default_config_runs_to_the_end(tmp_path, real_env):
    ws = make_workspace(tmp_path / "ws")
    shutil.copytree(REPO / "configs", ws / "configs", dirs_exist_ok=True)  # the shipped files
    snakemake(ws, timeout=3000)
    rows = _table((ws / "results/report.md").read_text())
    assert set(rows) == _expected_rows(), sorted(set(rows) ^ _expected_rows())
    readme = _readme_table()
    for (b, m), cells in rows.items():
        lds, ci, ceiling, loo, auc = (cells[0], cells[1], cells[2], cells[3], cells[4])
        lo, hi = (float(x) for x in ci.strip("[]").split(","))
        values = [float(lds), lo, hi, float(ceiling), float(loo), float(auc)]
        assert all(math.isfinite(v) for v in values), (b, m, cells)
        assert lo <= float(lds) <= hi and float(lds) <= float(ceiling), (b, m, cells)
        # the README's default-run table is this run's: LDS to its second digit
        assert abs(float(lds) - float(readme[(b, m)][0])) <= 0.02, (b, m, lds, readme[(b, m)])
    res = snakemake(ws, "-n", "--quiet", "rules")
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout + res.stderr


def _readme_table() -> dict[tuple[str, str], list[str]]:
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- RESULTS:BEGIN", 1)[1].split("<!-- RESULTS:END", 1)[0]
    return _table(block)


def test_readme_table_lists_the_default_run():
    """The README's default-run table has exactly the rows the default config computes."""
    assert set(_readme_table()) == _expected_rows()
