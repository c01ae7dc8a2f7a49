"""Configs that work (issue 16.4): every shipped config passes check-config, layered on the
defaults as Snakemake layers it, and the smoke config runs to the end with the real stages."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from pipeline_helpers import REPO, make_workspace, snakemake

from tdabench.pipeline.cli import main

CONFIGS = sorted(p.name for p in (REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", CONFIGS)
def test_every_shipped_config_passes_check_config(name, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["check-config", "--config", f"configs/{name}"]) == 0
    assert f"configs/{name}: OK" in capsys.readouterr().out


def test_check_config_names_the_layered_file(tmp_path, monkeypatch, capsys):
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.chdir(ws)
    (ws / "configs/mine.yaml").write_text("benchmarks: [mnist_lr]\nattributors: [nope]\n")
    assert main(["check-config", "--config", "configs/mine.yaml"]) == 2
    err = capsys.readouterr().err
    assert "configs/mine.yaml (layered on configs/default.yaml)" in err and "'nope'" in err


def test_smoke_config_check_config_reports_its_own_lists(monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["check-config", "--config", "configs/smoke.yaml"]) == 0
    out = capsys.readouterr().out
    assert "mnist_lr_smoke" in out and "mnist_mlp_smoke" in out and "results-smoke/" in out


@pytest.mark.slow
def test_smoke_config_runs_to_the_end(tmp_path, real_env):
    """configs/smoke.yaml with the real stages: every metric finite, then nothing left to do."""
    ws = make_workspace(tmp_path / "ws")
    for name in ("default.yaml", "smoke.yaml"):  # the shipped files, not the tiny test config
        shutil.copy(REPO / "configs" / name, ws / "configs" / name)
    snakemake(ws, "--configfile", "configs/smoke.yaml", timeout=1500)
    report = (ws / "results-smoke/report.md").read_text()
    for b, n in (("mnist_lr_smoke", 4), ("mnist_mlp_smoke", 4)):
        files = sorted(
            f
            for f in (ws / "results-smoke/metrics" / b).glob("*.json")
            if not f.name.endswith(".run.json")
        )
        assert len(files) == n, files
        for f in files:
            m = json.loads(f.read_text())
            for kind in ("lds", "loo", "auc"):
                assert math.isfinite(m[kind]["value"]), (f, kind, m)
        assert report.count(f"| {b} |") == n
    res = snakemake(ws, "-n", "--quiet", "rules", "--configfile", "configs/smoke.yaml")
    assert "Nothing to be done" in res.stdout + res.stderr, res.stdout + res.stderr


def test_memory_budget_in_the_run_config(tmp_path):
    """`memory_budget` in the run config is validated before any job and reaches the jobs through
    TDABENCH_MEMORY_BUDGET (like the launcher settings, it never changes an output's hash)."""
    ws = make_workspace(tmp_path / "ws")

    def jobs(*extra: str) -> list[str]:
        res = snakemake(ws, "-n", "--printshellcmds", *extra)
        return sorted(line for line in res.stdout.splitlines() if "-m tdabench.pipeline" in line)

    before = jobs()
    assert before and jobs("--config", "memory_budget=2GiB") == before  # same jobs, same hashes
    with pytest.raises(AssertionError, match="memory_budget"):
        snakemake(ws, "-n", "--quiet", "rules", "--config", "memory_budget=lots")
