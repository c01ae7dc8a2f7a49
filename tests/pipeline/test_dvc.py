"""Lab sharing with real DVC: clone A runs and pushes, a fresh clone B pulls and has nothing to do."""

from __future__ import annotations

import shutil

import pytest
from pipeline_helpers import BIN, REPO, jobs_scheduled, make_workspace, run, trace_lines

pytestmark = pytest.mark.slow


@pytest.fixture
def git_env(monkeypatch):
    for k, v in {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }.items():
        monkeypatch.setenv(k, v)


def test_push_pull_then_nothing_to_do(tmp_path, toy_env, git_env):
    dvc = str(BIN / "dvc")
    a = make_workspace(tmp_path / "a")
    run(["git", "init", "-q", "."], a)
    shutil.copytree(
        REPO / ".dvc", a / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local")
    )
    run([dvc, "remote", "add", "-d", "lab", str(tmp_path / "remote")], a)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "pipeline"], a)
    run([dvc, "repro"], a, timeout=600)
    assert (a / "results/report.md").exists()
    # dvc repro again: nothing changed, nothing runs
    trace_lines(toy_env)
    out = run([dvc, "repro"], a).stdout
    assert "didn't change" in out and trace_lines(toy_env) == []
    run(["git", "add", "dvc.lock"], a)
    run(["git", "commit", "-qm", "results"], a)
    run([dvc, "push"], a)

    b = tmp_path / "b"
    run(["git", "clone", "-q", str(a), str(b)], tmp_path)
    run([dvc, "pull"], b)
    assert (b / "results/report.md").read_text() == (a / "results/report.md").read_text()
    # DVC gave every file a new mtime, and there is no .snakemake metadata: still nothing to run
    assert not (b / ".snakemake").exists()
    assert jobs_scheduled(b) == {}
    assert "up to date" in run([dvc, "status"], b).stdout
    shown = run([dvc, "metrics", "show"], b).stdout
    assert "results/metrics/mnist_lr/grad_dot.json" in shown and "lds.value" in shown
    plots = run([dvc, "plots", "show"], b)
    assert "failed" not in plots.stdout + plots.stderr and (b / "dvc_plots/index.html").exists()
    assert trace_lines(toy_env) == []
