"""Lab sharing with real DVC: clone A runs and pushes, a fresh clone B pulls and has nothing to do;
a tampered pulled file makes `dvc repro` fail, naming it, and never reaches dvc.lock (issue 16.2)."""

from __future__ import annotations

import shutil
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pipeline_helpers import BIN, REPO, jobs_scheduled, make_workspace, run, snakemake, trace_lines

pytestmark = pytest.mark.slow

DVC = str(BIN / "dvc")


@pytest.fixture
def git_env(monkeypatch):
    for k, v in {
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }.items():
        monkeypatch.setenv(k, v)
    # the stages must not depend on an activated venv: no venv directory on PATH
    monkeypatch.setenv("PATH", "/usr/bin:/bin")


def _clone_a(tmp_path):
    a = make_workspace(tmp_path / "a")
    (a / ".venv").symlink_to(BIN.parent)  # what scripts/setup.sh creates in a fresh clone
    shutil.copy(REPO / ".gitignore", a / ".gitignore")
    run(["git", "init", "-q", "."], a)
    shutil.copytree(
        REPO / ".dvc", a / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache", "config.local")
    )
    run([DVC, "remote", "add", "-d", "lab", str(tmp_path / "remote")], a)
    run(["git", "add", "-A"], a)
    run(["git", "commit", "-qm", "pipeline"], a)
    run([DVC, "repro"], a, timeout=600)
    run(["git", "add", "dvc.lock"], a)
    run(["git", "commit", "-qm", "results"], a)
    run([DVC, "push"], a)
    return a


def _clone_b(a, tmp_path):
    b = tmp_path / "b"
    run(["git", "clone", "-q", str(a), str(b)], tmp_path)
    (b / ".venv").symlink_to(BIN.parent)
    run([DVC, "pull"], b)
    # DVC does not keep mtimes: mark the pulled outputs up to date, in the workflow's order
    snakemake(b, "--touch")
    return b


def test_push_pull_then_nothing_to_do(tmp_path, toy_env, git_env):
    a = _clone_a(tmp_path)
    assert (a / "results/report.md").exists()
    # dvc repro again: nothing changed, nothing runs
    trace_lines(toy_env)
    out = run([DVC, "repro"], a).stdout
    assert "didn't change" in out and trace_lines(toy_env) == []
    assert "dvc_plots" in (a / ".gitignore").read_text()

    b = _clone_b(a, tmp_path)
    assert (b / "results/report.md").read_text() == (a / "results/report.md").read_text()
    assert not list(b.glob("results/**/*.run.json"))  # sidecars are not shared
    assert jobs_scheduled(b) == {}
    assert "up to date" in run([DVC, "status"], b).stdout
    shown = run([DVC, "metrics", "show"], b).stdout
    assert "results/metrics/mnist_lr/grad_dot.json" in shown and "lds.value" in shown
    plots = run([DVC, "plots", "show"], b)
    assert "failed" not in plots.stdout + plots.stderr and (b / "dvc_plots/index.html").exists()
    page = (b / "dvc_plots/index.html").read_text()
    assert "cdn" not in page.lower() and "vega" not in page.lower()  # renders offline
    assert trace_lines(toy_env) == []


def test_tampered_file_fails_repro_and_is_not_recorded(tmp_path, toy_env, git_env):
    a = _clone_a(tmp_path)
    b = _clone_b(a, tmp_path)
    (merged,) = b.glob("results/mnist_lr/groundtruth/lds/*/merged-*.parquet")
    # one ground-truth value changed, the file's stamps (metadata) kept: only the checksum can tell
    table = pq.read_table(merged)
    col = table.column_names.index("values")
    rows = table.column(col).to_pylist()
    rows[0] = [v + 1.0 for v in rows[0]]
    tampered = table.set_column(col, "values", pa.array(rows, type=table.schema.field(col).type))
    pq.write_table(tampered.replace_schema_metadata(table.schema.metadata), merged)
    lock = (b / "dvc.lock").read_text()
    res = subprocess.run([DVC, "repro"], cwd=b, capture_output=True, text=True, timeout=600)
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert merged.name in out, out
    assert (b / "dvc.lock").read_text() == lock  # the corrupt hash was never recorded
